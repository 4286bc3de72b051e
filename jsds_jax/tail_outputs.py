"""The trained tail applied to a whole split's cached features, in batches.

`eval`, `search` and `explain` all need the same thing: every image's and caption's dense
embedding e and sparse vector z for one split, computed from the feature cache with the tail's
params. The sparse vectors come back as scipy CSR matrices, since a (25 000, 30 524) float32 block
of mostly zeros is 3 GB dense but a few MB sparse once the head is trained.
"""

from collections.abc import Mapping
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from jsds_jax import sharding
from jsds_jax.data import feature_cache
from jsds_jax.models.tail import jsds
from jsds_jax.models.tail import last_block


@dataclasses.dataclass(frozen=True)
class TailOutputs:
  """Dense embeddings and sparse vectors of one split.

  Attributes:
    e_i: (N_images, P) float32 unit-norm image embeddings.
    z_i: (N_images, V) float32 CSR image term weights (>= 0).
    e_t: (N_captions, P) float32 caption embeddings.
    z_t: (N_captions, V) float32 CSR caption term weights.
    tau: the clamped temperature τ.
  """

  e_i: np.ndarray
  z_i: sp.csr_matrix
  e_t: np.ndarray
  z_t: sp.csr_matrix
  tau: float


def tail_module_for(params: Mapping[str, Any], backbone: Any = None,
                    dtype: Any = jnp.float32, own_caption_terms: bool = False) -> jsds.JSDSTail:
  """The `JSDSTail` whose params have the shapes of `params` (the checkpoint fixes them), with
  the trained last blocks the params hold (`JSDSTail.from_params`).

  Args:
    params: {"image_tail", "text_tail", "sparse_head", "tau"} as `init_jsds_tail` returns,
      plus "image_block" / "text_block" in the last_block variant.
    backbone: the loaded backbone; needed only with last blocks (its towers define them).
    dtype: the tail's (and its blocks') computation dtype.
    own_caption_terms: the config's `model.own_caption_terms` (captions keep only their own
      tokens; `JSDSTail.caption_terms`).

  Raises:
    ValueError: the params hold a last block and no backbone was given.
  """
  blocks = {}
  for side in ("image", "text"):
    if f"{side}_block" in params and backbone is not None:
      tower = backbone.image_tower if side == "image" else backbone.text_tower
      blocks[f"{side}_block"] = last_block.block_for(tower, dtype)
  return jsds.JSDSTail.from_params(params, dtype=dtype, own_caption_terms=own_caption_terms,
                                   **blocks)


def split_inputs(module: jsds.JSDSTail, cache: Mapping[str, Any],
                 where: Any = "the cache") -> dict[str, tuple[Any, Any]]:
  """What the tail reads of a split: {"image": (h, None), "text": (h, token ids or None)}.

  h is the pooled (N, D) cache, or with a last block the (N, L, D) token states (memory-
  mapped, read batch by batch); a text block and `own_caption_terms` also read the (N, L)
  token ids.

  Raises:
    CacheError: the cache lacks the token states or ids the module needs.
  """
  def need(name: str, why: str, how: str = "encode with --config.encode.last_block=True"):
    if name not in cache:
      raise feature_cache.CacheError(f"feature cache {where} has no {name}, which {why} needs "
                                     f"({how})")
    return cache[name]

  image = (need("image_last_block_input", "the trained image last block")
           if module.image_block is not None else cache["image_pooled"])
  text = (need("text_last_block_input", "the trained text last block")
          if module.text_block is not None else cache["text_pooled"])
  ids = None
  if module.text_block is not None:
    ids = need(feature_cache.TOKEN_IDS, "the trained text last block")
  elif module.own_caption_terms:
    ids = need(feature_cache.TOKEN_IDS, "model.own_caption_terms", "run encode again")
  return {"image": (image, None), "text": (text, ids)}


