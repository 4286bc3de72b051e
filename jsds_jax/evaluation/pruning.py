"""Retrieval as every sparse vector keeps only its top-k terms: the eval report's pruning curve."""

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from jsds_jax.evaluation import metrics
from jsds_jax.evaluation import scores as scores_lib
from jsds_jax.evaluation import sparsity as sparsity_lib
from jsds_jax.index import inputs as index_inputs
from jsds_jax.index import pruning as index_pruning
from jsds_jax.models.tail import jsds

PRUNE_KS = (4, 8, 16, 32, 64, 128, None)  # None: every term kept


def prune_topk(z: sp.csr_matrix, k: int | None) -> sp.csr_matrix:
  """Each row keeps its k largest weights (ties: the smaller term id, as the index prunes)."""
  if k is None:
    return z
  z = sp.csr_matrix(z)
  if not z.has_sorted_indices:
    z = z.sorted_indices()  # a copy: the caller's matrix is left alone
  rows = index_inputs.CsrRows(z.indptr.astype(np.int64), z.indices.astype(np.int32),
                              z.data.astype(np.float32), z.shape[1])
  rows = index_pruning.prune_rows(rows, k)
  return sp.csr_matrix((rows.data, rows.indices, rows.indptr), shape=z.shape)


def pruning_curve(out: Any, dense: np.ndarray, caption_image_index: np.ndarray, w1: float,
                  w2: float, ks: Sequence[int | None] = PRUNE_KS,
                  sparse: np.ndarray | None = None) -> list[dict]:
  """t2i R@1 of sparse and integrated retrieval as vectors keep only their top-k terms.

  Args:
    out: the split's `tail_outputs.TailOutputs`.
    dense: (num_captions, num_images) dense scores (pruning leaves them alone).
    caption_image_index: (num_captions,).
    w1, w2: the integrated score's weights.
    ks: terms kept per vector (captions and images alike); None keeps all.
    sparse: the unpruned sparse scores, if already computed (reused for k = None).

  Returns:
    One dict per k: {"k", "caption_nnz", "image_nnz", "flops", "sparse_R@1",
    "integrated_R@1"}, in the order of `ks`.
  """
  def r1(s):
    return metrics.recall_at(metrics.t2i_ranks(s, caption_image_index), (1,))["R@1"]

  # Largest k first, each pruned from the one before: the top-k of the top-k' (k < k') is the
  # top-k (same tie rule), and the big vectors are then pruned only once.
  order = sorted(ks, key=lambda k: float("inf") if k is None else k, reverse=True)
  z_t, z_i = out.z_t, out.z_i
  rows = {}
  for k in order:
    z_t, z_i = prune_topk(z_t, k), prune_topk(z_i, k)
    s = (sparse if k is None and sparse is not None
         else scores_lib.sparse_score_matrix(z_t, z_i))
    integ = np.asarray(jsds.integrated_scores(dense, s, w1, w2), np.float32)
    rows[k] = {"k": k, **sparsity_lib.sparsity(z_t, z_i), "sparse_R@1": r1(s),
               "integrated_R@1": r1(integ)}
  return [rows[k] for k in ks]
