"""The offline demo dataset: Tux Paint's stamp pictures and their one-line English captions.

Debian's `tuxpaint-stamps-default` package (about 160 MB, GPL) holds clip-art pictures under
`usr/share/tuxpaint/stamps/<category>/.../<name>.png`, each with `<name>.txt` beside it whose
first line is an English description ("A frog.") and whose other lines are translations. That
gives a small image-caption set reachable wherever Debian's archive is, with no account or hub.

`build_demo(cache_dir)` turns it into a Karpathy JSON + image folder:

  cache_dir/download/tuxpaint-stamps-default_<version>_all.deb   `apt-get download`
  cache_dir/extracted/usr/share/tuxpaint/stamps/...               PNG/SVG/TXT only; removed
                                                                  once the build is done
  cache_dir/images/<category>/.../<name>.jpg                      RGB on white, longer side
                                                                  <= 256 px, JPEG quality 90
  cache_dir/tuxpaint_stamps.json                                  Karpathy format, written last

Pictures are PNG (SVG-only stamps are skipped: Pillow cannot rasterise SVG), one caption per
picture, and the split is a hash of the picture's path, so it does not depend on which other
pictures a package version has. Every step writes under a temporary name and renames, and the
final JSON is written last, so an interrupted build resumes and a finished one is not redone.
"""

import collections
from collections.abc import Sequence
import dataclasses
import hashlib
import io
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import time

from PIL import Image
from tqdm import tqdm

from jsds_jax import atomic
from jsds_jax.data.images import to_rgb
from jsds_jax.data.karpathy import make_record
from jsds_jax.data.karpathy import write_karpathy

PACKAGE = "tuxpaint-stamps-default"
STAMPS_DIR = "usr/share/tuxpaint/stamps"
JSON_NAME = "tuxpaint_stamps.json"
IMAGES_DIR = "images"
DATASET = "demo"
SPLIT_FRACTIONS = (("train", 0.8), ("val", 0.1), ("test", 0.1))
# What `extract_stamps` keeps of the package: the 7,858 .ogg sound files are not needed.
_KEEP_SUFFIXES = (".png", ".txt", ".svg")


