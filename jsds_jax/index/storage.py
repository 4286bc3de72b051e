"""Index directories on disk: written whole into a temporary directory, then renamed.

An index directory holds the backend's files and `meta.json`:

  {"format": "jsds-sparse-index", "format_version": 1, "backend": "exact" | "seismic",
   "vocab_size": V, "num_docs": N, ...backend fields..., "model": {caller's metadata}}

The directory is assembled under a temporary name next to its destination and renamed into
place, so a killed writer never leaves a directory that looks like a finished index. Replacing
an existing index (overwrite=True) swaps the old one aside first; processes that memory-mapped
the old files keep reading them, since unlinked files stay alive while mapped.
"""

from collections.abc import Callable, Mapping
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np

META = "meta.json"
FORMAT = "jsds-sparse-index"
FORMAT_VERSION = 1


class IndexFormatError(ValueError):
  """A directory is not a (readable) index, or not one of the expected kind."""


def _fsync(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_atomically(path: str | os.PathLike, write: Callable[[pathlib.Path], None],
                     overwrite: bool = False) -> pathlib.Path:
  """Calls `write(tmp_dir)` and renames the filled directory to `path`.

  Args:
    path: destination directory.
    write: fills the (empty, existing) temporary directory it is given.
    overwrite: replace an existing `path`; otherwise an existing `path` is an error.

  Returns:
    The destination path.
  """
  path = pathlib.Path(path).expanduser().absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
  try:
    write(tmp)
    for f in tmp.iterdir():
      _fsync(f)
    _fsync(tmp)
    if path.exists():
      old = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
      os.replace(path, old / "index")
      os.replace(tmp, path)
      shutil.rmtree(old)
    else:
      os.replace(tmp, path)
    _fsync(path.parent)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return path


def save_arrays(directory: pathlib.Path, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes each array as `<name>.npy`."""
  for name, a in arrays.items():
    np.save(directory / f"{name}.npy", np.ascontiguousarray(a), allow_pickle=False)


def load_arrays(directory: pathlib.Path, names, mmap: bool = True) -> dict[str, np.ndarray]:
  """Reads `<name>.npy` for each name, memory-mapped read-only when `mmap`."""
  out = {}
  for name in names:
    f = pathlib.Path(directory) / f"{name}.npy"
    if not f.exists():
      raise IndexFormatError(f"{directory} is missing {f.name}")
    out[name] = np.load(f, mmap_mode="r" if mmap else None, allow_pickle=False)
  return out


def json_normalise(value: Any, what: str = "value") -> Any:
  """`value` as it reads back from JSON (tuples become lists), or ValueError if it cannot."""
  try:
    return json.loads(json.dumps(value))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{what} must be JSON-serialisable: {e}") from e


def write_meta(directory: pathlib.Path, meta: Mapping[str, Any]) -> None:
  meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
  text = json.dumps(json_normalise(meta, "index metadata"), indent=2, sort_keys=True)
  (pathlib.Path(directory) / META).write_text(text + "\n")


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
  """The checked `meta.json` of an index directory."""
  f = pathlib.Path(path).expanduser() / META
  if not f.is_file():
    raise IndexFormatError(f"{path} is not an index directory (no {META})")
  try:
    meta = json.loads(f.read_text())
  except json.JSONDecodeError as e:
    raise IndexFormatError(f"{f} is not valid JSON: {e}") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise IndexFormatError(f"{f} does not describe a {FORMAT} directory")
  if meta.get("format_version") != FORMAT_VERSION:
    raise IndexFormatError(
        f"{f} has format_version {meta.get('format_version')}, this code reads {FORMAT_VERSION}")
  return meta
