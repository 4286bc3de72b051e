"""The offline corpus: ~25,000 captioned pictures from npm icon and emoji sets plus Tux Paint.

Sources (see emoji.py and icons.py for what each gives; every one allows this use):

  source    npm package(s), pinned              licence of the pictures     pictures  captions
  openmoji  openmoji@17.0.0                     CC-BY-SA-4.0                ~4,500    ~6,800
  twemoji   @twemoji/svg@15.0.0, emojibase-data CC-BY-4.0 (names MIT)       ~3,700    ~5,500
  tabler    @tabler/icons@3.52.0                MIT                         ~6,500    ~12,000
  mdi       @mdi/svg@7.4.47                     Apache-2.0                  ~7,400    ~13,300
  lucide    lucide-static@1.62.0                ISC                         ~1,900    ~3,800
  tuxpaint  Debian tuxpaint-stamps-default      GPL-2.0+                    ~790      ~790

Debian's openclipart-* packages are deliberately not a source: they are kept unseen as an
outside check of generalisation.

`build_corpus(corpus_dir, tuxpaint_cache)` makes a Karpathy JSON + image folder:

  corpus_dir/download/<package>-<version>.tgz     `npm pack`
  corpus_dir/images/<source>/<key>.png           SVG rendered on white, `IMAGE_SIZE` square
  corpus_dir/images/tuxpaint/...jpg              copied from the demo build in tuxpaint_cache
  corpus_dir/corpus_report.json                  per source: licence, origin, package files
                                                 and their sha256, counts per split, and
                                                 every left-out item with the reason
  corpus_dir/corpus.json                         Karpathy format, written last

Every record carries, besides the Karpathy fields, `source`, `concept`, `license` and
`origin`; its image id (`imgid`) is "<source>/<key>", stable across builds. The split is a hash
of the concept (`split_of`), so it does not depend on which other pictures a package version
has, and pictures of one concept -- one emoji by two designers, an icon in two styles -- share
it. Pictures are rendered once (a finished PNG is renamed into place), and the JSON is written
last, so an interrupted build resumes and a finished one is not redone.

`select(corpus_json, sources, test_sources)` writes the subset a config asks for (e.g. train and
validate without one source, test on that source alone) beside the corpus, once.
"""

import collections
from collections.abc import Sequence
import hashlib
import json
import os
import pathlib
import shutil
import sys
import time

from PIL import Image
from tqdm import tqdm

from jsds_jax.data import demo_tuxpaint
from jsds_jax.data import emoji
from jsds_jax.data import icons
from jsds_jax.data import npm_package
from jsds_jax.data import svg_render
from jsds_jax.data.corpus_source import Item
from jsds_jax.data.corpus_source import Source
from jsds_jax.data.karpathy import make_record
from jsds_jax.data.karpathy import read_karpathy_json
from jsds_jax.data.karpathy import write_karpathy
from jsds_jax.data.split import BadItemError

DATASET = "corpus"
JSON_NAME = "corpus.json"
REPORT_NAME = "corpus_report.json"
IMAGES_DIR = "images"
SELECTIONS_DIR = "selections"
# The `lit` image tower's input side (EfficientNet-Lite0): rendering at it avoids a resampling.
IMAGE_SIZE = 224
SPLITS = ("train", "val", "test")

TUXPAINT = "tuxpaint"
TUXPAINT_LICENSE = "GPL-2.0-or-later"
TUXPAINT_ORIGIN = "https://tuxpaint.org (Debian tuxpaint-stamps-default)"
SVG_SOURCES: dict[str, Source] = {s.name: s for s in (
    emoji.OPENMOJI, emoji.TWEMOJI, icons.TABLER, icons.MDI, icons.LUCIDE)}
ALL_SOURCES = tuple(SVG_SOURCES) + (TUXPAINT,)

# How many left-out items the build prints per source (the report lists them all).
_SHOW_BAD = 3


class CorpusError(RuntimeError):
  """The corpus could not be built or selected; the message says what to do."""


def split_of(concept: str) -> str:
  """The split of a concept: a hash, 80 / 10 / 10 like the demo data's."""
  return demo_tuxpaint.split_of(concept)


