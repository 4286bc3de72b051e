"""Caption × image score matrices of a split, and their retrieval metrics under one naming.

Every retrieval number the project reports, in validation and in the eval report, is
`retrieval(scores, caption_image_index)` of score matrices computed here or, on the devices, by
the same `jsds.{dense,sparse,integrated}_scores`.
"""

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import scipy.sparse as sp

from jsds_jax.evaluation import metrics
from jsds_jax.models.tail import dense_tail
from jsds_jax.models.tail import jsds

KINDS = ("dense", "sparse", "integrated")
# eval.integrated: the dense part of the integrated eval score. "cosine" is the official eval's
# (no τ); "tau" is the score the training loss uses.
INTEGRATED_FORMULAS = {"cosine": "w1·cos + w2·z_t·z_i", "tau": "w1·cos/τ + w2·z_t·z_i"}


def check_integrated(integrated: str) -> str:
  if integrated not in INTEGRATED_FORMULAS:
    raise ValueError(f"eval.integrated must be one of {sorted(INTEGRATED_FORMULAS)}, got "
                     f"{integrated!r}")
  return integrated


def integrated_dense(out: Any, integrated: str = "cosine") -> np.ndarray:
  """(num_captions, num_images) the dense part of the integrated score: cos or cos/τ."""
  tau = 1.0 if check_integrated(integrated) == "cosine" else out.tau
  return np.asarray(jsds.dense_scores(out.e_i, out.e_t, tau)).T


def retrieval(scores: Mapping[str, np.ndarray],
              caption_image_index: np.ndarray) -> dict[str, dict[str, dict[str, float]]]:
  """{kind: {"t2i" | "i2t": {"R@1", "R@5", "R@10", "MRR@10", "rsum"}}} of each score matrix.

  Args:
    scores: {kind: (num_captions, num_images)}.
    caption_image_index: (num_captions,) the image row of each caption.
  """
  return {kind: metrics.retrieval_metrics(s, caption_image_index) for kind, s in scores.items()}


def sparse_score_matrix(z_t: sp.csr_matrix, z_i: sp.csr_matrix,
                        block: int = 1024) -> np.ndarray:
  """S_s = z_t z_iᵀ of every caption against every image.

  A trained head's vectors hold tens to hundreds of terms, where the sparse product costs a
  few multiply-adds per pair. An untrained or weakly regularised head's hold thousands, where
  that product is minutes on COCO and a dense matmul on the device is seconds; the dense path
  is taken when the expected shared terms per pair exceed V/256 (about where they break even
  on a CPU).

  Args:
    z_t: (N_captions, V) CSR. z_i: (N_images, V) CSR.
    block: captions densified at a time on the dense path.

  Returns:
    (N_captions, N_images) float32.
  """
  v = z_t.shape[1]
  share_t = np.bincount(z_t.indices, minlength=v) / max(1, z_t.shape[0])
  share_i = np.bincount(z_i.indices, minlength=v) / max(1, z_i.shape[0])
  if float(share_t @ share_i) * 256 < v:
    return np.asarray((z_t @ z_i.T).toarray(), np.float32)
  dense_i = jax.device_put(z_i.toarray())
  out = np.empty((z_t.shape[0], z_i.shape[0]), np.float32)
  for start in range(0, z_t.shape[0], block):
    rows = z_t[start:start + block].toarray()
    out[start:start + len(rows)] = np.asarray(jsds.sparse_scores(dense_i, rows)).T
  return out


def score_matrices(out: Any, w1: float, w2: float,
                   integrated: str = "cosine") -> dict[str, np.ndarray]:
  """Dense, sparse and integrated scores of every caption against every image.

  Args:
    out: the split's `tail_outputs.TailOutputs`.
    w1, w2: the integrated score's weights.
    integrated: "cosine" (the official eval, no τ: w1·cos + w2·sparse) or "tau" (the training
      loss's w1·cos/τ + w2·sparse); see `INTEGRATED_FORMULAS`.

  Returns:
    {"dense", "sparse", "integrated"}: (num_captions, num_images) float32; dense = e·e/τ.
  """
  dense = np.asarray(jsds.dense_scores(out.e_i, out.e_t, out.tau)).T
  sparse = sparse_score_matrix(out.z_t, out.z_i)
  part = integrated_dense(out, integrated)
  integ = np.asarray(jsds.integrated_scores(part, sparse, w1, w2), np.float32)
  return {"dense": dense, "sparse": sparse, "integrated": integ}


def zero_shot_scores(tail_init: Mapping[str, np.ndarray],
                     cache: Mapping[str, Any]) -> np.ndarray | None:
  """The backbone's own dense retrieval (its projections, before any training), or None.

  Args:
    tail_init: `feature_cache.load_tail_init` of the cache's backbone.
    cache: the split's cache.

  Returns:
    (num_captions, num_images) cosine similarities, or None when the backbone has no
    projections (`lit`).
  """
  if "image_proj.kernel" not in tail_init or "text_proj.kernel" not in tail_init:
    return None

  def project(h, prefix):
    x = np.asarray(h, np.float32) @ tail_init[f"{prefix}.kernel"]
    if f"{prefix}.bias" in tail_init:
      x = x + tail_init[f"{prefix}.bias"]
    return np.asarray(dense_tail.l2_normalize(x))

  return project(cache["text_pooled"], "text_proj") @ project(cache["image_pooled"],
                                                              "image_proj").T
