"""Validation during training: dense, sparse and integrated retrieval on one split's cache, the
tail run on the mesh, reported under the eval report's names (`scores.retrieval`,
`sparsity.from_term_counts`).
"""

from collections.abc import Mapping, Sequence
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsds_jax import sharding
from jsds_jax import tail_outputs
from jsds_jax.data import feature_cache
from jsds_jax.evaluation import lexical
from jsds_jax.evaluation import scores as scores_lib
from jsds_jax.evaluation import sparsity as sparsity_lib
from jsds_jax.models.tail import jsds

P = jax.sharding.PartitionSpec


class Evaluator:
  """Dense, sparse and integrated retrieval on one split, the tail run on the mesh.

  Features are cut into fixed-size blocks (one compile per modality), each split over the
  'data' axis; the (captions, images) score matrices come back to the host for
  `scores.retrieval`.

  Args:
    module: the `JSDSTail` (with `own_caption_terms` it restricts the captions itself).
    cache_dir: the split's feature cache.
    mesh: a mesh with a 'data' axis (default: all local devices).
    w1, w2: the integrated score's weights, S_int = w1·S_d + w2·S_s.
    block: items per block (at most; rounded to the device count).
    compiler_options: for `jax.jit`.
    integrated: "cosine" (the official eval: S_int = w1·cos + w2·S_s) or "tau" (the training
      score, w1·cos/τ + w2·S_s); config `eval.integrated`.
    vocab: the V term strings; with them (and the cache's caption token ids) the metrics
      include "lexical" (`evaluation.lexical`, computed from each vector's top terms on the
      devices).
  """

  def __init__(self, module: jsds.JSDSTail, cache_dir: str | os.PathLike,
               mesh: jax.sharding.Mesh | None = None, w1: float = 0.1, w2: float = 0.1,
               block: int = 1024, compiler_options: dict | None = None,
               integrated: str = "cosine", vocab: Sequence[str] | None = None):
    self.mesh = mesh or sharding.local_data_mesh()
    split = feature_cache.load_split(cache_dir, mmap=True)
    self.meta = split["meta"]
    inputs = tail_outputs.split_inputs(module, split, f"'{cache_dir}'")
    # Pooled caches are read whole; token states (last_block) stay memory-mapped.
    self.h_img, self.h_txt = (x if np.ndim(x) == 3 else np.asarray(x, np.float32)
                              for x in (inputs["image"][0], inputs["text"][0]))
    # A text last block and `module.own_caption_terms` read the captions' token ids.
    self.token_ids = inputs["text"][1]
    self.caption_image_index = np.asarray(split["caption_image_index"], np.int64)
    self.integrated = scores_lib.check_integrated(integrated)
    # Lexical metrics need the term strings and every caption's token ids.
    self.caption_ids = None
    if vocab is not None and feature_cache.TOKEN_IDS in split:
      self.caption_ids = np.asarray(split[feature_cache.TOKEN_IDS])
      self.classes = lexical.term_classes(list(vocab))
      junk = jnp.asarray(self.classes["junk"], jnp.float32)
    else:
      junk = None  # no lexical metrics: the blocks carry no top terms or junk weight
    n = self.mesh.size
    most = max(self.h_img.shape[0], self.h_txt.shape[0])
    if np.ndim(self.h_img) == 3 or np.ndim(self.h_txt) == 3:
      block = min(block, tail_outputs.TOKEN_BATCH)
    self.block = -(-min(block, most) // n) * n
    self.w1, self.w2 = float(w1), float(w2)
    self._rows = jax.sharding.NamedSharding(self.mesh, P(sharding.DATA_AXIS))
    jit = lambda f: jax.jit(f, compiler_options=compiler_options)

    def encoder(method):
      def encode(params, h, ids, n_valid):
        args = (h,) if ids is None else (h, ids)
        e, z = module.apply({"params": params}, *args, method=method)
        # Per term, how many of the block's real rows use it (for FLOPs), counted on the
        # devices so that the (block, V) vectors never travel to the host.
        valid = (jnp.arange(h.shape[0]) < n_valid)[:, None]
        counts = jnp.sum((z != 0) & valid, axis=0, dtype=jnp.int32)
        if junk is None:
          return e, z, counts
        zf = z.astype(jnp.float32)
        top_w, top_ids = jax.lax.top_k(zf, lexical.TOP_K)  # ties: the smaller id, as top_terms
        return e, z, counts, top_ids, top_w, zf @ junk, jnp.sum(zf, axis=-1)
      return jit(encode)

    self._encode = {"image": encoder(jsds.JSDSTail.encode_image),
                    "text": encoder(jsds.JSDSTail.encode_text)}
    self._tau = jit(lambda params: module.apply({"params": params},
                                                method=jsds.JSDSTail.temperature))
    self._scores = jit(self._score_block)

  def _score_block(self, e_t, z_t, e_i, z_i, tau):
    cos = jsds.dense_scores(e_t, e_i, 1.0)  # (captions, images): rows are the queries here
    s_d = cos / tau
    s_s = jsds.sparse_scores(z_t, z_i)
    return s_d, s_s, jsds.integrated_scores(cos if self.integrated == "cosine" else s_d, s_s,
                                            self.w1, self.w2)

  def _encoded_blocks(self, params, h: np.ndarray, kind: str, token_ids=None):
    """Yields (real rows, e (block, P), z (block, V), term counts (V,)[, top-k ids and weights
    (block, k), junk and total weight (block,) when there are lexical metrics]) per block of h;
    the last block is padded with zero rows (and -1 token ids)."""
    for start in range(0, h.shape[0], self.block):
      chunk = np.asarray(h[start:start + self.block], np.float32)
      x = jax.device_put(sharding.pad_rows(chunk, self.block), self._rows)
      put_ids = lambda t: (None if t is None else jax.device_put(
          sharding.pad_rows(t[start:start + self.block], self.block, fill=-1), self._rows))
      yield (chunk.shape[0], *self._encode[kind](params, x, put_ids(token_ids), chunk.shape[0]))

  def __call__(self, params) -> dict[str, Any]:
    """Metrics of `params` on the split.

    Returns:
      {"dense" | "sparse" | "integrated": {"t2i" | "i2t": {R@1, R@5, R@10, MRR@10, rsum}},
      "sparsity": {"caption_nnz", "image_nnz", "flops"}}: the eval report's numbers, by kind;
      with a vocabulary also "lexical": `lexical.lexical_metrics` without the top-terms list.
    """
    if jax.process_count() > 1:
      # Replicated params of a multi-process mesh, copied to this process's devices.
      params = jax.tree.map(np.asarray, params)
    n_img, n_cap = self.h_img.shape[0], self.h_txt.shape[0]
    images = list(self._encoded_blocks(params, self.h_img, "image"))
    e_i = jnp.concatenate([b[1] for b in images])  # padded rows last: sliced off the scores
    z_i = jnp.concatenate([b[2] for b in images])
    terms_i = np.sum([np.asarray(b[3], np.float64) for b in images], axis=0)
    tau = self._tau(params)
    blocks = {k: [] for k in scores_lib.KINDS}
    terms_t = 0.0
    text_blocks = []
    for rows, e_t, z_t, terms, *lex in self._encoded_blocks(params, self.h_txt, "text",
                                                            self.token_ids):
      text_blocks.append((rows, *lex))
      terms_t = terms_t + np.asarray(terms, np.float64)
      for k, s in zip(scores_lib.KINDS, self._scores(e_t, z_t, e_i, z_i, tau)):
        blocks[k].append(np.asarray(s)[:rows, :n_img])
    out: dict[str, Any] = scores_lib.retrieval({k: np.concatenate(v) for k, v in blocks.items()},
                                               self.caption_image_index)
    out["sparsity"] = sparsity_lib.from_term_counts(terms_t, terms_i, n_cap, n_img)
    if self.caption_ids is not None:
      out["lexical"] = self._lexical([(b[0], *b[4:]) for b in images], text_blocks)
    return out

  def _lexical(self, image_blocks, text_blocks) -> dict[str, float]:
    """`lexical.lexical_metrics` from the blocks' (rows, top ids, top weights, junk, total)."""
    def gather(blocks):
      ids = np.concatenate([np.asarray(b[1])[:b[0]] for b in blocks]).astype(np.int64)
      w = np.concatenate([np.asarray(b[2])[:b[0]] for b in blocks])
      junk = sum(float(np.asarray(b[3])[:b[0]].sum()) for b in blocks)
      total = sum(float(np.asarray(b[4])[:b[0]].sum()) for b in blocks)
      return (np.where(w > 0, ids, -1), w), junk, total
    top_i, junk_i, total_i = gather(image_blocks)
    top_t, junk_t, total_t = gather(text_blocks)
    return lexical.lexical_metrics(top_t, top_i, {"text": junk_t, "image": junk_i},
                                   {"text": total_t, "image": total_i}, self.caption_ids,
                                   self.caption_image_index, self.classes)


def evaluate_split(params: Any, module: jsds.JSDSTail, cache_dir: str | os.PathLike,
                   w1: float, w2: float, mesh: jax.sharding.Mesh | None = None) -> dict:
  """One-off `Evaluator(module, cache_dir, mesh, w1, w2)(params)` (see there)."""
  return Evaluator(module, cache_dir, mesh, w1, w2)(params)


def flatten_metrics(val: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
  """{"dense": {"t2i": {"R@1": x}}} -> {"dense/t2i/R@1": x}."""
  out = {}
  for k, v in val.items():
    if isinstance(v, Mapping):
      out.update(flatten_metrics(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = float(v)
  return out


def val_score(val: Mapping[str, Any], mode: str) -> float:
  """What the best checkpoint and early stopping follow: t2i R@1 of the sparse scores (the
  paper's), of the dense ones in dense_only (which never trains the sparse head)."""
  return float(val["dense" if mode == "dense_only" else "sparse"]["t2i"]["R@1"])
