"""Karpathy-format caption JSON + an image folder -> `RetrievalSplit`, and the writer for it.

The format (Karpathy & Fei-Fei 2015, `dataset_coco.json` / `dataset_flickr30k.json`):

  {"dataset": "coco",
   "images": [{"filepath": "val2014",              # optional subfolder of the image root
               "filename": "COCO_val2014_000000391895.jpg",
               "split": "train" | "val" | "test" | "restval",
               "imgid": 0, "cocoid": 391895,       # cocoid only in COCO
               "sentids": [770337, ...],
               "sentences": [{"raw": "A man ...", "tokens": ["a", "man", ...],
                              "imgid": 0, "sentid": 770337}, ...]},
              ...]}

The image of a record is `<image_root>/<filepath>/<filename>`; its id is `str(cocoid)`, else
`str(imgid)`, else the filename. Karpathy COCO trains on "train" + "restval" (113,287 images),
which is what `split="train"` gives for a "coco" file unless `include_restval=False`.

Problems with the data are reported with the JSON file, the record index (`images[12]`) and the
field, all of a split's at once (the first few and a count; unreadable image files too, see
`validate`). With `skip_bad=True`, bad captions and images are dropped instead and counted;
structural problems (invalid JSON, no "images" list, a record without "split", duplicate ids)
still raise.
`load_karpathy_with_skips` returns those counts; `load_karpathy` logs them.
"""

import collections
from collections.abc import Mapping, Sequence
import json
import os
import pathlib
import re
from typing import Any

from absl import logging
import numpy as np

from jsds_jax import atomic
from jsds_jax.data import validate
from jsds_jax.data.images import read_image
from jsds_jax.data.split import BadItemError
from jsds_jax.data.split import RetrievalSplit

# How many missing files an error message lists before it only counts them.
_SHOW_MISSING = 5

# Keys of the counts `load_karpathy_with_skips` returns.
SKIP_KEYS = ("bad_records", "bad_captions", "empty_captions", "missing_images",
             "images_without_captions")


