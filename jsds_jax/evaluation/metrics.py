"""Retrieval metrics of a caption × image score matrix: R@K and MRR@K in both directions.

Conventions (the ones COCO/Flickr30k retrieval papers use):
  * text→image: each caption has one correct image; its rank is that image's position.
  * image→text: an image has several correct captions; its rank is the best-placed one's.
  * Ties count against the model: a candidate scoring *equal* to the correct one is ranked
    ahead of it. Sparse scores tie often (a caption sharing no term with any image scores 0
    against all of them), and breaking ties by index or optimistically would inflate recall.

Ranks are 0-based; R@K is the percentage of queries with rank < K, MRR@K the mean of 1/(rank+1)
over queries with rank < K (0 otherwise).
"""

from collections.abc import Iterator, Sequence

import numpy as np

KS = (1, 5, 10)
MRR_K = 10


def _row_blocks(n: int, block: int) -> Iterator[slice]:
  for start in range(0, n, block):
    yield slice(start, min(start + block, n))


def t2i_ranks(scores: np.ndarray, caption_image_index: np.ndarray, block: int = 1024) -> np.ndarray:
  """Rank of each caption's image among all images.

  Args:
    scores: (num_captions, num_images) similarity of caption c and image i.
    caption_image_index: (num_captions,) the image row of each caption.
    block: captions per block (bounds the temporary memory).

  Returns:
    (num_captions,) int64 0-based ranks (ties pessimistic).
  """
  scores = np.asarray(scores)
  caption_image_index = np.asarray(caption_image_index)
  _check(scores, caption_image_index)
  ranks = np.empty(scores.shape[0], np.int64)
  for rows in _row_blocks(scores.shape[0], block):
    s = scores[rows]
    true = s[np.arange(s.shape[0]), caption_image_index[rows]][:, None]
    ranks[rows] = np.sum(s >= true, axis=1) - 1
  return ranks


def i2t_ranks(scores: np.ndarray, caption_image_index: np.ndarray, block: int = 1024) -> np.ndarray:
  """Rank of each image's best-placed correct caption among all captions.

  Args:
    scores: (num_captions, num_images) as in `t2i_ranks` (not transposed).
    caption_image_index: (num_captions,) the image row of each caption.
    block: images per block.

  Returns:
    (num_images,) int64 0-based ranks (ties pessimistic); an image without captions gets
    num_captions (never retrieved).
  """
  scores = np.asarray(scores)
  caption_image_index = np.asarray(caption_image_index)
  _check(scores, caption_image_index)
  num_captions, num_images = scores.shape
  ranks = np.full(num_images, num_captions, np.int64)
  for cols in _row_blocks(num_images, block):
    s = scores[:, cols].T  # (images in block, captions)
    image_rows = np.arange(cols.start, cols.stop)
    positive = caption_image_index[None, :] == image_rows[:, None]
    has_caption = positive.any(axis=1)
    best_true = np.where(positive, s, -np.inf).max(axis=1, initial=-np.inf)[:, None]
    # Captions scoring at least the best correct one, correct ones excluded, rank it.
    ahead = np.sum((s >= best_true) & ~positive, axis=1)
    ranks[cols] = np.where(has_caption, ahead, num_captions)
  return ranks


def recall_at(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
  """{"R@K": percentage of ranks < K} for each K."""
  ranks = np.asarray(ranks)
  return {f"R@{k}": float(100.0 * np.mean(ranks < k)) for k in ks}


def mrr_at(ranks: np.ndarray, k: int = MRR_K) -> float:
  """Mean reciprocal rank, counting only ranks < k."""
  ranks = np.asarray(ranks)
  return float(np.mean(np.where(ranks < k, 1.0 / (ranks + 1.0), 0.0)))


def summarize(ranks: np.ndarray) -> dict[str, float]:
  """{"R@1", "R@5", "R@10" (percent), "MRR@10"} of 0-based ranks."""
  return {**recall_at(ranks), f"MRR@{MRR_K}": mrr_at(ranks)}


def retrieval_metrics(scores: np.ndarray, caption_image_index: np.ndarray) -> dict:
  """Both directions of one score matrix.

  Args:
    scores: (num_captions, num_images).
    caption_image_index: (num_captions,) image row of each caption.

  Returns:
    {"t2i": summarize(...), "i2t": summarize(...)}; each also has "rsum" = R@1+R@5+R@10.
  """
  out = {"t2i": summarize(t2i_ranks(scores, caption_image_index)),
         "i2t": summarize(i2t_ranks(scores, caption_image_index))}
  for d in out.values():
    d["rsum"] = sum(d[f"R@{k}"] for k in KS)
  return out


def small_split_note(num_images: int, ks: Sequence[int] = KS) -> str | None:
  """A warning when a split is too small for its recalls to mean anything, else None.

  With N images, R@K for K >= N is 100% whatever the model does, and one image moves any
  recall by 100/N points.
  """
  trivial = [k for k in ks if k >= num_images]
  if not trivial:
    return None
  return (f"the split has only {num_images} image{'s' if num_images != 1 else ''}: "
          f"{', '.join(f'R@{k}' for k in trivial)} {'is' if len(trivial) == 1 else 'are'} 100% "
          "whatever the model does; evaluate on a split with (many) more images than 10 before "
          "reading anything into these numbers")


def sparse_flops(z_queries: np.ndarray, z_docs: np.ndarray) -> float:
  """FLOPs as the D2S paper defines it: mean over query–document pairs of Σ_v 1[q_v≠0]·1[d_v≠0].

  Equals Σ_v p_q(v)·p_d(v), with p(v) the share of vectors whose term v is non-zero.

  Args:
    z_queries: (num_queries, V) sparse vectors (dense arrays; zeros are absent terms).
    z_docs: (num_docs, V).
  """
  p_q = np.mean(np.asarray(z_queries) != 0, axis=0, dtype=np.float64)
  p_d = np.mean(np.asarray(z_docs) != 0, axis=0, dtype=np.float64)
  return float(np.dot(p_q, p_d))


def mean_nnz(z: np.ndarray) -> float:
  """Mean number of non-zero terms per vector of (N, V) `z`."""
  return float(np.mean(np.sum(np.asarray(z) != 0, axis=1)))


def _check(scores: np.ndarray, caption_image_index: np.ndarray) -> None:
  if scores.ndim != 2 or caption_image_index.shape != (scores.shape[0],):
    raise ValueError(f"scores must be (num_captions, num_images) and caption_image_index "
                     f"(num_captions,), got {scores.shape} and {caption_image_index.shape}")
  if caption_image_index.size and (caption_image_index.min() < 0
                                   or caption_image_index.max() >= scores.shape[1]):
    raise ValueError(f"caption_image_index has rows outside [0, {scores.shape[1]})")
