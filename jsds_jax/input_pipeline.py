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

Two layouts (`train.features_layout`). "replicated" (above) is the single-process default.
"sharded" is the multi-process default, where each process must read only its part of the cache
(a single process can run it too, for the very batches of a multi-process run): `shard_layout` assigns every
image, with all its captions, to one of the mesh's n devices (a fixed seeded permutation, dealt
round-robin, so shards differ by at most one image); device d holds only shard d's rows, padded
to a common length, as one block of a globally sharded array (`PartitionSpec('data')`), and each
process memory-maps the .npy files and reads only the rows of its own devices' shards.
`epoch_order(..., layout=...)` then draws device d's B/n columns of every step from shard d's
images (each shard permuted and caption-sampled with its own stream, SeedSequence([seed, epoch,
d])), so the order holds *local* row ids and the in-step gather stays local with no
all-to-all. Batches keep B distinct images and an epoch still visits an image at most once; the
difference from "replicated" is that a batch always takes exactly B/n images from each shard,
and an epoch has min_d(images in shard d) // (B/n) steps (at most one fewer than N // B). The
sharded order is a function of (seed, epoch, n): a run resumed on a different device count sees
different batches, not a wrong state. The step must receive the features with in_spec
`features_spec(features)` (P('data') for sharded), see `jsds_jax/train_step.py`.
"""

from collections.abc import Mapping
import dataclasses
import os
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jsds_jax import sharding
from jsds_jax.data import feature_cache

DATA_AXIS = sharding.DATA_AXIS


@flax.struct.dataclass
class DeviceFeatures:
  """One split's [CLS] cache, on the devices (whole on each, or one shard per device).

  Attributes:
    image_pooled: (N_images, D_img) h of every image.
    text_pooled: (N_captions, D_txt) h of every caption.
    caption_image_index: (N_captions,) int32, caption -> image row.
  """

  image_pooled: jax.Array
  text_pooled: jax.Array
  caption_image_index: jax.Array
  # (N_captions, L) int32 caption token ids, -1 at padding; only when the run uses PEC.
  text_token_ids: Optional[jax.Array] = None
  # "replicated": the arrays above are whole on every device. "sharded": they are (n·R, D)
  # global arrays split over 'data'; device d's block holds shard d (see `ShardLayout`), its
  # caption_image_index gives LOCAL image rows, and the sizes below count padded rows.
  layout: str = flax.struct.field(pytree_node=False, default="replicated")

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
                    mesh: jax.sharding.Mesh, dtype: Optional[Any] = None,
                    text_token_ids: Any = None) -> DeviceFeatures:
  """Puts a split's arrays on every device of `mesh` (replicated).

  Args:
    image_pooled: (N_images, D_img) host array (a memmap is fine: it is read once).
    text_pooled: (N_captions, D_txt).
    caption_image_index: (N_captions,) ints in [0, N_images).
    mesh: a mesh with a 'data' axis.
    dtype: storage dtype of the features on the devices (None keeps the cache's; bfloat16
      halves the memory, and the tail's first matmul reads them in its own dtype).
    text_token_ids: optional (N_captions, L) int token ids, -1 at padding (for PEC).

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
  ids = None
  if text_token_ids is not None:
    ids = _put_replicated(_checked_token_ids(text_token_ids, cap_img.shape[0]), mesh)
  return DeviceFeatures(image_pooled=_put_replicated(cast(image_pooled), mesh),
                        text_pooled=_put_replicated(cast(text_pooled), mesh),
                        caption_image_index=_put_replicated(cap_img.astype(np.int32), mesh),
                        text_token_ids=ids)


def _checked_token_ids(text_token_ids: Any, num_captions: int) -> np.ndarray:
  ids = np.asarray(text_token_ids)
  if ids.ndim != 2 or ids.shape[0] != num_captions:
    raise ValueError(f"text_token_ids has shape {ids.shape}, expected ({num_captions}, L)")
  return ids.astype(np.int32, copy=False)


def _split_token_ids(split: Mapping[str, Any], directory: Any) -> np.ndarray:
  """The cache's caption token ids, or an error that says how to add them."""
  if feature_cache.TOKEN_IDS not in split:
    raise feature_cache.CacheError(
        f"feature cache '{directory}' has no caption token ids ({feature_cache.TOKEN_IDS}.npy), "
        "which train.pec and a text last block need: it was written by an older encode. Run "
        "`jsds-encode` with the same config; it adds them to the finished cache in seconds "
        "(only the tokenizer runs).")
  return split[feature_cache.TOKEN_IDS]


def load_device_features(directory: str | os.PathLike, mesh: jax.sharding.Mesh,
                         dtype: Optional[Any] = None,
                         token_ids: bool = False) -> DeviceFeatures:
  """Reads a split's [CLS] cache (`feature_cache.load_split`) onto the devices.

  `token_ids`: also the caption token ids (PEC); CacheError if the cache lacks them.
  """
  split = feature_cache.load_split(directory, mmap=True)
  ids = _split_token_ids(split, directory) if token_ids else None
  return device_features(split["image_pooled"], split["text_pooled"],
                         split["caption_image_index"], mesh, dtype, text_token_ids=ids)


def features_spec(features: DeviceFeatures) -> jax.sharding.PartitionSpec:
  """The shard_map in_spec the step must give `features`: P() replicated, P('data') sharded."""
  if features.layout == "sharded":
    return jax.sharding.PartitionSpec(DATA_AXIS)
  return jax.sharding.PartitionSpec()


@dataclasses.dataclass(frozen=True, eq=False)
class ShardLayout:
  """Which images, with all their captions, each of n shards (devices on 'data') holds.

  Attributes:
    images: (n, R_img) int64 global image rows of each shard, ascending, -1 past its count.
    captions: (n, R_cap) int64 global caption rows of each shard, ascending, -1 past its count.
    caption_image: (n, R_cap) int32 LOCAL image row (into `images[d]`) of each local caption,
      0 at padding.
    num_images: (n,) real images per shard.
    num_captions: (n,) real captions per shard.
  """

  images: np.ndarray
  captions: np.ndarray
  caption_image: np.ndarray
  num_images: np.ndarray
  num_captions: np.ndarray

  @property
  def num_shards(self) -> int:
    return self.images.shape[0]

  def steps_per_epoch(self, batch_size: int) -> int:
    """Steps of a sharded epoch: the smallest shard runs out first."""
    per_shard = _per_shard_batch(batch_size, self.num_shards)
    return steps_per_epoch(int(self.num_images.min()), per_shard)

  def global_captions(self, order: np.ndarray) -> np.ndarray:
    """Maps a sharded epoch order (steps, B) of local caption rows to global caption rows."""
    order = np.asarray(order)
    per_shard = _per_shard_batch(order.shape[1], self.num_shards)
    shard = np.arange(order.shape[1]) // per_shard
    return self.captions[shard[None, :], order]


def _per_shard_batch(batch_size: int, num_shards: int) -> int:
  if batch_size % num_shards:
    raise ValueError(f"batch size {batch_size} is not a multiple of the {num_shards} devices")
  return batch_size // num_shards


def shard_layout(caption_image_index: Any, num_shards: int, seed: int = 0) -> ShardLayout:
  """Assigns images (with their captions) to `num_shards` shards; a pure function.

  Args:
    caption_image_index: (N_captions,) caption -> image row (every image has a caption).
    num_shards: n, the size of the mesh's 'data' axis.
    seed: the layout's seed (fixed for a run: a checkpoint's data position assumes it).

  Returns:
    The `ShardLayout`; shard sizes differ by at most one image.
  """
  cap_img = np.asarray(caption_image_index, np.int64)
  num_images = int(cap_img.max()) + 1 if cap_img.size else 0
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, num_shards])))
  shard_of_image = np.empty(num_images, np.int64)
  shard_of_image[rng.permutation(num_images)] = np.arange(num_images) % num_shards
  shard_of_caption = shard_of_image[cap_img]
  img_counts = np.bincount(shard_of_image, minlength=num_shards)
  cap_counts = np.bincount(shard_of_caption, minlength=num_shards)
  images = np.full((num_shards, max(int(img_counts.max()), 1)), -1, np.int64)
  captions = np.full((num_shards, max(int(cap_counts.max()), 1)), -1, np.int64)
  caption_image = np.zeros(captions.shape, np.int32)
  local_row = np.empty(num_images, np.int64)
  for d in range(num_shards):
    # Ascending rows: a process's reads from the memory-mapped .npy go forward through the file.
    imgs = np.flatnonzero(shard_of_image == d)
    caps = np.flatnonzero(shard_of_caption == d)
    local_row[imgs] = np.arange(imgs.size)
    images[d, :imgs.size] = imgs
    captions[d, :caps.size] = caps
    caption_image[d, :caps.size] = local_row[cap_img[caps]]
  return ShardLayout(images=images, captions=captions, caption_image=caption_image,
                     num_images=img_counts, num_captions=cap_counts)


