"""Streams a batch's cached token states from the host to the devices (the last_block variant).

The token-state cache is too large for the devices (BLIP on COCO: ~100 GB of bf16 image
states), so it stays memory-mapped on the host (DESIGN.md §3) and every step reads just its
batch's rows. A background thread reads and transfers the next `prefetch` steps while the
devices run the current one, so the read overlaps the step. Each array is placed with its batch
axis over 'data' (`jax.make_array_from_callback`), which calls back only for this process's
devices: with several processes each reads only the rows its own devices train on.

Rows are read in ascending order (forward through the file) and put back in batch order.
"""

from collections.abc import Iterator, Mapping
import collections
import concurrent.futures
from typing import Any

import jax
import numpy as np

from jsds_jax.data import feature_cache

DATA_AXIS = "data"
# Streamed name -> (cache array, which rows: "image" = the captions' images, "text" = captions).
STREAMS = {"image": ("image_tokens", "image_last_block_input"),
           "text": ("text_tokens", "text_last_block_input")}


def _read_rows(source: Any, rows: np.ndarray) -> np.ndarray:
  """source[rows] with the rows read in ascending order."""
  order = np.argsort(rows, kind="stable")
  out = np.empty((len(rows),) + tuple(source.shape[1:]), source.dtype)
  out[order] = source[rows[order]]
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
    self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))
    self.prefetch = max(1, int(prefetch))

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
          lambda index, source=source, rows=rows: _read_rows(source, rows[index[0]]))
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
