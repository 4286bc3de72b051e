"""Streams a batch's cached token states from the host to the devices (the last_block variant).

The token-state cache is too large for the devices (BLIP on COCO: ~100 GB of bf16 image
states), so it stays memory-mapped on the host (DESIGN.md §3) and every step reads just its
batch's rows. A background thread reads and transfers the next `prefetch` steps while the
devices run the current one, so the read overlaps the step. Each array is placed with its batch
axis over 'data' (`jax.make_array_from_callback`), which calls back only for this process's
devices: with several processes each reads only the rows its own devices train on.

Rows are read in ascending order (forward through the file) and put back in batch order, by a
few threads at once. Measured here (2-core CPU, shared): a batch of 256 BLIP-B image states
(577 × 768 bf16, 227 MB) comes out of the page cache in 90 ms with one thread, 49 ms with
four; at that rate such batches bound a run at ~20 steps/s however fast the devices are, so
keep the cache on fast local disk (or in RAM) for the image side.
"""

from collections.abc import Iterator, Mapping
import collections
import concurrent.futures
from typing import Any

import jax
import numpy as np

from jsds_jax import sharding
from jsds_jax.data import feature_cache
# Streamed name -> (cache array, which rows: "image" = the captions' images, "text" = captions).
STREAMS = {"image": ("image_tokens", "image_last_block_input"),
           "text": ("text_tokens", "text_last_block_input")}


# Threads reading one batch's rows: page-cache copies of one thread run at a few GB/s, well
# below what memory (and a host-to-GPU copy) sustains.
_READ_THREADS = 4


def _read_rows(source: Any, rows: np.ndarray, pool: concurrent.futures.Executor) -> np.ndarray:
  """source[rows]: contiguous runs of the output filled in parallel, each run's rows read in
  ascending order (forward through the file)."""
  out = np.empty((len(rows),) + tuple(source.shape[1:]), source.dtype)

  def fill(a: int, b: int) -> None:
    order = np.argsort(rows[a:b], kind="stable")
    out[a + order] = source[rows[a:b][order]]

  bounds = np.linspace(0, len(rows), min(_READ_THREADS, max(1, len(rows))) + 1).astype(int)
  list(pool.map(lambda ab: fill(*ab), zip(bounds[:-1], bounds[1:])))
  return out


class TokenStream:
  """The step-by-step token-state batches of one split.

  Args:
    split: `feature_cache.load_split(dir)` of the split (memory-mapped).
    sides: the sides with a last block ("image", "text").
    mesh: the train mesh (batch axis over 'data').
    prefetch: steps read ahead of the one being consumed.
    where: the cache's directory, for error messages.

  Raises:
    CacheError: the cache holds no token states (it was encoded without encode.last_block).
  """

  def __init__(self, split: Mapping[str, Any], sides: tuple[str, ...],
               mesh: jax.sharding.Mesh, prefetch: int = 2, where: Any = "the cache"):
    self._sources = {}
    for side in sides:
      name, array = STREAMS[side]
      if array not in split:
        raise feature_cache.CacheError(
            f"feature cache {where} has no {array}: the last_block variant needs the token "
            "states; encode with --config.encode.last_block=True")
      self._sources[name] = (side, split[array])
    self._cap_img = np.asarray(split["caption_image_index"], np.int64)
    self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.DATA_AXIS))
    self.prefetch = max(1, int(prefetch))
    self._readers = concurrent.futures.ThreadPoolExecutor(_READ_THREADS,
                                                          thread_name_prefix="token_reader")

  def batch(self, captions: np.ndarray) -> dict[str, jax.Array]:
    """{"image_tokens": (B, L_i, D_img), "text_tokens": (B, L_t, D_txt)} (the streamed sides)
    of the pairs (caption, its image) for `captions`, (B,) global caption rows."""
    captions = np.asarray(captions, np.int64)
    out = {}
    for name, (side, source) in self._sources.items():
      rows = self._cap_img[captions] if side == "image" else captions
      shape = (len(rows),) + tuple(source.shape[1:])
      out[name] = jax.make_array_from_callback(
          shape, self._sharding,
          lambda index, source=source, rows=rows: _read_rows(source, rows[index[0]],
                                                             self._readers))
    return out

  def steps(self, order: np.ndarray, start: int = 0) -> Iterator[dict[str, jax.Array]]:
    """Yields `batch(order[k])` for k = start, start + 1, ..., read `prefetch` steps ahead.

    Args:
      order: (steps, B) global caption rows of an epoch.
      start: the first step to yield.
    """
    order = np.asarray(order)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="token_stream") as pool:
      pending = collections.deque()
      nxt = start
      while nxt < min(len(order), start + self.prefetch):
        pending.append(pool.submit(self.batch, order[nxt]))
        nxt += 1
      while pending:
        ready = pending.popleft().result()
        if nxt < len(order):
          pending.append(pool.submit(self.batch, order[nxt]))
          nxt += 1
        yield ready
