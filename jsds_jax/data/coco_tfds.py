"""tfds `coco_captions` (COCO 2014 in Karpathy's splits) -> `RetrievalSplit`, by random access.

The dataset must already be prepared in `data_dir` (`tfds build coco_captions --data_dir=...`,
which fetches the COCO 2014 zips, tens of GB): nothing is downloaded unless `download=True`.

Records are read through `tfds.data_source` (ArrayRecord random access, no tf.data pipeline)
with the image left encoded (`SkipDecoding`): listing ids and captions then parses each record
without decoding its JPEG, and `load_image` decodes one image with Pillow when asked.

TensorFlow is an optional extra (`pip install -e ".[tfds]"`): tfds needs it to construct any
builder, so it is imported here, inside the function, and nowhere else in the library.
"""

from collections.abc import Sequence
import importlib.util
import os
from typing import Any

import numpy as np
from tqdm import tqdm

from jsds_jax.data.images import decode_image
from jsds_jax.data.split import BadItemError
from jsds_jax.data.split import RetrievalSplit

DATASET = "coco_captions/2014"
SPLITS = ("train", "val", "test", "restval")
# Records read per `__getitems__` call while listing a split (ArrayRecord reads them in parallel).
_CHUNK = 512


_INSTALL = ("the tfds coco_captions source needs tensorflow-datasets and TensorFlow, an "
            "optional extra: pip install -e \".[tfds]\"")


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"{_INSTALL} ({e})") from e
  # tfds itself imports without TensorFlow and only fails later, inside the builder.
  if importlib.util.find_spec("tensorflow") is None:
    raise ImportError(f"{_INSTALL} (TensorFlow is not installed)")
  return tfds


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class _TfdsImages:
  """`load_image` of a tfds split: i -> the decoded image of record i."""

  def __init__(self, source: Sequence[dict[str, Any]], sources: Sequence[str]):
    self.source = source
    self.sources = sources

  def __call__(self, i: int) -> np.ndarray:
    image = self.source[i]["image"]
    if isinstance(image, np.ndarray) and image.ndim == 3:  # already decoded by tfds
      return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
    return decode_image(bytes(image), self.sources[i])


class _Subset:
  """Records `keys` of a data source, re-indexed from 0 (images that kept a caption)."""

  def __init__(self, source: Sequence[Any], keys: Sequence[int]):
    self.source = source
    self.keys = list(keys)

  def __getitem__(self, i: int) -> Any:
    return self.source[self.keys[i]]

  def __len__(self) -> int:
    return len(self.keys)


def tfds_split_name(split: str, karpathy: bool = True) -> str:
  """The tfds split expression for one of our splits: Karpathy train is "train+restval"."""
  if split not in SPLITS:
    raise ValueError(f"coco_captions has splits {SPLITS}, got {split!r}")
  return "train+restval" if split == "train" and karpathy else split


def load_coco_tfds(split: str, data_dir: str | os.PathLike | None = None,
                   karpathy: bool = True, download: bool = False,
                   skip_bad: bool = False) -> RetrievalSplit:
  """Loads one split of tfds `coco_captions/2014`.

  Args:
    split: "train", "val", "test" or "restval" (Karpathy & Fei-Fei's splits, as tfds has them).
    data_dir: the tfds data folder (None: tfds' default, ~/tensorflow_datasets).
    karpathy: with `split="train"`, also take "restval", giving the standard 113,287-image
      Karpathy training set; False gives tfds' "train" alone (the 82,783 COCO train2014 images).
    download: let tfds download and prepare the dataset if it is not in `data_dir`.
    skip_bad: drop empty captions (and images left without one) instead of raising.

  Returns:
    The split; image ids are `str(image/id)` (the COCO id), sources "tfds:<id>". The order is
    the order of the tfds records.

  Raises:
    ImportError: tensorflow-datasets / TensorFlow are not installed.
    FileNotFoundError: the dataset is not prepared in `data_dir` and `download` is False.
    BadItemError: an empty caption or a repeated image id.
  """
  tfds_split = tfds_split_name(split, karpathy)
  tfds = _import_tfds()
  try:
    source = tfds.data_source(
        DATASET, split=tfds_split, data_dir=data_dir, download=download,
        decoders={"image": tfds.decode.SkipDecoding()})
  except Exception as e:  # pylint: disable=broad-except
    if download or isinstance(e, ImportError):
      raise
    where = data_dir or "tfds' default data_dir (~/tensorflow_datasets)"
    raise FileNotFoundError(
        f"tfds {DATASET} (split {tfds_split}) could not be opened in {where}: "
        f"{type(e).__name__}: {e}. Prepare it first with `tfds build coco_captions "
        f"--data_dir={data_dir or '<dir>'}` or pass download=True.") from e

  image_ids: list[str] = []
  sources: list[str] = []
  captions: list[str] = []
  caption_image: list[int] = []
  keep: list[int] = []
  # Listing parses every record once (reading, not decoding, its image bytes).
  for start in tqdm(range(0, len(source), _CHUNK), desc=f"list {DATASET} {tfds_split}",
                    unit=" chunks", disable=len(source) < 20 * _CHUNK, mininterval=5):
    keys = list(range(start, min(start + _CHUNK, len(source))))
    for key, example in zip(keys, source.__getitems__(keys)):
      image_id = str(int(example["image/id"]))
      texts = [_text(t).strip() for t in example["captions"]["text"]]
      good = [t for t in texts if t]
      if len(good) != len(texts) and not skip_bad:
        raise BadItemError(f"tfds {DATASET} {tfds_split}: record {key} (image id {image_id}) "
                           "has an empty caption; pass skip_bad=True to drop it")
      if not good:
        continue
      caption_image.extend([len(image_ids)] * len(good))
      captions.extend(good)
      image_ids.append(image_id)
      sources.append(f"tfds:{image_id}")
      keep.append(key)
  if len(set(image_ids)) != len(image_ids):
    raise BadItemError(f"tfds {DATASET} {tfds_split}: image ids repeat")

  all_kept = len(keep) == len(source)
  return RetrievalSplit(
      dataset="coco",
      split=split,
      image_ids=image_ids,
      captions=captions,
      caption_image_index=np.asarray(caption_image, dtype=np.int64),
      load_image=_TfdsImages(source if all_kept else _Subset(source, keep), sources),
      image_sources=sources,
  )

