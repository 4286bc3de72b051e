"""The training input path: the [CLS] feature cache on the devices, batches gathered there.

Placement. The train split's `image_pooled`, `text_pooled` and `caption_image_index` are put on
the devices once, REPLICATED over the 'data' mesh axis, and every step gathers its rows with
`jnp.take` inside the jitted step: per step only the epoch's index table is read (it is put on
the devices once per epoch), never features. Replicated rather than sharded because the gather
is then local to each device: with the cache sharded, a device's batch rows would live on other
devices and every step would need an all-to-all of B × D features. The [CLS] cache is small
(COCO train, 768-d: 566k captions + 113k images ≈ 2.1 GB in float32, half in bfloat16, see
`load_device_features(dtype=...)`), well inside one accelerator's memory. The `last_block`
cache (~100 GB) is a different path (streamed from the host) and is not handled here.

Batches. Two captions of the same image must never meet as negatives, so every batch holds B
DISTINCT images: per epoch the images are permuted, each image contributes one caption drawn
uniformly from its own, and consecutive runs of B images form the steps (the last partial batch
is dropped). An epoch therefore visits every image once (N_images // B steps) and every caption
1/n_img times in expectation. The official code (holi-lab/mm-sparse-retrieval
`data_module.py`) instead shuffles all (caption, image) pairs with a PyTorch DataLoader: an
epoch visits every caption once (≈ 5× as many steps on COCO) and a batch of 256 from COCO's
566k captions holds on average 256·255/2 · 4/566k ≈ 0.23 same-image pairs, each a false
negative. Our epoch is ~1/5 of theirs: to match their optimizer-step count, multiply the epoch
count by the mean captions per image.

Order. `epoch_order(seed, epoch, ...)` is a pure function: numpy's PCG64 seeded with
SeedSequence([seed, epoch]), so a run resumed at data position (epoch, step_in_epoch) sees
exactly the batches it would have seen (numpy keeps Generator streams stable within a release;
a numpy upgrade mid-run may change the order after a resume, not its properties).
"""

from collections.abc import Mapping
import dataclasses
import os
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jsds_jax.data import feature_cache

DATA_AXIS = "data"


@flax.struct.dataclass
class DeviceFeatures:
  """One split's [CLS] cache, on the devices.

  Attributes:
    image_pooled: (N_images, D_img) h of every image.
    text_pooled: (N_captions, D_txt) h of every caption.
    caption_image_index: (N_captions,) int32, caption -> image row.
  """

  image_pooled: jax.Array
  text_pooled: jax.Array
  caption_image_index: jax.Array

  @property
  def num_images(self) -> int:
    return self.image_pooled.shape[0]

  @property
  def num_captions(self) -> int:
    return self.text_pooled.shape[0]


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _put_replicated(array: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  # make_array_from_callback works on multi-host meshes too: each process fills its own
  # devices from its own (identical) copy of the cache.
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, replicated(mesh), lambda idx: array[idx])


def device_features(image_pooled: Any, text_pooled: Any, caption_image_index: Any,
                    mesh: jax.sharding.Mesh, dtype: Optional[Any] = None) -> DeviceFeatures:
  """Puts a split's arrays on every device of `mesh` (replicated).

  Args:
    image_pooled: (N_images, D_img) host array (a memmap is fine: it is read once).
    text_pooled: (N_captions, D_txt).
    caption_image_index: (N_captions,) ints in [0, N_images).
    mesh: a mesh with a 'data' axis.
    dtype: storage dtype of the features on the devices (None keeps the cache's; bfloat16
      halves the memory, and the tail's first matmul reads them in its own dtype).

  Returns:
    The `DeviceFeatures`.
  """
  cap_img = np.asarray(caption_image_index)
  n_img = int(np.shape(image_pooled)[0])
  if cap_img.size and (cap_img.min() < 0 or cap_img.max() >= n_img):
    raise ValueError(f"caption_image_index must lie in [0, {n_img})")
  if cap_img.shape[0] != np.shape(text_pooled)[0]:
    raise ValueError(f"{cap_img.shape[0]} caption_image_index entries for "
                     f"{np.shape(text_pooled)[0]} captions")
  cast = (lambda x: np.asarray(x)) if dtype is None else (lambda x: np.asarray(x, dtype))
  return DeviceFeatures(image_pooled=_put_replicated(cast(image_pooled), mesh),
                        text_pooled=_put_replicated(cast(text_pooled), mesh),
                        caption_image_index=_put_replicated(cap_img.astype(np.int32), mesh))


