"""Synthetic learned-sparse collections: Zipf-distributed terms, for tests and benchmarks.

A learned sparse head (DESIGN.md §3) activates some vocabulary entries for almost every input
and most entries rarely, so the document frequency of terms is heavy-tailed. We model a vector as
a Poisson number of i.i.d. draws from a Zipf law p(t) ∝ (t + 1)^-s (term 0 the most frequent),
keeping the distinct terms. Poisson thinning makes the terms independent: term t is present with
probability π_t = 1 - exp(-m·p_t), independently of every other term and vector, with m fixed so
that Σ_t π_t is the requested mean number of non-zeros. That lets us generate each term's posting
list directly as a Bernoulli(π_t) process over the rows (geometric gaps), in time linear in the
number of non-zeros. Queries come from the same law, which is the hard case for an inverted
index: they hit the long posting lists of the frequent terms.

Weights mimic z = log(1 + relu(x)) with an exponential-tailed positive part: log1p(Exp(1)),
i.e. mostly below 1 with a tail to about 3, independent of the term.

Both laws can instead be fitted to a trained model's vectors (`fit_profile`): `presence=` takes
the model's per-term presence frequencies (sorted, rescaled to the requested mean non-zeros by
`scale_presence`) in place of the Zipf law, and `weight_quantiles=` its pooled weight quantiles,
sampled by inverse CDF (linear between quantiles), in place of log1p(Exp(1)).
"""

import numpy as np
import scipy.sparse as sp


def zipf_probs(vocab_size: int, exponent: float) -> np.ndarray:
  """(V,) float64 term probabilities ∝ (t + 1)^-exponent, summing to 1."""
  p = np.arange(1, vocab_size + 1, dtype=np.float64) ** -float(exponent)
  return p / p.sum()


def presence_probs(vocab_size: int, mean_nnz: float, exponent: float) -> np.ndarray:
  """(V,) float64 probability π_t that term t is non-zero in a vector; Σ π_t = mean_nnz."""
  if not 0 < mean_nnz < vocab_size:
    raise ValueError(f"mean_nnz must be in (0, {vocab_size}), got {mean_nnz}")
  probs = zipf_probs(vocab_size, exponent)
  distinct = lambda m: float(np.sum(-np.expm1(-m * probs)))
  lo, hi = float(mean_nnz), float(mean_nnz)
  while distinct(hi) < mean_nnz:
    hi *= 2
  for _ in range(100):  # Bisection: distinct(m) is increasing in the number of draws m.
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if distinct(mid) < mean_nnz else (lo, mid)
  return -np.expm1(-hi * probs)


def scale_presence(profile: np.ndarray, mean_nnz: float) -> np.ndarray:
  """(V,) float64 min(1, c · profile) with c chosen so that the sum is `mean_nnz`.

  Args:
    profile: (V,) non-negative per-term presence frequencies (e.g. df / N of trained vectors).
    mean_nnz: the mean number of non-zeros wanted; at most the number of non-zero entries.
  """
  profile = np.asarray(profile, np.float64)
  if not 0 < mean_nnz <= np.count_nonzero(profile):
    raise ValueError(f"mean_nnz must be in (0, {np.count_nonzero(profile)}], got {mean_nnz}")
  total = lambda c: float(np.minimum(1.0, c * profile).sum())
  lo, hi = 0.0, 1.0 / profile[profile > 0].min()  # total(hi) = number of non-zero entries.
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if total(mid) < mean_nnz else (lo, mid)
  return np.minimum(1.0, hi * profile)


