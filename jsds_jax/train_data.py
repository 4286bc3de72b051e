"""The training data as the loop sees it: `batch(step)` gives the step function's data arguments.

  data = TrainData(cache_dir, cache, mesh, seed=0, batch_size=128, layout="replicated")
  for step in range(start, total):
    state, metrics = step_fn(state, *data.batch(step))

It hides where the features live (replicated on every device, or each process holding only its
devices' shards: `input_pipeline`), the epoch order of the captions, and in the last_block
variant the token states streamed from the host (`token_stream`). The position in the data is a
function of the step alone, epoch, offset = divmod(step, steps_per_epoch), so a resumed run
needs nothing but its step to continue with the very next batch.
"""

from collections.abc import Mapping
import os
from typing import Any

import jax
import numpy as np

from jsds_jax import input_pipeline
from jsds_jax import token_stream


def position(step: int, steps_per_epoch: int) -> tuple[int, int]:
  """(epoch, step within it) of `step` steps taken: the batch the next step reads."""
  return divmod(int(step), int(steps_per_epoch))


FEATURE_DTYPES = ("", "float32", "bfloat16")


def features_dtype(name: str | None) -> np.dtype | None:
  """`train.features_dtype` as a dtype (None: keep the cache's); ValueError naming the field."""
  if name in (None, ""):
    return None
  if name not in FEATURE_DTYPES:
    raise ValueError(f"train.features_dtype must be one of {list(FEATURE_DTYPES)} ('' keeps the "
                     f"cache's), got {name!r}")
  return np.dtype(jax.numpy.dtype(name))


class TrainData:
  """The batches of one train split's feature cache.

  Args:
    cache_dir: the split's feature cache.
    cache: `feature_cache.load_split(cache_dir, mmap=True)`.
    mesh: the train mesh ('data' axis).
    seed: the run's seed (fixes the epoch orders).
    batch_size: images (= captions) per step.
    layout: "replicated" or "sharded" (`train.features_layout` resolved).
    token_ids: also put the captions' token ids on the devices (PEC, a text last block).
    dtype: the features' dtype on the devices ("" or None keeps the cache's; e.g. "bfloat16").
    stream_sides: the sides whose token states are streamed ("image", "text"); () for none.
  """

  def __init__(self, cache_dir: str | os.PathLike, cache: Mapping[str, Any],
               mesh: jax.sharding.Mesh, *, seed: int, batch_size: int, layout: str,
               token_ids: bool = False, stream_sides: tuple[str, ...] = (),
               dtype: str | None = None):
    self.mesh, self.seed, self.batch_size = mesh, seed, batch_size
    dtype = features_dtype(dtype)
    self.caption_image_index = np.asarray(cache["caption_image_index"])
    if layout == "sharded":
      # Each process reads only its devices' shards of the cache (input_pipeline, "sharded").
      self.features, self.layout = input_pipeline.load_sharded_features(
          cache_dir, mesh, dtype, token_ids=token_ids)
      self.steps_per_epoch = self.layout.steps_per_epoch(batch_size)
    else:
      self.features = input_pipeline.load_device_features(cache_dir, mesh, dtype,
                                                         token_ids=token_ids)
      self.layout = None
      self.steps_per_epoch = input_pipeline.steps_per_epoch(self.features.num_images,
                                                            batch_size)
    self._stream = (token_stream.TokenStream(cache, tuple(stream_sides), mesh,
                                             where=f"'{cache_dir}'") if stream_sides else None)
    self._epoch = self._next = None
    self._order = self._streamed = None

  def position(self, step: int) -> tuple[int, int]:
    """(epoch, step within it) of the 0-based `step`."""
    return position(step, self.steps_per_epoch)

  def batch(self, step: int) -> tuple:
    """The step function's data arguments for the 0-based `step`: (features, the epoch's
    (steps, B) device order, the step within the epoch[, the streamed token states])."""
    epoch, k = self.position(step)
    if (epoch, k) != (self._epoch, self._next):
      self._start(epoch, k)
    self._next = k + 1
    if self._streamed is None:
      return self.features, self._order, k
    return self.features, self._order, k, next(self._streamed)

  def _start(self, epoch: int, k: int) -> None:
    """Orders `epoch` and starts its token stream at step k."""
    self.close()
    host_order = input_pipeline.epoch_order(self.seed, epoch, self.caption_image_index,
                                            self.batch_size, layout=self.layout)
    self._order = input_pipeline.device_order(host_order, self.mesh)
    if self._stream is not None:
      rows = (self.layout.global_captions(host_order) if self.layout is not None
              else host_order)
      self._streamed = self._stream.steps(rows, k)
    self._epoch = epoch

  def close(self) -> None:
    """Stops the token stream's read-ahead."""
    if self._streamed is not None:
      self._streamed.close()
      self._streamed = None