class _ImageFiles:
  """`load_image` of a Karpathy split: i -> read_image(paths[i]); picklable for worker pools."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)

  def __call__(self, i: int) -> np.ndarray:
    return read_image(self.paths[i])


def read_karpathy_json(json_path: str | os.PathLike) -> dict[str, Any]:
  """Parses a Karpathy JSON file and checks its top level.

  Raises:
    FileNotFoundError: the file does not exist.
    BadItemError: invalid JSON (with line and column), or no "images" list.
  """
  path = os.fspath(json_path)
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError as e:
    raise FileNotFoundError(f"Karpathy caption file not found: {path}") from e
  try:
    data = json.loads(raw)
  except json.JSONDecodeError as e:
    raise BadItemError(
        f"{path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
  except UnicodeDecodeError as e:
    raise BadItemError(f"{path}: not UTF-8 text ({e})") from e
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    got = sorted(data) if isinstance(data, dict) else type(data).__name__
    raise BadItemError(
        f'{path}: expected a JSON object with an "images" list (Karpathy format), got {got}')
  return data


def _image_id(record: Mapping[str, Any]) -> tuple[str, str]:
  """(id, the field it came from): cocoid, else imgid, else the filename."""
  for key in ("cocoid", "imgid"):
    if record.get(key) is not None:
      return str(record[key]), key
  return str(record["filename"]), "filename"


def _record_problem(record: Mapping[str, Any]) -> str | None:
  """What makes a record unusable as a whole (a missing/mistyped field), or None."""
  filename = record.get("filename")
  if not isinstance(filename, str) or not filename.strip():
    return "has no 'filename' (a non-empty string)"
  if "filepath" in record and not isinstance(record["filepath"], str):
    return "has a 'filepath' that is not a string"
  sentences = record.get("sentences")
  if not isinstance(sentences, list):
    return "has no 'sentences' list"
  if not sentences:
    return "has an empty 'sentences' list (no captions)"
  return None


def _caption(sentence: Any) -> tuple[str | None, str]:
  """(stripped caption or None, why it is unusable)."""
  if not isinstance(sentence, dict) or not isinstance(sentence.get("raw"), str):
    return None, "has no 'raw' caption string"
  text = sentence["raw"].strip()
  if not text:
    return None, "is an empty or whitespace-only caption"
  return text, ""


def find_missing_files(paths: Sequence[str]) -> list[int]:
  """Indices of `paths` that do not exist, listing each directory once instead of one stat each.

  One `listdir` per folder keeps this cheap for 100k images, also on network file systems.
  """
  listings: dict[str, set[str] | None] = {}
  missing = []
  for i, path in enumerate(paths):
    folder, name = os.path.split(path)
    if folder not in listings:
      try:
        listings[folder] = set(os.listdir(folder or "."))
      except OSError:
        listings[folder] = None
    listing = listings[folder]
    if listing is None or name not in listing:
      missing.append(i)
  return missing


def _describe_folder(folder: str) -> str:
  if not os.path.isdir(folder):
    return f"the folder {folder} does not exist"
  entries = sorted(os.listdir(folder))
  sample = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
  return f"the folder {folder} holds {len(entries)} entries ({sample or 'none'})"


def _missing_message(json_path: str, split: str, image_root: str, paths: Sequence[str],
                     missing: Sequence[int], record_index: Sequence[int]) -> str:
  shown = "; ".join(f"images[{record_index[m]}] -> {paths[m]}"
                    for m in missing[:_SHOW_MISSING])
  more = f" and {len(missing) - _SHOW_MISSING} more" if len(missing) > _SHOW_MISSING else ""
  message = (f"{json_path}: {len(missing)} of {len(paths)} image files of split '{split}' do not "
             f"exist under image_root {image_root}: {shown}{more}.")
  if 2 * len(missing) >= len(paths):
    message += (
        f" {'All' if len(missing) == len(paths) else 'Most'} of them are missing, so image_root "
        "is probably wrong: images are looked up at <image_root>/<filepath>/<filename>, e.g. "
        f"{paths[missing[0]]}, and {_describe_folder(os.path.dirname(paths[missing[0]]))}.")
  return message


def load_karpathy_with_skips(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    split: str,
    dataset_name: str | None = None,
    skip_bad: bool = False,
    include_restval: bool | None = None,
    check_images: bool = True,
) -> tuple[RetrievalSplit, dict[str, int]]:
  """Loads one split of a Karpathy JSON and its image folder.

  Args:
    json_path: the caption file.
    image_root: the folder holding `<filepath>/<filename>` of every record.
    split: "train", "val", "test", "restval" or any split name the file uses.
    dataset_name: `RetrievalSplit.dataset`; None takes the file's "dataset" field, else
      "karpathy".
    skip_bad: drop bad captions, records and missing images (and images left without
      captions) instead of raising.
    include_restval: whether `split="train"` also takes the "restval" records; None means yes
      for a file whose "dataset" is "coco" (the standard 113k Karpathy train set).
    check_images: without `skip_bad`, also open every image file of the split
      (`validate.image_problem`) so that unreadable images are reported with the other
      problems, before any encoding.

  Returns:
    (the split, counts of what was skipped under the keys in `SKIP_KEYS`; all zero when
    `skip_bad=False`). Captions keep the file's order, stripped of surrounding whitespace.

  Raises:
    FileNotFoundError: the JSON file does not exist.
    BadItemError: problems with the data; the message names the file and, for every bad item
      (the first `validate.MAX_SHOWN` and a count), its record and field.
    ValueError: `split` is not in the file (the message lists those that are).
  """
  path = os.fspath(json_path)
  root = os.fspath(image_root)
  data = read_karpathy_json(path)
  records = data["images"]

  split_counts = collections.Counter()
  for r, record in enumerate(records):
    if not isinstance(record, dict):
      raise BadItemError(f"{path}: images[{r}] is a {type(record).__name__}, expected an object")
    if not isinstance(record.get("split"), str):
      raise BadItemError(f"{path}: images[{r}] has no 'split' field (a string)")
    split_counts[record["split"]] += 1
  if split not in split_counts:
    available = ", ".join(f"{name} ({n} images)" for name, n in sorted(split_counts.items()))
    raise ValueError(f"{path}: no split {split!r}; the file has: {available or 'no records'}")
  if include_restval is None:
    include_restval = data.get("dataset") == "coco"
  wanted = {split} | ({"restval"} if split == "train" and include_restval else set())

  skipped = dict.fromkeys(SKIP_KEYS, 0)
  problems = []  # without skip_bad: every bad item, reported together at the end
  record_index, paths, image_ids, captions_per_image = [], [], [], []
  id_owner: dict[str, int] = {}
  for r, record in enumerate(records):
    if record["split"] not in wanted:
      continue
    problem = _record_problem(record)
    if problem:
      if not skip_bad:
        problems.append(f"images[{r}] {problem}")
      skipped["bad_records"] += 1
      continue
    captions = []
    for s, sentence in enumerate(record["sentences"]):
      text, why = _caption(sentence)
      if text is None:
        if not skip_bad:
          problems.append(f"images[{r}] ({record['filename']}) sentences[{s}].raw {why}")
        skipped["empty_captions" if "empty" in why else "bad_captions"] += 1
        continue
      captions.append(text)
    image_id, id_field = _image_id(record)
    if image_id in id_owner:
      duplicate = (f"images[{id_owner[image_id]}] and images[{r}] have the same image id "
                   f"{image_id!r} (from '{id_field}'); ids must be unique within a split")
      if skip_bad:  # structural: no item to drop
        raise BadItemError(f"{path}: {duplicate}")
      problems.append(duplicate)
      continue
    id_owner[image_id] = r
    record_index.append(r)
    paths.append(os.path.join(root, record.get("filepath", ""), record["filename"]))
    image_ids.append(image_id)
    captions_per_image.append(captions)

  missing = find_missing_files(paths)
  if missing and not skip_bad:
    message = _missing_message(path, split, root, paths, missing, record_index)
    if 2 * len(missing) >= len(paths):  # a wrong image_root: nothing else is worth listing
      raise BadItemError(message + " Pass skip_bad=True to drop missing images instead.")
    problems.append(message[len(path) + 2:])
  skipped["missing_images"] = len(missing)
  missing_set = set(missing)
  if not skip_bad and check_images:
    present = [i for i in range(len(paths)) if i not in missing_set]
    for j, why in validate.unreadable_images([paths[i] for i in present]):
      problems.append(f"images[{record_index[present[j]]}] ({paths[present[j]]}) {why}")
  if problems:
    raise BadItemError(validate.problems_message(path, split, problems))

  kept_ids, kept_paths, captions, caption_image = [], [], [], []
  for i, (image_id, image_path, image_captions) in enumerate(
      zip(image_ids, paths, captions_per_image)):
    if i in missing_set:
      continue
    if not image_captions:
      skipped["images_without_captions"] += 1
      continue
    caption_image.extend([len(kept_ids)] * len(image_captions))
    captions.extend(image_captions)
    kept_ids.append(image_id)
    kept_paths.append(image_path)

  if not kept_ids:
    raise BadItemError(f"{path}: split {split!r} has no usable image after skipping bad items "
                       f"({skipped})")
  result = RetrievalSplit(
      dataset=dataset_name or data.get("dataset") or "karpathy",
      split=split,
      image_ids=kept_ids,
      captions=captions,
      caption_image_index=np.asarray(caption_image, dtype=np.int64),
      load_image=_ImageFiles(kept_paths),
      image_sources=kept_paths,
  )
  return result, skipped


def load_karpathy(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    split: str,
    dataset_name: str | None = None,
    skip_bad: bool = False,
    include_restval: bool | None = None,
    check_images: bool = True,
) -> RetrievalSplit:
  """`load_karpathy_with_skips` that logs what it skipped and returns only the split."""
  result, skipped = load_karpathy_with_skips(
      json_path, image_root, split, dataset_name=dataset_name, skip_bad=skip_bad,
      include_restval=include_restval, check_images=check_images)
  if any(skipped.values()):
    logging.warning("%s split %r: skipped %s", os.fspath(json_path), split,
                    {k: v for k, v in skipped.items() if v})
  return result


def tokenize(caption: str) -> list[str]:
  """Lower-case word tokens, as in Karpathy's "tokens" field (punctuation dropped)."""
  return re.findall(r"[^\W_]+(?:'[^\W_]+)?", caption.lower())