def load_device_features(directory: str | os.PathLike, mesh: jax.sharding.Mesh,
                         dtype: Optional[Any] = None) -> DeviceFeatures:
  """Reads a split's [CLS] cache (`feature_cache.load_split`) onto the devices."""
  split = feature_cache.load_split(directory, mmap=True)
  return device_features(split["image_pooled"], split["text_pooled"],
                         split["caption_image_index"], mesh, dtype)


def steps_per_epoch(num_images: int, batch_size: int) -> int:
  """Steps in one epoch: every image once, the last partial batch dropped."""
  steps = num_images // batch_size
  if steps == 0:
    raise ValueError(f"batch size {batch_size} exceeds the {num_images} training images: a "
                     "batch holds distinct images")
  return steps


def epoch_order(seed: int, epoch: int, caption_image_index: Any, batch_size: int) -> np.ndarray:
  """The caption indices of every step of one epoch; a pure function of its arguments.

  Args:
    seed: the run's data seed.
    epoch: 0-based epoch.
    caption_image_index: (N_captions,) caption -> image row.
    batch_size: B, the global batch.

  Returns:
    (steps_per_epoch, B) int32 caption indices; the B captions of a row belong to B distinct
    images, and every image appears in at most one row.
  """
  cap_img = np.asarray(caption_image_index, np.int64)
  num_images = int(cap_img.max()) + 1 if cap_img.size else 0
  steps = steps_per_epoch(num_images, batch_size)
  counts = np.bincount(cap_img, minlength=num_images)
  if np.any(counts == 0):
    raise ValueError(f"{int(np.sum(counts == 0))} images have no caption")
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
  images = rng.permutation(num_images)[:steps * batch_size]
  # Captions grouped by image (stable sort keeps each image's captions in file order), so
  # image k's captions are rows starts[k] .. starts[k] + counts[k] - 1 of `by_image`.
  by_image = np.argsort(cap_img, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  pick = (rng.random(images.shape[0]) * counts[images]).astype(np.int64)
  pick = np.minimum(pick, counts[images] - 1)  # guards the float product hitting counts exactly
  return by_image[starts[images] + pick].astype(np.int32).reshape(steps, batch_size)


def device_order(order: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  """An epoch's (steps, B) order on the devices, batch axis split over 'data': each device
  holds the caption indices of its own share of every step's batch."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, DATA_AXIS))
  order = np.asarray(order, np.int32)
  return jax.make_array_from_callback(order.shape, sharding, lambda idx: order[idx])


def gather_batch(features: DeviceFeatures,
                 caption_idx: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A batch's features, gathered on the device.

  Args:
    features: the (replicated) cache.
    caption_idx: (B,) int32 caption indices.

  Returns:
    h_img (B, D_img), h_txt (B, D_txt), image_idx (B,) int32 (pair k = image_idx[k] with
    caption caption_idx[k]).
  """
  image_idx = jnp.take(features.caption_image_index, caption_idx, axis=0)
  h_img = jnp.take(features.image_pooled, image_idx, axis=0)
  h_txt = jnp.take(features.text_pooled, caption_idx, axis=0)
  return h_img, h_txt, image_idx


@dataclasses.dataclass(frozen=True)
class DataPosition:
  """Where the run is in the data: the next step reads row `step_in_epoch` of `epoch`'s order.

  Saved beside the train state so a resumed run continues with the very next batch.
  """

  epoch: int = 0
  step_in_epoch: int = 0

  @classmethod
  def from_global_step(cls, step: int, steps_in_epoch: int) -> "DataPosition":
    return cls(epoch=step // steps_in_epoch, step_in_epoch=step % steps_in_epoch)

  def next(self, steps_in_epoch: int) -> "DataPosition":
    if self.step_in_epoch + 1 >= steps_in_epoch:
      return DataPosition(self.epoch + 1, 0)
    return DataPosition(self.epoch, self.step_in_epoch + 1)

  def to_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "DataPosition":
    return cls(epoch=int(d["epoch"]), step_in_epoch=int(d["step_in_epoch"]))