def corpus_paths(corpus_dir: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
  """(Karpathy JSON, image root) of the corpus in `corpus_dir`."""
  folder = pathlib.Path(corpus_dir).expanduser()
  return folder / JSON_NAME, folder


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def read_source(source: Source, download_dir: pathlib.Path) -> tuple[list[Item], list[str],
                                                                      dict[str, str]]:
  """(items, left-out messages, {package file: sha256}) of one SVG source, fetched if absent.

  Items whose SVG is byte-for-byte another item's of the same source are left out too: one
  picture under two names could otherwise sit in two splits.
  """
  packages, files = {}, []
  for k, spec in enumerate(source.packages):
    tarball = npm_package.download_tarball(spec, download_dir)
    packages[tarball.name] = _sha256(tarball)
    files.append(npm_package.read_files(tarball, lambda path, k=k: source.wanted(k, path)))
  items, bad = source.read(files)
  kept, first_key = [], {}
  for item in items:
    digest = hashlib.sha256(item.svg.encode("utf-8")).hexdigest()
    if digest in first_key:
      bad.append(f"{source.name} {item.key}: the same SVG as {first_key[digest]}")
      continue
    first_key[digest] = item.key
    kept.append(item)
  return kept, bad, packages


def _save_png(image, path: pathlib.Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  Image.fromarray(image).save(tmp, format="PNG", optimize=False)
  os.replace(tmp, path)


def _render_source(source: Source, items: Sequence[Item], image_root: pathlib.Path,
                   image_size: int, verbose: bool) -> tuple[list[tuple[Item, str]], list[str]]:
  """Renders the items not rendered yet; returns ([(item, path below image_root)], bad)."""
  done, bad = [], []
  for item in tqdm(items, desc=f"render {source.name}", unit=" svg", disable=not verbose,
                   mininterval=5):
    relative = f"{IMAGES_DIR}/{source.name}/{item.key}.png"
    path = image_root / relative
    if not path.is_file():  # a file that exists is complete: it was renamed into place
      try:
        _save_png(svg_render.render_svg(item.svg, image_size, f"{source.name} {item.key}"), path)
      except BadItemError as e:
        bad.append(str(e))
        continue
    done.append((item, relative))
  return done, bad


def _tuxpaint_items(tuxpaint_cache: pathlib.Path, image_root: pathlib.Path,
                    verbose: bool) -> tuple[list[tuple[Item, str]], list[str]]:
  """The demo's Tux Paint pictures (built in `tuxpaint_cache` if needed), copied in."""
  json_path = demo_tuxpaint.build_demo(tuxpaint_cache, verbose=verbose)
  demo_root = demo_tuxpaint.demo_paths(tuxpaint_cache)[1]
  done, bad = [], []
  for record in read_karpathy_json(json_path)["images"]:
    inner = f"{record.get('filepath', '')}/{record['filename']}".lstrip("/")
    key = inner.rsplit(".", 1)[0]
    captions = tuple(s["raw"].strip() for s in record["sentences"] if s["raw"].strip())
    if not captions:
      bad.append(f"{TUXPAINT} {key}: no caption")
      continue
    relative = f"{IMAGES_DIR}/{TUXPAINT}/{inner}"
    target = image_root / relative
    if not target.is_file():
      target.parent.mkdir(parents=True, exist_ok=True)
      tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
      shutil.copyfile(demo_root / inner, tmp)
      os.replace(tmp, target)
    done.append((Item(key, f"{TUXPAINT}:{key}", captions, ""), relative))
  return done, bad


def build_corpus(corpus_dir: str | os.PathLike, tuxpaint_cache: str | os.PathLike | None,
                 sources: Sequence[Source] | None = None, image_size: int = IMAGE_SIZE,
                 verbose: bool = True) -> pathlib.Path:
  """Downloads, renders and writes the corpus in `corpus_dir` unless already built.

  Args:
    corpus_dir: the corpus folder (see the module docstring).
    tuxpaint_cache: where the demo data is (or is built, see demo_tuxpaint.build_demo); None
      leaves Tux Paint out.
    sources: the SVG sources; default all of `SVG_SOURCES`.
    image_size: side of the rendered squares. Pictures already rendered are reused whatever
      their size, so a different size needs a fresh `corpus_dir`.
    verbose: progress bars and a summary.

  Returns:
    The Karpathy JSON; images are under `corpus_paths(corpus_dir)[1]`.
  """
  json_path, image_root = corpus_paths(corpus_dir)
  if json_path.is_file():
    return json_path
  start = time.time()
  sources = list(SVG_SOURCES.values()) if sources is None else list(sources)
  report = {"image_size": image_size, "sources": {}, "left_out": {}}
  records, sentences = [], 0
  per_source = []
  for source in sources:
    items, bad, packages = read_source(source, image_root / "download")
    done, render_bad = _render_source(source, items, image_root, image_size, verbose)
    per_source.append((source.name, source.license, source.origin, packages, done,
                       bad + render_bad))
  if tuxpaint_cache is not None:
    done, bad = _tuxpaint_items(pathlib.Path(tuxpaint_cache).expanduser(), image_root, verbose)
    per_source.append((TUXPAINT, TUXPAINT_LICENSE, TUXPAINT_ORIGIN,
                       {demo_tuxpaint.PACKAGE: "Debian archive"}, done, bad))
  for name, license_, origin, packages, done, bad in per_source:
    counts = collections.Counter()
    for item, relative in done:
      split = split_of(item.concept)
      folder, filename = relative.rsplit("/", 1)
      record = make_record(filename, split, list(item.captions), imgid=f"{name}/{item.key}",
                           first_sentid=sentences, filepath=folder)
      record.update(source=name, concept=item.concept, license=license_, origin=origin)
      records.append(record)
      sentences += len(item.captions)
      counts[f"{split}_images"] += 1
      counts[f"{split}_captions"] += len(item.captions)
    report["sources"][name] = {"license": license_, "origin": origin, "packages": packages,
                               "images": len(done), "left_out": len(bad),
                               **{k: counts[k] for k in sorted(counts)}}
    report["left_out"][name] = bad
    if verbose and bad:
      shown = "; ".join(bad[:_SHOW_BAD])
      print(f"{name}: left out {len(bad)} items, e.g. {shown} (all in {REPORT_NAME})",
            file=sys.stderr)
  if not records:
    raise CorpusError(f"no usable picture in any source; see {image_root / REPORT_NAME}")
  report_path = image_root / REPORT_NAME
  tmp = report_path.with_name(f".{report_path.name}.tmp-{os.getpid()}")
  tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
  os.replace(tmp, report_path)
  write_karpathy(json_path, records, dataset=DATASET)
  if verbose:
    totals = collections.Counter(r["split"] for r in records)
    print(f"corpus: {len(records)} pictures, {sentences} captions from {len(per_source)} "
          f"sources -> {json_path} (train {totals['train']}, val {totals['val']}, test "
          f"{totals['test']} pictures), built in {time.time() - start:.0f} s")
  return json_path


def parse_sources(value: str | Sequence[str] | None, field: str,
                  available: Sequence[str] = ALL_SOURCES) -> tuple[str, ...]:
  """A config's source list ("openmoji,mdi" or a list) checked against `available`; None or
  "" means all of them."""
  if value is None or value == "" or value == ():
    return tuple(available)
  names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value)]
  names = [n for n in names if n]
  unknown = [n for n in names if n not in available]
  if unknown or not names:
    raise ValueError(f"data.{field}={value!r}: unknown source(s) {', '.join(unknown) or '(none)'};"
                     f" choose from {', '.join(available)}")
  return tuple(n for n in available if n in names)  # one order: the same selection, one name


