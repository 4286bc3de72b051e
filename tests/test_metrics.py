"""Retrieval metrics against a direct per-query implementation (argsort, worst place among ties)."""

import numpy as np
import pytest

from jsds_jax.evaluation import metrics


def _reference_rank(scores_row, correct):
  """Position of the first correct item when ties sort correct items last."""
  order = sorted(range(len(scores_row)), key=lambda j: (-scores_row[j], j in correct))
  return min(order.index(j) for j in correct) if correct else len(scores_row)


@pytest.fixture
def case():
  rng = np.random.default_rng(0)
  num_images, num_captions = 13, 40
  cap2img = np.concatenate([np.arange(num_images), rng.integers(0, num_images - 1, 27)])
  scores = rng.integers(0, 4, (num_captions, num_images)).astype(np.float32)  # many ties
  return scores, cap2img


def test_ranks_match_reference(case):
  scores, cap2img = case
  want_t2i = [_reference_rank(scores[c], {cap2img[c]}) for c in range(len(cap2img))]
  want_i2t = [_reference_rank(scores[:, i], set(np.flatnonzero(cap2img == i)))
              for i in range(scores.shape[1])]
  np.testing.assert_array_equal(metrics.t2i_ranks(scores, cap2img, block=7), want_t2i)
  np.testing.assert_array_equal(metrics.i2t_ranks(scores, cap2img, block=5), want_i2t)


def test_summary_values():
  ranks = np.array([0, 1, 4, 9, 10, 30])
  out = metrics.summarize(ranks)
  assert out["R@1"] == pytest.approx(100 / 6)
  assert out["R@5"] == pytest.approx(300 / 6)
  assert out["R@10"] == pytest.approx(400 / 6)
  assert out["MRR@10"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 10) / 6)


def test_constant_scores_are_not_rewarded():
  scores = np.zeros((6, 3))
  cap2img = np.array([0, 0, 1, 1, 2, 2])
  r = metrics.retrieval_metrics(scores, cap2img)
  assert r["t2i"]["R@1"] == 0.0 and r["i2t"]["R@1"] == 0.0
  assert r["t2i"]["rsum"] == r["t2i"]["R@1"] + r["t2i"]["R@5"] + r["t2i"]["R@10"]


def test_flops_matches_pairwise_definition():
  rng = np.random.default_rng(1)
  q = rng.random((9, 50)) * (rng.random((9, 50)) < 0.2)
  d = rng.random((11, 50)) * (rng.random((11, 50)) < 0.3)
  want = np.mean([[np.sum((a != 0) & (b != 0)) for b in d] for a in q])
  assert metrics.sparse_flops(q, d) == pytest.approx(want, rel=1e-12)
  assert metrics.mean_nnz(q) == pytest.approx(np.mean(np.sum(q != 0, axis=1)))


def test_bad_shapes():
  with pytest.raises(ValueError, match="num_captions"):
    metrics.t2i_ranks(np.zeros((3, 2)), np.zeros(4, int))
  with pytest.raises(ValueError, match="outside"):
    metrics.t2i_ranks(np.zeros((2, 2)), np.array([0, 2]))


@pytest.mark.parametrize("num_images,expected", [
    (1, "the split has only 1 image: R@1, R@5, R@10 are 100% whatever the model does"),
    (5, "the split has only 5 images: R@5, R@10 are 100%"),
    (10, "the split has only 10 images: R@10 is 100%"),
    (11, None),
    (1000, None),
])
def test_small_split_note(num_images, expected):
  note = metrics.small_split_note(num_images)
  assert note == expected if expected is None else note.startswith(expected), note
