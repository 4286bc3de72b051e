"""Captions from icon and emoji metadata: names split into words, tag lists joined.

Icon sets name pictures by identifiers ("account-network-outline", "alarmClockCheck",
"a_b_2") and describe them by tag lists; a text tower reads words, so identifiers are split
into lower-case words and tags are joined into one comma-separated caption with repeats
(case-insensitive, and words the name already says) dropped, and cut to a few tags so that the
caption fits the text tower's token budget.
"""

from collections.abc import Iterable
import re

# Splits "alarmClock" / "HTTPServer" / "a2b" into words: a case change or a letter/digit border.
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])|(?<=[A-Za-z])(?=[0-9])|"
                    r"(?<=[0-9])(?=[A-Za-z])")
_SEPARATORS = re.compile(r"[-_./\\]+")
_SPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
  """Collapses runs of whitespace to one space and strips the ends."""
  return _SPACE.sub(" ", text).strip()


def split_name(name: str) -> str:
  """An identifier as lower-case words: "account-network-outline" -> "account network outline",
  "alarmClockCheck" -> "alarm clock check", "a_b_2" -> "a b 2", "arrow2x" -> "arrow 2 x"."""
  words = []
  for part in _SEPARATORS.split(name):
    words.extend(_CAMEL.sub(" ", part).split())
  return " ".join(word.lower() for word in words)


def join_tags(tags: Iterable[str], exclude: Iterable[str] = (), max_tags: int = 10) -> str:
  """Tags as one caption: "face, grin, happy, smile".

  Args:
    tags: tag strings; identifiers among them ("text-align") are split into words, blank ones
      dropped.
    exclude: captions already given (e.g. the split name); a tag equal to one of them, or to
      one of their words, is dropped because it would add nothing.
    max_tags: keep at most this many tags, in their given order (the packages list the most
      telling first or alphabetically; either way a caption has to stop somewhere).

  Returns:
    The joined tags, or "" when none is left.
  """
  seen = set()
  for text in exclude:
    words = clean_text(text).lower()
    seen.add(words)
    seen.update(re.findall(r"\w+", words))  # "keycap: 1" says "keycap" and "1"
  kept = []
  for tag in tags:
    tag = clean_text(str(tag))  # some packages list numbers among their tags
    words = split_name(tag) if re.fullmatch(r"[\w-]+", tag) else tag.lower()
    if not words or words in seen:
      continue
    seen.add(words)
    kept.append(words)
    if len(kept) == max_tags:
      break
  return ", ".join(kept)


def unique_captions(captions: Iterable[str]) -> tuple[str, ...]:
  """Non-empty captions, whitespace cleaned, without case-insensitive repeats, in order."""
  out, seen = [], set()
  for caption in captions:
    text = clean_text(caption)
    if text and text.lower() not in seen:
      seen.add(text.lower())
      out.append(text)
  return tuple(out)
