"""Files that readers never see half-written: write a temporary sibling, then rename it over the
target (`os.replace` is atomic within one filesystem).

  with atomic.replacing(path) as tmp:      # any writer that takes a path
    image.save(tmp, format="PNG")
  atomic.write_text(path, text)
  atomic.write_json(path, obj, indent=1)

The temporary name is `.<name>.tmp-<pid>`: hidden, distinct per process so concurrent writers
never share one, and what `feature_cache.remove_stale_temps` looks for after a killed run.
"""

from collections.abc import Iterator
import contextlib
import json
import os
import pathlib
import shutil
from typing import Any, IO


def temp_path(path: str | os.PathLike) -> pathlib.Path:
  """The temporary sibling `replacing(path)` writes to."""
  path = pathlib.Path(path)
  return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary path (file or folder) to write; renames it onto `path` when the block
  ends normally, removes it when the block raises."""
  path = pathlib.Path(path)
  tmp = temp_path(path)
  try:
    yield tmp
  except BaseException:
    if tmp.is_dir():
      shutil.rmtree(tmp, ignore_errors=True)
    else:
      tmp.unlink(missing_ok=True)
    raise
  os.replace(tmp, path)


def sync(f: IO) -> None:
  """Flushes an open file to the disk, so that the rename never publishes an empty file after a
  crash."""
  f.flush()
  os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
  """`path.write_text(text)`, atomically."""
  with replacing(path) as tmp, open(tmp, "w", encoding=encoding) as f:
    f.write(text)
    sync(f)


def write_json(path: str | os.PathLike, obj: Any, **dump_kwargs) -> None:
  """`json.dump(obj, ...)` into `path` (UTF-8), atomically."""
  with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, **dump_kwargs)
    sync(f)
