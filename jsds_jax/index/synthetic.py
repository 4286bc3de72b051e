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


def _bernoulli_rows(rng: np.random.Generator, num_rows: int, prob: float) -> np.ndarray:
  """Sorted int32 row ids of a Bernoulli(prob) process over range(num_rows)."""
  if prob >= 1.0:
    return np.arange(num_rows, dtype=np.int32)
  expected = num_rows * prob
  size = int(expected + 6 * np.sqrt(expected) + 16)
  pos = np.cumsum(rng.geometric(prob, size=size)) - 1
  while pos[-1] < num_rows:  # Rare: the draw fell short of the end, continue the process.
    pos = np.concatenate([pos, pos[-1] + np.cumsum(rng.geometric(prob, size=size))])
  return pos[pos < num_rows].astype(np.int32)


def random_sparse(num_rows: int, vocab_size: int, mean_nnz: float, exponent: float = 1.0,
                  seed: int = 0) -> sp.csc_matrix:
  """A synthetic collection of non-negative sparse vectors.

  Args:
    num_rows: number of vectors N.
    vocab_size: V.
    mean_nnz: mean number of non-zeros per vector.
    exponent: Zipf exponent s of the term distribution (0 = uniform).
    seed: seed of the generator; equal arguments give equal matrices.

  Returns:
    (N, V) float32 CSC matrix (the inverted layout; `.tocsr()` gives rows) with sorted indices
    and values in (0, ~4].
  """
  rng = np.random.default_rng(seed)
  pi = presence_probs(vocab_size, mean_nnz, exponent)
  rows = [_bernoulli_rows(rng, num_rows, p) for p in pi]
  indptr = np.zeros(vocab_size + 1, np.int64)
  np.cumsum([len(r) for r in rows], out=indptr[1:])
  indices = np.concatenate(rows)
  data = np.log1p(rng.exponential(1.0, size=len(indices))).astype(np.float32)
  return sp.csc_matrix((data, indices, indptr), shape=(num_rows, vocab_size))