class DemoDataError(RuntimeError):
  """The demo data could not be downloaded, extracted or built; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Stamp:
  """One picture: `name` is its path under the stamps folder without suffix, e.g.
  "animals/amphibians/frog"."""

  name: str
  png: pathlib.Path
  caption: str


def demo_paths(cache_dir: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
  """(Karpathy JSON, image root) of the demo data in `cache_dir`."""
  cache = pathlib.Path(cache_dir).expanduser()
  return cache / JSON_NAME, cache / IMAGES_DIR


def download_deb(download_dir: str | os.PathLike) -> pathlib.Path:
  """Returns the package's .deb in `download_dir`, fetching it with `apt-get download` if absent.

  `apt-get download` needs no root, only the package lists (/var/lib/apt/lists) that
  `apt-get update` fills.
  """
  folder = pathlib.Path(download_dir)
  found = sorted(folder.glob(f"{PACKAGE}_*.deb"))
  if found:
    return found[-1]
  if shutil.which("apt-get") is None:
    raise DemoDataError(
        f"apt-get is not available (not a Debian/Ubuntu system). Download {PACKAGE} from "
        f"https://packages.debian.org/{PACKAGE} and put the .deb into {folder}.")
  # Downloads go to a private folder and are moved in when complete: a killed download must
  # not leave a partial .deb that the glob above would take for a finished one.
  partial = folder / f".partial-{os.getpid()}"
  partial.mkdir(parents=True, exist_ok=True)
  try:
    result = subprocess.run(["apt-get", "download", PACKAGE], cwd=partial,
                            capture_output=True, text=True, check=False)
    debs = sorted(partial.glob(f"{PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
      output = (result.stderr or result.stdout).strip()
      hint = ""
      if "Unable to locate package" in output or "has no installation candidate" in output:
        hint = (" The apt package lists do not know the package: run `sudo apt-get update` "
                "once (it fills /var/lib/apt/lists; the download itself needs no root).")
      raise DemoDataError(
          f"`apt-get download {PACKAGE}` failed (exit {result.returncode}): {output}{hint} "
          f"Alternatively put the .deb from https://packages.debian.org/{PACKAGE} into "
          f"{folder}.")
    target = folder / debs[-1].name
    os.replace(debs[-1], target)
    return target
  finally:
    shutil.rmtree(partial, ignore_errors=True)


def _ar_member(deb: pathlib.Path, prefix: str) -> tuple[int, int, str]:
  """(offset, size, name) of the first member of the ar archive `deb` named `prefix*`."""
  with open(deb, "rb") as f:
    if f.read(8) != b"!<arch>\n":
      raise DemoDataError(f"{deb} is not a Debian package (no ar header)")
    while True:
      header = f.read(60)
      if len(header) < 60:
        raise DemoDataError(f"{deb} has no {prefix}* member")
      name = header[:16].decode("ascii").strip().rstrip("/")
      size = int(header[48:58].decode("ascii").strip())
      if name.startswith(prefix):
        return f.tell(), size, name
      f.seek(size + size % 2, os.SEEK_CUR)  # members are padded to an even length


class _Slice(io.RawIOBase):
  """A read-only window [offset, offset + size) of a binary file."""

  def __init__(self, f, offset: int, size: int):
    self._f = f
    self._left = size
    f.seek(offset)

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    n = min(len(buffer), self._left)
    data = self._f.read(n)
    buffer[:len(data)] = data
    self._left -= len(data)
    return len(data)


def extract_stamps(deb: str | os.PathLike, dest: str | os.PathLike) -> pathlib.Path:
  """Extracts the stamp pictures and captions of the .deb into `dest`; returns the stamps folder.

  Pure Python (ar + tarfile), so it also works off Debian, and it keeps only .png/.txt/.svg
  files. The tree is built in a temporary folder and renamed to `dest` when complete.
  """
  deb, dest = pathlib.Path(deb), pathlib.Path(dest)
  if (dest / STAMPS_DIR).is_dir():
    return dest / STAMPS_DIR
  offset, size, name = _ar_member(deb, "data.tar")
  if not name.endswith((".tar", ".gz", ".xz", ".bz2")):
    raise DemoDataError(f"{deb}: {name} is compressed in a way Python's tarfile cannot read")
  prefix = STAMPS_DIR + "/"
  with atomic.replacing(dest) as tmp:
    shutil.rmtree(tmp, ignore_errors=True)
    with open(deb, "rb") as f, tarfile.open(fileobj=io.BufferedReader(_Slice(f, offset, size)),
                                            mode="r|*") as tar:
      for member in tqdm(tar, desc=f"extract {deb.name}", unit=" files", mininterval=2):
        path = member.name.removeprefix("./")
        parts = pathlib.PurePosixPath(path).parts
        if (not member.isfile() or not path.startswith(prefix) or ".." in parts
            or not path.endswith(_KEEP_SUFFIXES)):
          continue
        out = tmp.joinpath(*parts)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(tar.extractfile(member).read())
    if not (tmp / STAMPS_DIR).is_dir():
      raise DemoDataError(f"{deb} holds no {STAMPS_DIR}/ folder")
  return dest / STAMPS_DIR


def read_caption(txt: pathlib.Path) -> str:
  """The first line of a stamp's description file, stripped (may be empty)."""
  with open(txt, encoding="utf-8-sig", errors="replace") as f:
    return f.readline().strip()


def find_stamps(stamps_root: str | os.PathLike) -> tuple[list[Stamp], dict[str, int]]:
  """Every PNG stamp with a non-empty caption under `stamps_root`, sorted by name.

  Returns:
    (stamps, counts) with counts "png" (PNG pictures), "no_caption" (PNG without a .txt),
    "empty_caption" (a .txt whose first line is blank), "svg_only" (captioned pictures that exist
    only as SVG, skipped) and "stamps" (kept).
  """
  root = pathlib.Path(stamps_root)
  counts = collections.Counter()
  stamps = []
  for png in sorted(root.rglob("*.png")):
    counts["png"] += 1
    txt = png.with_suffix(".txt")
    if not txt.is_file():
      counts["no_caption"] += 1
      continue
    caption = read_caption(txt)
    if not caption:
      counts["empty_caption"] += 1
      continue
    stamps.append(Stamp(png.relative_to(root).with_suffix("").as_posix(), png, caption))
  for svg in root.rglob("*.svg"):
    if svg.with_suffix(".txt").is_file() and not svg.with_suffix(".png").is_file():
      counts["svg_only"] += 1
  counts["stamps"] = len(stamps)
  return stamps, {k: counts[k] for k in ("png", "no_caption", "empty_caption", "svg_only",
                                         "stamps")}