def _put_sharded(source: Any, rows: np.ndarray, mesh: jax.sharding.Mesh,
                 dtype: Optional[Any]) -> jax.Array:
  """A (n·R, ...) array split over 'data' whose block d is `source[rows[d]]` (-1 -> zeros).

  Only this process's devices' blocks are read (the callback runs for addressable devices
  only), so with `source` a memmap each process reads just its own rows from disk.
  """
  n, r = rows.shape
  shape = (n * r,) + tuple(np.shape(source)[1:])
  out_dtype = np.dtype(dtype) if dtype is not None else np.asarray(source[:0]).dtype
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))

  def block(index):
    d = (index[0].start or 0) // r
    want = rows[d]
    real = want[want >= 0]  # padding sits at the end of each shard's row list
    out = np.zeros((r,) + shape[1:], out_dtype)
    out[:real.size] = np.asarray(source[real], out_dtype)
    return out

  return jax.make_array_from_callback(shape, sharding, block)


def device_features_sharded(image_pooled: Any, text_pooled: Any, layout: ShardLayout,
                            mesh: jax.sharding.Mesh, dtype: Optional[Any] = None,
                            text_token_ids: Any = None) -> DeviceFeatures:
  """Puts one shard of a split on each device of `mesh` (the "sharded" layout).

  Args:
    image_pooled: (N_images, D_img) host array; a memmap is read only at this process's rows.
    text_pooled: (N_captions, D_txt), likewise.
    layout: `shard_layout(caption_image_index, mesh.shape['data'])`.
    mesh: a mesh with a 'data' axis of `layout.num_shards` devices (all processes' devices).
    dtype: storage dtype on the devices (None keeps the cache's).
    text_token_ids: optional (N_captions, L) caption token ids (PEC), sharded like the
      captions.

  Returns:
    `DeviceFeatures` with layout "sharded": image_pooled (n·R_img, D_img), text_pooled
    (n·R_cap, D_txt), caption_image_index (n·R_cap,) int32 local image rows, text_token_ids
    (n·R_cap, L) or None.
  """
  if mesh.shape[DATA_AXIS] != layout.num_shards:
    raise ValueError(f"layout has {layout.num_shards} shards for a 'data' axis of "
                     f"{mesh.shape[DATA_AXIS]} devices")
  n_img, n_cap = int(np.shape(image_pooled)[0]), int(np.shape(text_pooled)[0])
  if int(layout.num_images.sum()) != n_img or int(layout.num_captions.sum()) != n_cap:
    raise ValueError(f"layout covers {int(layout.num_images.sum())} images and "
                     f"{int(layout.num_captions.sum())} captions; the cache has {n_img} and "
                     f"{n_cap}")
  n, r_cap = layout.caption_image.shape
  cap_img = jax.make_array_from_callback(
      (n * r_cap,), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS)),
      lambda index: layout.caption_image.reshape(-1)[index])
  ids = None
  if text_token_ids is not None:
    # Padding rows read as token 0; no batch ever draws them.
    ids = _put_sharded(text_token_ids, layout.captions, mesh, np.int32)
  return DeviceFeatures(image_pooled=_put_sharded(image_pooled, layout.images, mesh, dtype),
                        text_pooled=_put_sharded(text_pooled, layout.captions, mesh, dtype),
                        caption_image_index=cap_img, text_token_ids=ids, layout="sharded")


