"""Emoji sources: the same Unicode emoji drawn by two designers, with English names and tags.

  openmoji   npm `openmoji` (CC-BY-SA-4.0): color/svg/<HEXCODE>.svg and data/openmoji.json,
             whose "annotation" ("grinning face") and "tags" / "openmoji_tags" come from
             Unicode CLDR and the OpenMoji team. ~4,500 pictures, 405 of them OpenMoji's own
             extras (no Unicode code point).
  twemoji    npm `@twemoji/svg` (graphics CC-BY-4.0 by Twitter and jdecked's contributors,
             package MIT): <hexcode>.svg, named and tagged by npm `emojibase-data` (MIT; its
             English "label" and "tags" are CLDR's). ~3,700 pictures.

Captions per picture: the name ("grinning face", "waving hand: light skin tone") and, for base
emoji, the tags joined ("face, grin, happy, smile"). Skin-tone variants get only their name:
their tags are their base's, and five pictures sharing one caption would make four of them
wrong answers for it.
"""

from collections.abc import Sequence
import json

from jsds_jax.data import captions as cap
from jsds_jax.data.corpus_source import decode_svg
from jsds_jax.data.corpus_source import emoji_concept
from jsds_jax.data.corpus_source import Files
from jsds_jax.data.corpus_source import Item
from jsds_jax.data.corpus_source import Source

OPENMOJI_PACKAGE = "openmoji@17.0.0"
TWEMOJI_PACKAGE = "@twemoji/svg@15.0.0"
EMOJIBASE_PACKAGE = "emojibase-data@17.0.0"
MAX_TAGS = 10


def normalize_hexcode(hexcode: str) -> str:
  """A code point sequence in one spelling: upper case, no leading zeros, no FE0F.

  Twemoji writes "31-20e3" and "2764" where emojibase writes "0031-FE0F-20E3" and "2764-FE0F".
  """
  points = []
  for part in hexcode.replace("_", "-").split("-"):
    if part:
      value = int(part, 16)
      if value != 0xFE0F:
        points.append(f"{value:X}")
  return "-".join(points)


def _tags(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


def read_openmoji(packages: Sequence[Files]) -> tuple[list[Item], list[str]]:
  """Items of the openmoji package: data/openmoji.json + color/svg/*.svg."""
  files = packages[0]
  if "data/openmoji.json" not in files:
    return [], ["openmoji: the package has no data/openmoji.json (names and tags)"]
  meta = json.loads(files["data/openmoji.json"])
  items, bad, listed = [], [], set()
  for entry in meta:
    hexcode = str(entry.get("hexcode", "")).strip()
    path = f"color/svg/{hexcode}.svg"
    listed.add(path)
    name = cap.clean_text(str(entry.get("annotation") or ""))
    if not hexcode or path not in files:
      bad.append(f"openmoji {hexcode or '?'} ({name}): in data/openmoji.json but {path} is "
                 "not in the package")
      continue
    if not name:
      bad.append(f"openmoji {hexcode}: empty annotation in data/openmoji.json")
      continue
    captions = [name]
    if not entry.get("skintone"):
      tags = _tags(str(entry.get("tags") or "")) + _tags(str(entry.get("openmoji_tags") or ""))
      captions.append(cap.join_tags(tags, exclude=[name], max_tags=MAX_TAGS))
    base = str(entry.get("skintone_base_hexcode") or "") or hexcode
    items.append(Item(hexcode, emoji_concept(normalize_hexcode(base)),
                      cap.unique_captions(captions), decode_svg(files[path])))
  for path in sorted(p for p in files if p.startswith("color/svg/") and p not in listed):
    bad.append(f"openmoji {path}: no entry in data/openmoji.json (no name)")
  return items, bad


def emojibase_names(data: bytes) -> dict[str, tuple[str, list[str], bool]]:
  """{normalized hexcode: (label, tags, is a skin-tone variant)} from emojibase's data.json."""
  names = {}
  for entry in json.loads(data):
    label = cap.clean_text(str(entry.get("label") or ""))
    names[normalize_hexcode(entry["hexcode"])] = (label, list(entry.get("tags") or []), False)
    for skin in entry.get("skins") or []:
      names[normalize_hexcode(skin["hexcode"])] = (
          cap.clean_text(str(skin.get("label") or "")), [], True)
  return names


def read_twemoji(packages: Sequence[Files]) -> tuple[list[Item], list[str]]:
  """Items of @twemoji/svg (packages[0]) named by emojibase-data (packages[1])."""
  svgs, names_file = packages
  if "en/data.json" not in names_file:
    return [], [f"twemoji: {EMOJIBASE_PACKAGE} has no en/data.json (names and tags)"]
  names = emojibase_names(names_file["en/data.json"])
  items, bad = [], []
  for path in sorted(p for p in svgs if p.endswith(".svg") and "/" not in p):
    key = path[:-4]
    try:
      hexcode = normalize_hexcode(key)
    except ValueError:
      bad.append(f"twemoji {path}: the file name is not a code point sequence")
      continue
    if hexcode not in names or not names[hexcode][0]:
      bad.append(f"twemoji {path}: no English name for {hexcode} in emojibase-data")
      continue
    label, tags, is_skin = names[hexcode]
    captions = [label]
    if not is_skin:
      captions.append(cap.join_tags(tags, exclude=[label], max_tags=MAX_TAGS))
    items.append(Item(key, emoji_concept(hexcode), cap.unique_captions(captions),
                      decode_svg(svgs[path])))
  return items, bad


OPENMOJI = Source(
    name="openmoji",
    packages=(OPENMOJI_PACKAGE,),
    wanted=lambda k, path: path == "data/openmoji.json" or (
        path.startswith("color/svg/") and path.endswith(".svg")),
    read=read_openmoji,
    license="CC-BY-SA-4.0",
    origin="https://openmoji.org (npm openmoji)")

TWEMOJI = Source(
    name="twemoji",
    packages=(TWEMOJI_PACKAGE, EMOJIBASE_PACKAGE),
    wanted=lambda k, path: (path.endswith(".svg") and "/" not in path) if k == 0 else (
        path == "en/data.json"),
    read=read_twemoji,
    license="CC-BY-4.0 (graphics); MIT (emojibase-data names and tags)",
    origin="https://github.com/jdecked/twemoji (npm @twemoji/svg, emojibase-data)")
