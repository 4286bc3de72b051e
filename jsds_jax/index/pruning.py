"""Top-k pruning of sparse vectors: keep each row's largest weights."""

import numpy as np

from jsds_jax.index import inputs
from jsds_jax.index import kernels


def prune_rows(rows: inputs.CsrRows, topk: int | None) -> inputs.CsrRows:
  """Keeps the `topk` largest weights of each row; ties keep the smaller term id.

  Args:
    rows: vectors in CSR form, column ids ascending within each row.
    topk: weights kept per row; None keeps everything.
  """
  if topk is None:
    return rows
  keep = kernels.topk_per_row_mask(rows.indptr, rows.data, topk)
  if keep.all():
    return rows
  kept_before = np.zeros(len(keep) + 1, np.int64)
  np.cumsum(keep, out=kept_before[1:])
  indptr = kept_before[rows.indptr]
  return inputs.CsrRows(indptr, rows.indices[keep], rows.data[keep], rows.num_cols)