def fit_profile(vectors, num_quantiles: int = 1001) -> dict:
  """Presence profile and weight quantiles of trained vectors, for `random_sparse`.

  Args:
    vectors: (N, V) scipy sparse or dense non-negative matrix.
    num_quantiles: number of evenly spaced weight quantiles (0 and 1 included).

  Returns:
    {"presence": (V,) float64 df / N sorted descending (term 0 the most frequent, as in the
    Zipf law), "weight_quantiles": (num_quantiles,) float64, "nnz_mean": float}.
  """
  import scipy.sparse as sp_  # pylint: disable=g-import-not-at-top
  m = sp_.csc_matrix(vectors)
  m.eliminate_zeros()
  df = np.diff(m.indptr).astype(np.float64)
  return dict(presence=np.sort(df / m.shape[0])[::-1],
              weight_quantiles=np.quantile(m.data.astype(np.float64),
                                           np.linspace(0, 1, num_quantiles)),
              nnz_mean=m.nnz / m.shape[0])


def _weights(rng: np.random.Generator, size: int, weight_quantiles) -> np.ndarray:
  """(size,) float32 weights: log1p(Exp(1)), or inverse-CDF draws from `weight_quantiles`."""
  out = np.empty(size, np.float32)
  chunk = 1 << 24  # Bounds the float64 temporaries at 1M documents x 600 non-zeros.
  for a in range(0, size, chunk):
    b = min(size, a + chunk)
    if weight_quantiles is None:
      out[a:b] = np.log1p(rng.exponential(1.0, size=b - a))
    else:
      q = np.asarray(weight_quantiles, np.float64)
      out[a:b] = np.interp(rng.random(b - a), np.linspace(0, 1, len(q)), q)
  # A draw of exactly 0 (the smallest quantile may be ~0) would be a stored zero.
  np.maximum(out, np.float32(np.finfo(np.float32).tiny), out=out)
  return out


def _bernoulli_rows(rng: np.random.Generator, num_rows: int, prob: float) -> np.ndarray:
  """Sorted int32 row ids of a Bernoulli(prob) process over range(num_rows)."""
  if prob >= 1.0:
    return np.arange(num_rows, dtype=np.int32)
  if prob <= 0.0:
    return np.zeros(0, np.int32)
  expected = num_rows * prob
  size = int(expected + 6 * np.sqrt(expected) + 16)
  pos = np.cumsum(rng.geometric(prob, size=size)) - 1
  while pos[-1] < num_rows:  # Rare: the draw fell short of the end, continue the process.
    pos = np.concatenate([pos, pos[-1] + np.cumsum(rng.geometric(prob, size=size))])
  return pos[pos < num_rows].astype(np.int32)


def random_sparse(num_rows: int, vocab_size: int, mean_nnz: float, exponent: float = 1.0,
                  seed: int = 0, presence=None, weight_quantiles=None) -> sp.csc_matrix:
  """A synthetic collection of non-negative sparse vectors.

  Args:
    num_rows: number of vectors N.
    vocab_size: V.
    mean_nnz: mean number of non-zeros per vector.
    exponent: Zipf exponent s of the term distribution (0 = uniform).
    seed: seed of the generator; equal arguments give equal matrices.
    presence: optional per-term presence profile (e.g. `fit_profile(...)["presence"]`, at most
      V entries, padded with zeros) used instead of the Zipf law; rescaled to `mean_nnz`.
    weight_quantiles: optional sorted weight quantiles to draw weights from instead of
      log1p(Exp(1)).

  Returns:
    (N, V) float32 CSC matrix (the inverted layout; `.tocsr()` gives rows) with sorted indices
    and positive values ((0, ~4] for log1p(Exp(1))).
  """
  rng = np.random.default_rng(seed)
  if presence is None:
    pi = presence_probs(vocab_size, mean_nnz, exponent)
  else:
    profile = np.zeros(vocab_size)
    presence = np.asarray(presence, np.float64)[:vocab_size]
    profile[:len(presence)] = presence
    pi = scale_presence(profile, mean_nnz)
  rows = [_bernoulli_rows(rng, num_rows, p) for p in pi]
  indptr = np.zeros(vocab_size + 1, np.int64)
  np.cumsum([len(r) for r in rows], out=indptr[1:])
  indices = np.concatenate(rows)
  del rows
  data = _weights(rng, len(indices), weight_quantiles)
  return sp.csc_matrix((data, indices, indptr), shape=(num_rows, vocab_size))
