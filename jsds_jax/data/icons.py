"""Icon-set sources: line and glyph icons with names and tags.

  tabler   npm `@tabler/icons` (MIT): icons/outline/<name>.svg and icons/filled/<name>.svg,
           icons.json {name: {category, tags, styles}}. ~5,500 outline + ~1,050 filled.
  mdi      npm `@mdi/svg` (Apache-2.0, Pictogrammers): svg/<name>.svg and meta.json (aliases,
           tags, and `baseIconId`, which ties "account-network-outline" and
           "account-network-check" to "account-network"). ~7,400.
  lucide   npm `lucide-static` (ISC): icons/<name>.svg and tags.json {name: [tags]}. ~1,900;
           the ~270 other SVG files are old names kept as aliases (copies of a listed icon),
           left out so that one picture does not sit in two splits under two names.

Captions per icon: its name as words ("account network outline") and, when the set gives any,
its tags and aliases joined ("user network, person network, account, user"). Filled tabler
icons get only their name plus "filled": their tags are the outline's. The concept is the
name's words (for mdi the base icon's), so a filled and an outline icon, an mdi icon and its
variants, and "heart" in two sets, share a split.
"""

from collections.abc import Sequence
import json

from jsds_jax.data import captions as cap
from jsds_jax.data.corpus_source import decode_svg
from jsds_jax.data.corpus_source import Files
from jsds_jax.data.corpus_source import icon_concept
from jsds_jax.data.corpus_source import Item
from jsds_jax.data.corpus_source import Source

TABLER_PACKAGE = "@tabler/icons@3.52.0"
MDI_PACKAGE = "@mdi/svg@7.4.47"
LUCIDE_PACKAGE = "lucide-static@1.62.0"
MAX_TAGS = 10


def _listed_without_svg(source: str, name: str, path: str, meta_file: str) -> str:
  return f"{source} {name}: in {meta_file} but {path} is not in the package"


def read_tabler(packages: Sequence[Files]) -> tuple[list[Item], list[str]]:
  """Items of @tabler/icons: icons.json + icons/{outline,filled}/*.svg."""
  files = packages[0]
  if "icons.json" not in files:
    return [], ["tabler: the package has no icons.json (names and tags)"]
  meta = json.loads(files["icons.json"])
  items, bad, listed = [], [], set()
  for name, entry in sorted(meta.items()):
    words = cap.split_name(name)
    if not words:
      bad.append(f"tabler {name!r}: the name has no words")
      continue
    for style in sorted(entry.get("styles") or {"outline": {}}):
      path = f"icons/{style}/{name}.svg"
      listed.add(path)
      if path not in files:
        bad.append(_listed_without_svg("tabler", f"{style}/{name}", path, "icons.json"))
        continue
      if style == "outline":
        tags = list(entry.get("tags") or []) + [str(entry.get("category") or "")]
        captions = [words, cap.join_tags(tags, exclude=[words], max_tags=MAX_TAGS)]
      else:
        captions = [f"{words} {style}"]
      items.append(Item(f"{style}/{name}", icon_concept(words), cap.unique_captions(captions),
                        decode_svg(files[path])))
  for path in sorted(p for p in files if p.endswith(".svg") and p not in listed):
    bad.append(f"tabler {path}: no entry in icons.json (no name)")
  return items, bad


def read_mdi(packages: Sequence[Files]) -> tuple[list[Item], list[str]]:
  """Items of @mdi/svg: meta.json + svg/*.svg."""
  files = packages[0]
  if "meta.json" not in files:
    return [], ["mdi: the package has no meta.json (names and tags)"]
  meta = json.loads(files["meta.json"])
  name_of = {entry.get("id"): entry.get("name") for entry in meta}
  items, bad, listed = [], [], set()
  for entry in sorted(meta, key=lambda e: str(e.get("name"))):
    name = str(entry.get("name") or "")
    path = f"svg/{name}.svg"
    listed.add(path)
    words = cap.split_name(name)
    if not words:
      bad.append(f"mdi {entry.get('id')}: no name in meta.json")
      continue
    if path not in files:
      bad.append(_listed_without_svg("mdi", name, path, "meta.json"))
      continue
    # "Account / User" is two tags; aliases are other names for the same picture.
    tags = list(entry.get("aliases") or [])
    for tag in entry.get("tags") or []:
      tags.extend(part for part in str(tag).split("/"))
    captions = [words, cap.join_tags(tags, exclude=[words], max_tags=MAX_TAGS)]
    base = cap.split_name(str(name_of.get(entry.get("baseIconId")) or name)) or words
    items.append(Item(name, icon_concept(base), cap.unique_captions(captions),
                      decode_svg(files[path])))
  for path in sorted(p for p in files if p.endswith(".svg") and p not in listed):
    bad.append(f"mdi {path}: no entry in meta.json (no name)")
  return items, bad


def read_lucide(packages: Sequence[Files]) -> tuple[list[Item], list[str]]:
  """Items of lucide-static: tags.json + icons/*.svg."""
  files = packages[0]
  if "tags.json" not in files:
    return [], ["lucide: the package has no tags.json (names and tags)"]
  meta = json.loads(files["tags.json"])
  items, bad, listed = [], [], set()
  for name, tags in sorted(meta.items()):
    path = f"icons/{name}.svg"
    listed.add(path)
    words = cap.split_name(name)
    if not words:
      bad.append(f"lucide {name!r}: the name has no words")
      continue
    if path not in files:
      bad.append(_listed_without_svg("lucide", name, path, "tags.json"))
      continue
    captions = [words, cap.join_tags(list(tags or []), exclude=[words], max_tags=MAX_TAGS)]
    items.append(Item(name, icon_concept(words), cap.unique_captions(captions),
                      decode_svg(files[path])))
  for path in sorted(p for p in files if p.startswith("icons/") and p not in listed):
    bad.append(f"lucide {path}: no entry in tags.json (an alias file of a renamed icon)")
  return items, bad


TABLER = Source(
    name="tabler",
    packages=(TABLER_PACKAGE,),
    wanted=lambda k, path: path == "icons.json" or (
        path.startswith(("icons/outline/", "icons/filled/")) and path.endswith(".svg")),
    read=read_tabler,
    license="MIT",
    origin="https://tabler.io/icons (npm @tabler/icons)")

MDI = Source(
    name="mdi",
    packages=(MDI_PACKAGE,),
    wanted=lambda k, path: path == "meta.json" or (
        path.startswith("svg/") and path.endswith(".svg")),
    read=read_mdi,
    license="Apache-2.0",
    origin="https://pictogrammers.com/library/mdi (npm @mdi/svg)")

LUCIDE = Source(
    name="lucide",
    packages=(LUCIDE_PACKAGE,),
    wanted=lambda k, path: path == "tags.json" or (
        path.startswith("icons/") and path.endswith(".svg")),
    read=read_lucide,
    license="ISC",
    origin="https://lucide.dev (npm lucide-static)")