def split_of(name: str, fractions: Sequence[tuple[str, float]] = SPLIT_FRACTIONS) -> str:
  """The split of a picture, from a hash of its name: stable across package versions."""
  u = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64
  total = 0.0
  for split, fraction in fractions:
    total += fraction
    if u < total:
      return split
  return fractions[-1][0]


def convert_picture(src: pathlib.Path, dst: pathlib.Path, max_side: int = 256,
                    quality: int = 90) -> None:
  """Writes `src` as an RGB JPEG on white with its longer side <= `max_side`, atomically."""
  with Image.open(src) as image:
    image.load()
    rgb = to_rgb(image)
  if max(rgb.size) > max_side:
    rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
  dst.parent.mkdir(parents=True, exist_ok=True)
  with atomic.replacing(dst) as tmp:
    rgb.save(tmp, format="JPEG", quality=quality)


def build_from_stamps(stamps_root: str | os.PathLike, out_dir: str | os.PathLike,
                      max_side: int = 256, quality: int = 90,
                      verbose: bool = True) -> tuple[pathlib.Path, dict[str, int]]:
  """Builds the demo Karpathy JSON + images from an extracted stamps folder.

  Args:
    stamps_root: the `usr/share/tuxpaint/stamps` folder (or a tree laid out like it).
    out_dir: receives `images/` and the JSON (see the module docstring).
    max_side: longest image side in pixels after downscaling.
    quality: JPEG quality.
    verbose: show a progress bar and print a summary.

  Returns:
    (JSON path, summary counts: those of `find_stamps` plus "unreadable" and one per split).
  """
  out = pathlib.Path(out_dir)
  json_path, image_root = demo_paths(out)
  stamps, summary = find_stamps(stamps_root)
  summary["unreadable"] = 0
  records = []
  for stamp in tqdm(stamps, desc="convert stamps", unit=" pictures", disable=not verbose,
                    mininterval=2):
    jpg = image_root / f"{stamp.name}.jpg"
    if not jpg.is_file():  # a file that exists is complete: it was renamed into place
      try:
        convert_picture(stamp.png, jpg, max_side, quality)
      except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        summary["unreadable"] += 1
        print(f"skipping unreadable picture {stamp.png}: {e}", file=sys.stderr)
        continue
    folder, filename = os.path.split(f"{stamp.name}.jpg")
    records.append(make_record(filename, split_of(stamp.name), [stamp.caption],
                               imgid=len(records), first_sentid=len(records),
                               filepath=folder))
  for split, _ in SPLIT_FRACTIONS:
    summary[split] = sum(r["split"] == split for r in records)
  write_karpathy(json_path, records, dataset=DATASET)
  if verbose:
    print(f"demo data: {len(records)} pictures -> {json_path} "
          f"(train {summary['train']}, val {summary['val']}, test {summary['test']}); "
          f"{summary['png']} PNGs, skipped: {summary['no_caption']} without caption, "
          f"{summary['empty_caption']} with an empty caption, {summary['svg_only']} SVG-only, "
          f"{summary['unreadable']} unreadable")
  return json_path, summary


def build_demo(cache_dir: str | os.PathLike, verbose: bool = True) -> pathlib.Path:
  """Downloads, extracts and builds the demo data in `cache_dir` unless already built.

  Returns:
    The Karpathy JSON; the images are under `demo_paths(cache_dir)[1]`.
  """
  cache = pathlib.Path(cache_dir).expanduser()
  json_path, _ = demo_paths(cache)
  if json_path.is_file():
    return json_path
  start = time.time()
  deb = download_deb(cache / "download")
  extracted = cache / "extracted"
  stamps_root = extract_stamps(deb, extracted)
  json_path, _ = build_from_stamps(stamps_root, cache, verbose=verbose)
  shutil.rmtree(extracted, ignore_errors=True)
  if verbose:
    print(f"demo data built in {time.time() - start:.0f} s")
  return json_path
