"""Whole-split checks before encoding, so a user learns of every bad item in one run.

A loader collects each problem it finds (a record without a field, an empty caption, a file that
is not an image) instead of raising at the first, and `problems_message` turns the list into one
error: the first `MAX_SHOWN` items, the count of the rest, and the `skip_bad` way out.
"""

from collections.abc import Sequence
import concurrent.futures
import os

from PIL import Image

MAX_SHOWN = 10
SKIP_BAD_HINT = ("Fix {}, or pass --config.data.skip_bad=True (skip_bad=True from Python) to "
                 "drop bad items")


def image_problem(path: str | os.PathLike) -> str | None:
  """Why the image file at `path` cannot be used, or None when it looks readable.

  Reads the header and lets Pillow check what it can without decoding (PNG chunk checksums,
  the structure of most formats); a JPEG truncated in its pixel data still passes and is
  reported by the decoder during encoding, naming the file.
  """
  try:
    with Image.open(path) as image:
      image.verify()
  except FileNotFoundError:
    return "does not exist"
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    return f"is not a readable image ({type(e).__name__}: {e})"
  return None


def unreadable_images(paths: Sequence[str], num_workers: int = 8) -> list[tuple[int, str]]:
  """(index, problem) of every path in `paths` that `image_problem` rejects, in order."""
  if not paths:
    return []
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    found = list(pool.map(image_problem, paths))
  return [(i, problem) for i, problem in enumerate(found) if problem]


def problems_message(source: str, split: str, problems: Sequence[str]) -> str:
  """One message for all of `problems` ("images[3] (b.jpg) sentences[0].raw is empty", ...).

  One problem reads `<source>: <problem>. <hint>`; several: `<source>: N bad items in split
  '<split>': <first MAX_SHOWN, ';'-separated> and M more. <hint>`.
  """
  if len(problems) == 1:
    return f"{source}: {problems[0]}. {SKIP_BAD_HINT.format('it')}"
  shown = "; ".join(problems[:MAX_SHOWN])
  more = f" and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
  return (f"{source}: {len(problems)} bad items in split '{split}': {shown}{more}. "
          f"{SKIP_BAD_HINT.format('them')}")