def selection_name(sources: Sequence[str], test_sources: Sequence[str],
                   max_test_images: int = 0) -> str:
  """The dataset name of a selection: "corpus" for every source, else it names the sources
  (and the test cap, if any).

  It is also the feature cache's folder name (encode.dataset_key), so two selections never
  share cached features.
  """
  order = {name: k for k, name in enumerate(ALL_SOURCES)}
  sources = sorted(sources, key=lambda n: (order.get(n, len(order)), n))
  test_sources = sorted(test_sources, key=lambda n: (order.get(n, len(order)), n))
  everything = tuple(sources) == ALL_SOURCES and tuple(test_sources) == ALL_SOURCES
  name = DATASET if everything else f"{DATASET}-{'+'.join(sources)}"
  if tuple(test_sources) != tuple(sources):
    name += f"-test-{'+'.join(test_sources)}"
  if max_test_images:
    name += f"-{max_test_images}test"
  return name


def _hash_rank(image_id: str) -> bytes:
  return hashlib.sha256(image_id.encode("utf-8")).digest()


def select(corpus_json: str | os.PathLike, sources: Sequence[str],
           test_sources: Sequence[str], max_test_images: int = 0) -> tuple[pathlib.Path, str]:
  """(Karpathy JSON, dataset name) of the corpus restricted to `sources` for train and val and
  to `test_sources` for test; written once beside the corpus (the image root stays the same).

  A test source that is not among `sources` (the cross-source check) is tested on its val and
  test pictures together: none of them is trained or validated on, and their concepts are in
  no training split of any source. `max_test_images` > 0 keeps that many test pictures, those
  first in the order of a hash of their ids (the same ones whatever else the corpus holds), so a
  retrieval score compares across selections at a fixed number of candidates.

  Raises:
    CorpusError: the corpus has no picture of a requested source.
  """
  corpus_json = pathlib.Path(corpus_json)
  name = selection_name(sources, test_sources, max_test_images)
  path = corpus_json.parent / SELECTIONS_DIR / f"{name}.json"
  if path.is_file() and path.stat().st_mtime >= corpus_json.stat().st_mtime:
    return path, name
  records = read_karpathy_json(corpus_json)["images"]
  available = tuple(dict.fromkeys(r.get("source") for r in records))
  missing = [s for s in dict.fromkeys((*sources, *test_sources)) if s not in available]
  if missing:
    raise CorpusError(f"{corpus_json} has no pictures of source(s) {', '.join(missing)}; it "
                      f"has {', '.join(map(str, available))}. Delete it to rebuild.")
  if name == DATASET:
    return corpus_json, name
  held_out = set(test_sources) - set(sources)
  kept = []
  for record in records:
    if record["source"] in held_out and record["split"] == "val":
      # Neither trained nor validated on, and concept-disjoint from every training split:
      # a held-out source's val pictures join its test split, to give it more candidates.
      kept.append({**record, "split": "test"})
    elif record["source"] in (test_sources if record["split"] == "test" else sources):
      kept.append(record)
  if max_test_images:
    test_ids = sorted((r["imgid"] for r in kept if r["split"] == "test"), key=_hash_rank)
    chosen = set(test_ids[:max_test_images])
    kept = [r for r in kept if r["split"] != "test" or r["imgid"] in chosen]
  write_karpathy(path, kept, dataset=name)
  return path, name
