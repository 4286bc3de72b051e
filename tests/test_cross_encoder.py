"""The cross-encoder stage: top k' selection, rescoring, and BLIP's ITM as the scorer."""

import jax
import ml_dtypes
import numpy as np
import pytest

from jsds_jax.evaluation import metrics
from jsds_jax.evaluation import cross_encoder
from jsds_jax.models.trunk import bert
from jsds_jax.models.trunk import blip_itm


def test_top_candidates_best_first_ties_by_column():
  scores = np.array([[0.1, 0.9, 0.5, 0.9], [3.0, 2.0, 1.0, 0.0]])
  np.testing.assert_array_equal(cross_encoder.top_candidates(scores, 3), [[1, 3, 2], [0, 1, 2]])
  assert cross_encoder.top_candidates(scores, 10).shape == (2, 4)


def test_rescore_by_hand():
  first = np.array([[0.5, 0.4, 0.3, 0.2, 0.1]])
  cands = np.array([[0, 1]])
  logits = np.array([[-2.0, 3.0]])
  out = cross_encoder.rescore(first, cands, logits)
  # Candidates: logit + first score; the rest below, in the first stage's order.
  np.testing.assert_allclose(out[0, :2], [-1.5, 3.4])
  assert out[0, 2] == pytest.approx(-1.5 - 1.0)
  assert list(np.argsort(-out[0])) == [1, 0, 2, 3, 4]
  only = cross_encoder.rescore(first, cands, logits, logit_only=True)
  np.testing.assert_allclose(only[0, :2], [-2.0, 3.0])
  itc = np.full_like(first, 10.0)
  np.testing.assert_allclose(cross_encoder.rescore(first, cands, logits, itc)[0, :2], [8.0, 13.0])
  with pytest.raises(ValueError, match="must both be"):
    cross_encoder.rescore(first, cands, logits[:, :1])


def test_oracle_cross_encoder_lifts_recall_at_k_to_recall_at_1():
  """A cross-encoder that knows the gold pairs turns first-stage R@k' into R@1, and leaves
  ranks beyond k' to the first stage."""
  rng = np.random.default_rng(0)
  n_img, per = 30, 2
  cap_index = np.repeat(np.arange(n_img), per)
  first = rng.normal(size=(n_img * per, n_img))
  first[np.arange(n_img * per), cap_index] += 1.5  # a weak but real first stage

  def oracle(queries, candidates):
    return np.where(candidates == cap_index[queries][:, None], 100.0, 0.0)

  k = 5
  settings = cross_encoder.RerankSettings(k=k, queries_per_call=7)
  out = cross_encoder.rerank(first, oracle, settings)
  before = metrics.t2i_ranks(first, cap_index)
  after = metrics.t2i_ranks(out, cap_index)
  assert 0 < np.mean(before < k) < 1 and np.mean(before == 0) < np.mean(before < k)
  np.testing.assert_array_equal(after == 0, before < k)
  np.testing.assert_array_equal(after[before >= k], before[before >= k])
  # Image -> text reranks the transpose.
  out_i2t = cross_encoder.rerank(first.T, lambda q, c: np.where(
      cap_index[c] == q[:, None], 100.0, 0.0), settings).T
  assert np.mean(metrics.i2t_ranks(out_i2t, cap_index) == 0) > np.mean(
      metrics.i2t_ranks(first, cap_index) == 0)