def feature_dims(params: Mapping[str, Any]) -> dict[str, int]:
  """{"image_dim", "text_dim", "embed_dim", "vocab_size"}: the widths `params` expect."""
  return {"image_dim": int(np.shape(params["image_tail"]["proj"]["kernel"])[0]),
          "text_dim": int(np.shape(params["text_tail"]["proj"]["kernel"])[0]),
          "embed_dim": int(np.shape(params["image_tail"]["proj"]["kernel"])[1]),
          "vocab_size": int(np.shape(params["sparse_head"]["word_embeddings"])[0])}


@functools.lru_cache(maxsize=16)
def _encoder(module: jsds.JSDSTail, kind: str):
  """The jitted (params, h, token ids or None) -> (e, z) of one modality; cached so that
  repeated evaluations in one process (validation during training, tests) compile once per
  tail shape."""
  if kind == "image":
    return jax.jit(lambda p, x, ids: module.apply({"params": p}, x,
                                                  method=jsds.JSDSTail.encode_image))
  return jax.jit(lambda p, x, ids: module.apply({"params": p}, x, ids,
                                                method=jsds.JSDSTail.encode_text))


def _to_csr(z: np.ndarray) -> sp.csr_matrix:
  return sp.csr_matrix(np.asarray(z, np.float32))


# Rows per device call when the inputs are token states (L x D each, not D).
TOKEN_BATCH = 128


def encode_features(module: jsds.JSDSTail, params: Mapping[str, Any], h: Any, kind: str,
                    batch_size: int = 1024,
                    token_ids: Any = None) -> tuple[np.ndarray, sp.csr_matrix]:
  """Applies one modality's tail and the sparse head to (N, D) features, batch by batch.

  Args:
    module: the tail (`tail_module_for(params)`).
    params: its params.
    h: (N, D) cached pre-projection features, or (N, L, D) token states for a side with a
      last block (a memmap is fine: one batch is read at a time).
    kind: "image" or "text".
    batch_size: rows per device call (at most `TOKEN_BATCH` for token states); the last batch
      is padded so one program serves all.
    token_ids: (N, L) caption token ids, -1 at padding; for a text last block or
      `own_caption_terms`.

  Returns:
    (e (N, P) float32, z (N, V) float32 CSR).
  """
  fn = _encoder(module, kind)
  n = h.shape[0]
  if np.ndim(h) == 3:
    batch_size = min(batch_size, TOKEN_BATCH)
  batch_size = max(1, min(batch_size, n))
  es, zs = [], []
  for start in range(0, n, batch_size):
    count = min(batch_size, n - start)
    x = sharding.pad_rows(np.asarray(h[start:start + batch_size], np.float32), batch_size)
    ids = None
    if token_ids is not None:
      ids = jnp.asarray(sharding.pad_rows(token_ids[start:start + batch_size], batch_size, -1))
    e, z = fn(params, jnp.asarray(x), ids)
    es.append(np.asarray(e, np.float32)[:count])
    zs.append(_to_csr(np.asarray(z)[:count]))
  return np.concatenate(es), sp.vstack(zs, format="csr")


def apply_tail(params: Mapping[str, Any], cache: Mapping[str, Any],
               batch_size: int = 1024, backbone: Any = None,
               own_caption_terms: bool = False) -> TailOutputs:
  """Every image's and caption's (e, z) for one split's feature cache.

  Args:
    params: `JSDSTail` params.
    cache: `feature_cache.load_split(...)` of the split.
    batch_size: rows per device call.
    backbone: the loaded backbone; needed only for params with last blocks.
    own_caption_terms: each caption's vector restricted to its own tokens
      (`model.own_caption_terms`, done by the tail; needs the cache's caption token ids).

  Raises:
    CacheError: the cache lacks what the tail reads (`split_inputs`).
  """
  module = tail_module_for(params, backbone, own_caption_terms=own_caption_terms)
  inputs = split_inputs(module, cache)
  e_i, z_i = encode_features(module, params, inputs["image"][0], "image", batch_size)
  e_t, z_t = encode_features(module, params, inputs["text"][0], "text", batch_size,
                             token_ids=inputs["text"][1])
  tau = float(jsds.clamp_tau(jnp.asarray(params["tau"]), module.tau_min, module.tau_max))
  return TailOutputs(e_i=e_i, z_i=z_i, e_t=e_t, z_t=z_t, tau=tau)
