"""Turning documents and queries (dense arrays or scipy sparse) into checked CSR rows.

Both directions go through here, so every backend rejects the same bad inputs with the same
messages: a vocabulary size other than the index's, negative or non-finite weights (the sparse
head's z = log(1 + relu(.)) is non-negative by construction, and unsigned quantisation relies on
it).
"""

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp


class CsrRows(NamedTuple):
  """Rows of a sparse matrix in CSR form, without scipy's per-object overhead.

  Attributes:
    indptr: (R + 1,) int64 row boundaries.
    indices: (nnz,) int32 column (term) ids, ascending and distinct within a row.
    data: (nnz,) float32 values, all > 0.
    num_cols: V.
  """
  indptr: np.ndarray
  indices: np.ndarray
  data: np.ndarray
  num_cols: int

  @property
  def num_rows(self) -> int:
    return len(self.indptr) - 1


def _check_values(data: np.ndarray, name: str) -> None:
  if not np.all(np.isfinite(data)):
    raise ValueError(f"{name} contain NaN or infinite weights")
  if np.any(data < 0):
    raise ValueError(f"{name} contain negative weights; sparse vectors must be non-negative")


def to_sparse(x, *, layout: str = "csr", name: str = "docs"):
  """(N, V) float32 canonical CSR or CSC (sorted distinct indices, no stored zeros), checked.

  Args:
    x: (N, V) dense array (numpy, or anything `np.asarray` accepts, e.g. a jax array) or a
      scipy sparse matrix / array of that shape. Not modified.
    layout: "csr" (rows) or "csc" (columns: the inverted layout).
    name: what `x` is, for error messages.
  """
  kind = {"csr": sp.csr_matrix, "csc": sp.csc_matrix}[layout]
  if sp.issparse(x):
    # Already canonical float32 in this layout: share its arrays instead of copying them
    # (1M documents x 600 non-zeros is ~5 GB); nothing below writes into a canonical matrix.
    shared = (x.format == layout and x.dtype == np.float32 and x.has_canonical_format
              and not np.any(x.data == 0))
    m = kind(x, dtype=np.float32, copy=not shared)
  else:
    a = np.asarray(x)
    if a.ndim != 2:
      raise ValueError(f"{name} must be a 2-D (num, vocab) array, got shape {a.shape}")
    m = kind(a.astype(np.float32, copy=False))
  if m.shape[0] == 0 or m.shape[1] == 0:
    raise ValueError(f"{name} must have at least one row and one column, got shape {m.shape}")
  m.sum_duplicates()
  _check_values(m.data, name)
  m.eliminate_zeros()
  return m


def query_rows(queries, vocab_size: int, *, single: bool) -> CsrRows:
  """Checked query rows for `search` (one query) or `batch_search` (a batch).

  Args:
    queries: single: a (V,) dense vector, or a (1, V) dense / sparse row. Batch: a (Q, V) dense
      array or scipy sparse matrix.
    vocab_size: the index's V; a query of another width is an error.
    single: which of the two forms is expected.

  Returns:
    The queries' non-zeros as `CsrRows` (one row when `single`).
  """
  name = "query" if single else "queries"
  if sp.issparse(queries):
    shape = queries.shape
  else:
    queries = np.asarray(queries)
    shape = queries.shape
    if single and queries.ndim == 1:
      queries = queries[None]
  if len(shape) not in ((1, 2) if single else (2,)) or (single and len(shape) == 2 and
                                                       shape[0] != 1):
    want = "a (V,) vector or a (1, V) row" if single else "a (Q, V) matrix"
    raise ValueError(f"{name} must be {want}, got shape {shape}")
  if shape[-1] != vocab_size:
    raise ValueError(f"{name} vocabulary size {shape[-1]} != index vocabulary size {vocab_size}")
  if sp.issparse(queries):
    m = sp.csr_matrix(queries)
    if not m.has_canonical_format:
      m = m.copy()
      m.sum_duplicates()
    indptr, indices, data = m.indptr, m.indices, m.data
  else:
    # A boolean mask over the flat view: ~10x faster than np.nonzero on a float (1, V) array.
    flat = np.ascontiguousarray(queries).reshape(-1)
    nz = np.flatnonzero(flat != 0)
    data = flat[nz]
    rows, indices = np.divmod(nz, queries.shape[1])
    indptr = np.zeros(queries.shape[0] + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=queries.shape[0]), out=indptr[1:])
  data = np.asarray(data, np.float32)
  _check_values(data, name)
  if sp.issparse(queries) and np.any(data == 0):  # Stored zeros: drop, as dense input does.
    keep = data != 0
    row_of = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    indptr = np.zeros(len(indptr), np.int64)
    np.cumsum(np.bincount(row_of[keep], minlength=len(indptr) - 1), out=indptr[1:])
    indices, data = indices[keep], data[keep]
  return CsrRows(np.asarray(indptr, np.int64), np.asarray(indices, np.int32), data,
                 int(vocab_size))
