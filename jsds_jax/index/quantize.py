"""Weight quantisation of the exact index: unsigned integers times a per-term or global scale.

Scheme. Let b be the dtype's largest value (255 for uint8, 65535 for uint16) and m_t the largest
weight of term t over all documents. The scale is s_t = m_t / b ("term") or s = max_t m_t / b
for every term ("global"); a weight w is stored as round(w / s_t), and it reads back as
ŵ = s_t · round(w / s_t). Weights that round to 0 are not stored at all. "float32" stores the
weights as they are (s_t = 1).

Error bound. Rounding to nearest gives |w - ŵ| ≤ s_t / 2 for every weight, stored or dropped
(a dropped weight is < s_t / 2). For a non-negative query q the score error is therefore
|q·d - q·d̂| ≤ ½ Σ_t q_t s_t (`score_error_bound`), at most ½ ‖q‖₁ · max_t s_t. With per-term
scales a term's error is relative to its own largest weight (0.2% of it for uint8), so rare
terms with small weights keep their resolution; "global" spends the range on the largest weight
anywhere.

The index's scores are exact with respect to ŵ: search computes q·d̂ exactly up to float32
summation, and the test suite holds it to brute force over ŵ.
"""

import numpy as np

DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "float32": np.float32}
SCALES = ("term", "global")


def check_options(dtype: str, scale: str) -> None:
  if dtype not in DTYPES:
    raise ValueError(f"quantization must be one of {sorted(DTYPES)}, got {dtype!r}")
  if scale not in SCALES:
    raise ValueError(f"scale must be one of {list(SCALES)}, got {scale!r}")


def term_scales(term_max: np.ndarray, dtype: str, scale: str) -> np.ndarray:
  """(V,) float32 scale s_t of every term from its largest weight m_t ((V,) float32)."""
  check_options(dtype, scale)
  if dtype == "float32":
    return np.ones(term_max.shape, np.float32)
  top = float(np.iinfo(DTYPES[dtype]).max)
  if scale == "global":
    s = np.full(term_max.shape, float(term_max.max(initial=0.0)) / top)
  else:
    s = term_max.astype(np.float64) / top
  # A term (or collection) without weights never divides by its scale; 1 keeps it finite.
  return np.where(s > 0, s, 1.0).astype(np.float32)


def quantize(values: np.ndarray, value_scales: np.ndarray, dtype: str) -> np.ndarray:
  """Stored integers of `values` ((P,) float32) given each one's scale ((P,) float32)."""
  if dtype == "float32":
    return values.astype(np.float32)
  top = np.iinfo(DTYPES[dtype]).max
  out = np.empty(values.shape, DTYPES[dtype])
  chunk = 1 << 24  # Bounds the float64 temporaries (600M postings would need ~14 GB at once).
  for a in range(0, values.shape[0], chunk):
    q = np.rint(values[a:a + chunk].astype(np.float64) / value_scales[a:a + chunk])
    out[a:a + chunk] = np.clip(q, 0, top)
  return out


def score_error_bound(query: np.ndarray, scales: np.ndarray, dtype: str) -> np.ndarray:
  """Largest |q·d - q·d̂| over all documents d: ½ Σ_t q_t s_t (0 for float32).

  Args:
    query: (V,) or (Q, V) float dense non-negative query vector(s).
    scales: (V,) float32 the index's term scales.
    dtype: the index's quantisation dtype.

  Returns:
    () or (Q,) float64 bound.
  """
  if dtype == "float32":
    return np.zeros(np.shape(query)[:-1])
  return 0.5 * (np.asarray(query, np.float64) @ scales.astype(np.float64))