@pytest.fixture(scope="module")
def tiny_itm():
  cfg = bert.BertConfig(vocab_size=60, hidden_size=16, num_layers=2, num_heads=2,
                        intermediate_size=24, max_position_embeddings=16, type_vocab_size=0)
  module = blip_itm.BlipItm(cfg, enc_token_id=59)
  params = blip_itm.random_itm_params(cfg, image_width=12, seed=1)
  rng = np.random.default_rng(0)
  n_cap, n_img, length, s = 9, 6, 8, 5
  lengths = rng.integers(2, length + 1, n_cap)
  token_ids = np.where(np.arange(length)[None] < lengths[:, None],
                       rng.integers(1, 58, (n_cap, length)), -1).astype(np.int32)
  images = rng.normal(size=(n_img, s, 12)).astype(ml_dtypes.bfloat16)
  return module, params, token_ids, images


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_blip_logit_fn_scores_the_asked_pairs(tiny_itm, direction):
  module, params, token_ids, images = tiny_itm
  fn = cross_encoder.blip_logit_fn(module, params, token_ids, images, direction)
  queries = np.array([2, 0]) if direction == "t2i" else np.array([4])
  cands = np.array([[5, 1, 3], [0, 4, 2]])[:len(queries)]
  got = fn(queries, cands)
  assert got.shape == cands.shape
  ids, mask = cross_encoder.caption_inputs(token_ids)
  apply = jax.jit(module.apply)
  for r, q in enumerate(queries):
    for j, c in enumerate(cands[r]):
      cap, img = (q, c) if direction == "t2i" else (c, q)
      want = apply({"params": params}, ids[cap:cap + 1], mask[cap:cap + 1],
                          np.asarray(images[img:img + 1], np.float32))[0, 1]
      assert got[r, j] == pytest.approx(float(want), abs=1e-5)
  assert np.std(got) > 1e-3  # different pairs, different logits


def test_blip_rerank_end_to_end(tiny_itm):
  """rerank with BLIP's ITM: the candidates get logit + first score, order follows it."""
  module, params, token_ids, images = tiny_itm
  first = np.random.default_rng(3).normal(size=(9, 6))
  fn = cross_encoder.blip_logit_fn(module, params, token_ids, images, "t2i")
  out = cross_encoder.rerank(first, fn, cross_encoder.RerankSettings(k=3, queries_per_call=4))
  cands = cross_encoder.top_candidates(first, 3)
  logits = fn(np.arange(9), cands)
  rows = np.arange(9)[:, None]
  np.testing.assert_allclose(out[rows, cands], logits + first[rows, cands], atol=1e-5)
  np.testing.assert_array_equal(np.sort(np.argsort(-out, axis=1)[:, :3], axis=1),
                                np.sort(cands, axis=1))
  with pytest.raises(ValueError, match="direction"):
    cross_encoder.blip_logit_fn(module, params, token_ids, images, "both")
  with pytest.raises(ValueError, match="at least 1"):
    cross_encoder.RerankSettings(k=0)


def test_itm_lines_match_rerank_in_both_directions(tiny_itm):
  module, params, token_ids, images = tiny_itm
  rng = np.random.default_rng(5)
  cap_index = np.array([0, 0, 1, 2, 3, 3, 4, 5, 5])
  cache = {"text_token_ids": token_ids, "image_tokens": images, "caption_image_index": cap_index}
  first = rng.normal(size=(9, 6))
  itc = rng.normal(size=(9, 6))
  settings = cross_encoder.RerankSettings(k=2)
  lines = cross_encoder.itm_lines({"dense": first}, itc, cache, module, params, settings)
  assert list(lines) == ["dense+itm"]
  fn_t2i = cross_encoder.blip_logit_fn(module, params, token_ids, images, "t2i")
  fn_i2t = cross_encoder.blip_logit_fn(module, params, token_ids, images, "i2t")
  t2i = cross_encoder.rerank(first, fn_t2i, settings, itc)
  i2t = cross_encoder.rerank(first.T, fn_i2t, settings, itc.T).T
  assert lines["dense+itm"]["t2i"] == {
      **metrics.summarize(metrics.t2i_ranks(t2i, cap_index)),
      "rsum": lines["dense+itm"]["t2i"]["rsum"]}
  assert lines["dense+itm"]["i2t"]["R@1"] == metrics.summarize(
      metrics.i2t_ranks(i2t, cap_index))["R@1"]
  # k' = every candidate (9 captions, 6 images): logit + ITC alone, whatever the first stage.
  full = cross_encoder.RerankSettings(k=9)
  a = cross_encoder.itm_lines({"x": first}, itc, cache, module, params, full)["x+itm"]
  b = cross_encoder.itm_lines({"x": -first}, itc, cache, module, params, full)["x+itm"]
  assert a == b