def make_record(filename: str, split: str, captions: Sequence[str], imgid: int,
                first_sentid: int, filepath: str | None = None) -> dict[str, Any]:
  """One Karpathy "images" entry; sentence ids run from `first_sentid`."""
  sentids = list(range(first_sentid, first_sentid + len(captions)))
  record: dict[str, Any] = {}
  if filepath is not None:
    record["filepath"] = filepath
  record.update(
      filename=filename, split=split, imgid=imgid, sentids=sentids,
      sentences=[{"raw": text, "tokens": tokenize(text), "imgid": imgid, "sentid": sentid}
                 for text, sentid in zip(captions, sentids)])
  return record


def write_karpathy(path: str | os.PathLike, records: Sequence[Mapping[str, Any]],
                   dataset: str = "karpathy") -> pathlib.Path:
  """Writes a Karpathy JSON atomically: a temporary file in the same folder, then a rename.

  Args:
    path: the JSON file to write; its folder is created.
    records: the "images" entries (see `make_record`); each needs "filename", "split" and a
      "sentences" list of {"raw": ...}.
    dataset: the "dataset" field.

  Returns:
    The written path.
  """
  path = pathlib.Path(path)
  for r, record in enumerate(records):
    if not isinstance(record.get("split"), str) or _record_problem(record):
      raise ValueError(f"records[{r}] is not a Karpathy record: "
                       f"{_record_problem(record) or 'has no split'}")
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic.write_json(path, {"images": list(records), "dataset": dataset}, ensure_ascii=False)
  return path
