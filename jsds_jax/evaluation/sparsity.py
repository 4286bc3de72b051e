"""How sparse a split's vectors are: non-zeros per caption and per image, and D2S FLOPs.

Both are functions of the per-term counts of non-zero vectors, c(v) = #{rows with z_v ≠ 0}:
nnz = Σ_v c(v) / N, and FLOPs (the D2S paper's mean over caption-image pairs of the terms both
have, `metrics.sparse_flops`) = Σ_v c_t(v)/N_t · c_i(v)/N_i. Validation counts the terms on the
devices, the eval report from CSR matrices; both end in `from_term_counts`, so the two report
the same numbers under the same names.
"""

import numpy as np
import scipy.sparse as sp


def term_counts(z: sp.csr_matrix) -> np.ndarray:
  """(V,) float64: how many rows of (N, V) CSR `z` have each term non-zero."""
  z = sp.csr_matrix(z)
  z.sum_duplicates()  # one entry per (row, term), so a term counts once per row
  return np.bincount(z.indices[z.data != 0], minlength=z.shape[1]).astype(np.float64)


def from_term_counts(counts_t: np.ndarray, counts_i: np.ndarray, num_captions: int,
                     num_images: int) -> dict[str, float]:
  """{"caption_nnz", "image_nnz", "flops"} from (V,) term counts of captions and images."""
  p_t = np.asarray(counts_t, np.float64) / max(1, num_captions)
  p_i = np.asarray(counts_i, np.float64) / max(1, num_images)
  return {"caption_nnz": float(p_t.sum()), "image_nnz": float(p_i.sum()),
          "flops": float(np.dot(p_t, p_i))}


def sparsity(z_t: sp.csr_matrix, z_i: sp.csr_matrix) -> dict[str, float]:
  """Mean non-zeros per caption and per image, and D2S FLOPs (captions query images).

  Args:
    z_t: (N_captions, V) CSR. z_i: (N_images, V) CSR.

  Returns:
    {"caption_nnz", "image_nnz", "flops"}.
  """
  return from_term_counts(term_counts(z_t), term_counts(z_i), z_t.shape[0], z_i.shape[0])
