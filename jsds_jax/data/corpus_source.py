"""What a corpus source is: npm packages in, captioned SVG pictures (`Item`s) out.

A source names its packages (pinned `name@version`, so a corpus is the same wherever it is
built), which of their files it needs, and a pure `read` function from those files to items and
to a list of the items it had to leave out, each named with the reason. Licence and origin are
recorded with every item of the built corpus.

Every item has a `concept`: the split is a hash of it (see corpus.py), so pictures of one thing
that differ only in drawing -- the same emoji by two designers, an icon outline and filled, the
five skin tones of a hand -- land in the same split and a test picture is never a restyled
training picture.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses

# Files of each package that a source reads, by path below the tarball's "package/" folder.
Files = Mapping[str, bytes]

# Unicode's emoji modifiers (skin tones) and the emoji presentation selector: dropping them
# from a code point sequence leaves the base emoji a picture belongs to.
_MODIFIERS = {"FE0F", "1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}


@dataclasses.dataclass(frozen=True)
class Item:
  """One picture of a source.

  Attributes:
    key: stable id within the source, also its file name without suffix (may hold "/").
    concept: what the picture shows, shared by pictures that must share a split.
    captions: one or more English captions, cleaned (see captions.py), never empty.
    svg: the SVG document.
  """

  key: str
  concept: str
  captions: tuple[str, ...]
  svg: str


@dataclasses.dataclass(frozen=True)
class Source:
  """A corpus source.

  Attributes:
    name: short name, the `source` field of its records ("openmoji").
    packages: npm specs `name@version`, in the order `read` receives their files.
    wanted: (package index, path) -> whether `read` needs that file.
    read: [files of each package] -> (items, messages naming each left-out item and why).
    license: SPDX id(s) of the pictures' licence, with the metadata's if it differs.
    origin: where the pictures come from (project page).
  """

  name: str
  packages: tuple[str, ...]
  wanted: Callable[[int, str], bool]
  read: Callable[[Sequence[Files]], tuple[list[Item], list[str]]]
  license: str
  origin: str


def emoji_concept(hexcode: str) -> str:
  """The concept of an emoji picture: its code points without skin tones and FE0F.

  "1F44B-1F3FB" (waving hand: light skin tone) -> "emoji:1F44B"; "2764-FE0F" -> "emoji:2764".
  """
  points = [p.upper() for p in hexcode.replace("_", "-").split("-") if p]
  kept = [p for p in points if p not in _MODIFIERS] or points
  return "emoji:" + "-".join(kept)


def icon_concept(words: str) -> str:
  """The concept of an icon: its name as words, so "heart" in two icon sets is one concept."""
  return "icon:" + words


def decode_svg(data: bytes) -> str:
  """An SVG file's text (UTF-8, a byte order mark dropped)."""
  return data.decode("utf-8-sig", errors="replace")
