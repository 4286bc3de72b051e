"""One split of an image-caption retrieval dataset, whatever its source."""

from collections.abc import Callable, Iterator, Sequence
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class RetrievalSplit:
  """Images, captions and which image each caption describes.

  Every source (Karpathy JSON + image folder, tfds coco_captions, the demo data, the generated
  test data) is turned into this, so `encode` and `eval` see one shape of data.

  Attributes:
    dataset: dataset name, e.g. "coco", "demo", recorded in cache metadata.
    split: "train" | "val" | "test" (or "restval" for Karpathy COCO).
    image_ids: (N_images,) stable string ids, unique within the split.
    captions: (N_captions,) caption strings, never empty.
    caption_image_index: (N_captions,) int64, caption c describes image
      image_ids[caption_image_index[c]].
    load_image: i -> (H, W, 3) uint8 RGB array of image i; raises `BadItemError` naming the file
      (or record) when the image cannot be read.
    image_sources: (N_images,) where each image comes from (a file path, or "tfds:<id>"), used
      in error messages and metadata.
  """

  dataset: str
  split: str
  image_ids: Sequence[str]
  captions: Sequence[str]
  caption_image_index: np.ndarray
  load_image: Callable[[int], np.ndarray]
  image_sources: Sequence[str]

  @property
  def num_images(self) -> int:
    return len(self.image_ids)

  @property
  def num_captions(self) -> int:
    return len(self.captions)

  def examples(self) -> Iterator[tuple[np.ndarray, str, str]]:
    """Yields (image, caption, image_id) for every caption, in caption order."""
    for c, caption in enumerate(self.captions):
      i = int(self.caption_image_index[c])
      yield self.load_image(i), caption, self.image_ids[i]


class BadItemError(ValueError):
  """An image, caption or annotation record that cannot be used; the message names it."""