def load_sharded_features(directory: str | os.PathLike, mesh: jax.sharding.Mesh,
                          dtype: Optional[Any] = None, seed: int = 0,
                          token_ids: bool = False) -> tuple[DeviceFeatures, ShardLayout]:
  """Reads this process's shards of a split's [CLS] cache; returns them and the layout.

  Every process reads the (small) caption_image_index whole, to compute the same layout and
  epoch orders, and from the feature arrays only the rows of its own devices' shards.
  `token_ids`: also the caption token ids (PEC); CacheError if the cache lacks them.
  """
  split = feature_cache.load_split(directory, mmap=True)
  ids = _split_token_ids(split, directory) if token_ids else None
  layout = shard_layout(split["caption_image_index"], mesh.shape[DATA_AXIS], seed)
  features = device_features_sharded(split["image_pooled"], split["text_pooled"], layout, mesh,
                                     dtype, text_token_ids=ids)
  return features, layout


def _fitting_batch(num_images: int) -> int:
  """The largest power of two that leaves at least two steps per epoch (at least 1)."""
  return max(1, 1 << max(0, (num_images // 2).bit_length() - 1))


def steps_per_epoch(num_images: int, batch_size: int) -> int:
  """Steps in one epoch: every image once, the last partial batch dropped."""
  steps = num_images // batch_size
  if steps == 0:
    raise ValueError(f"train.batch_size {batch_size} exceeds the {num_images} training images "
                     "(a batch holds distinct images): pass --config.train.batch_size="
                     f"{_fitting_batch(num_images)} or less, or train on more data (with "
                     "data.skip_bad, check how many items were dropped)")
  return steps


def epoch_order(seed: int, epoch: int, caption_image_index: Any, batch_size: int,
                layout: Optional[ShardLayout] = None) -> np.ndarray:
  """The caption indices of every step of one epoch; a pure function of its arguments.

  Args:
    seed: the run's data seed.
    epoch: 0-based epoch.
    caption_image_index: (N_captions,) caption -> image row.
    batch_size: B, the global batch.
    layout: for the "sharded" layout, its `ShardLayout` (`caption_image_index` is then only
      used to check it matches).

  Returns:
    (steps_per_epoch, B) int32 caption indices; the B captions of a row belong to B distinct
    images, and every image appears in at most one row. With `layout`, columns
    [d·B/n, (d+1)·B/n) are LOCAL caption rows of shard d (`layout.global_captions` maps them
    back) and there are `layout.steps_per_epoch(B)` rows.
  """
  if layout is not None:
    return _sharded_epoch_order(seed, epoch, caption_image_index, batch_size, layout)
  return _epoch_order(np.random.SeedSequence([seed, epoch]), caption_image_index, batch_size)


def _sharded_epoch_order(seed: int, epoch: int, caption_image_index: Any, batch_size: int,
                         layout: ShardLayout) -> np.ndarray:
  if int(layout.num_captions.sum()) != np.shape(caption_image_index)[0]:
    raise ValueError("the layout was made for another caption table")
  per_shard = _per_shard_batch(batch_size, layout.num_shards)
  steps = layout.steps_per_epoch(batch_size)
  cols = []
  for d in range(layout.num_shards):
    local = layout.caption_image[d, :layout.num_captions[d]]
    order = _epoch_order(np.random.SeedSequence([seed, epoch, d]), local, per_shard)
    cols.append(order[:steps])
  return np.concatenate(cols, axis=1)


def _epoch_order(seed_seq: np.random.SeedSequence, caption_image_index: Any,
                 batch_size: int) -> np.ndarray:
  cap_img = np.asarray(caption_image_index, np.int64)
  num_images = int(cap_img.max()) + 1 if cap_img.size else 0
  steps = steps_per_epoch(num_images, batch_size)
  counts = np.bincount(cap_img, minlength=num_images)
  if np.any(counts == 0):
    raise ValueError(f"{int(np.sum(counts == 0))} images have no caption")
  rng = np.random.Generator(np.random.PCG64(seed_seq))
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
  holds the caption indices of its own share of every step's batch.

  Multi-process: every process passes the same global order (it is a pure function of the
  seed and epoch) and places only its own devices' columns.
  """
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, DATA_AXIS))
  order = np.asarray(order, np.int32)
  return jax.make_array_from_callback(order.shape, sharding, lambda idx: order[idx])


def gather_batch(features: DeviceFeatures,
                 caption_idx: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A batch's features, gathered on the device.

  Args:
    features: the cache as the device sees it: whole (replicated) or its own shard.
    caption_idx: (B,) int32 caption rows of `features` (local rows for a shard).

  Returns:
    h_img (B, D_img), h_txt (B, D_txt), image_idx (B,) int32 (pair k = image_idx[k] with
    caption caption_idx[k]; for a shard, the image's row in the global padded array, so that
    ids from different devices never collide when the step all-gathers them as positives).
  """
  image_idx = jnp.take(features.caption_image_index, caption_idx, axis=0)
  h_img = jnp.take(features.image_pooled, image_idx, axis=0)
  h_txt = jnp.take(features.text_pooled, caption_idx, axis=0)
  if features.layout == "sharded":
    # Inside the step's shard_map: local row + this device's block offset.
    image_idx = image_idx + jax.lax.axis_index(DATA_AXIS) * features.image_pooled.shape[0]
  return h_img, h_txt, image_idx


def gather_token_ids(features: DeviceFeatures, caption_idx: jax.Array) -> jax.Array:
  """(B, L) int32 token ids of a batch's captions (-1 at padding); needs `text_token_ids`."""
  if features.text_token_ids is None:
    raise ValueError("these DeviceFeatures were loaded without caption token ids")
  return jnp.take(features.text_token_ids, caption_idx, axis=0)
