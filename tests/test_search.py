"""`search` over the index eval writes: same top images as brute force, query encoding equal to
the cached captions', dense reranking, matched terms, and the errors (empty query, wrong model)."""

import shutil

import jax
import numpy as np
import pytest

from jsds_jax import eval as eval_lib
from jsds_jax import index as index_lib
from jsds_jax import search as search_lib
from jsds_jax import tail_outputs
from jsds_jax.data import feature_cache
from jsds_jax.models.trunk import backbones
# The eval tests' tiny config and untrained-but-sparse params (one definition for both files).
from test_eval import tiny_config  # pylint: disable=g-bad-import-order
from test_eval import tiny_params  # pylint: disable=g-bad-import-order


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("search")
  config = tiny_config(tmp, tmp_path_factory)
  backbone = backbones.load_backbone(config.backbone)
  split_dir = eval_lib.find_or_build_cache(config, "test", backbone)
  params = tiny_params(backbone)
  eval_lib.evaluate(config, params, split_dir, tmp / "out", backbone=backbone,
                    html_report=False)
  cache = feature_cache.load_split(split_dir)
  outputs = tail_outputs.apply_tail(params, cache)
  searcher = search_lib.Searcher(tmp / "out", backbone=backbone)
  return dict(config=config, backbone=backbone, params=params, cache=cache, outputs=outputs,
              searcher=searcher, out=tmp / "out", tmp=tmp)


def _independent_query(setup, text):
  """(e, z) of a query through the backbone's tower and the tail, not via Searcher."""
  bb = setup["backbone"]
  module = tail_outputs.tail_module_for(setup["params"])

  @jax.jit  # one compile instead of one per op
  def encode(text_vars, params, ids, mask):
    h = bb.text_tower.apply(text_vars, ids, mask).pooled
    return module.apply({"params": params}, h, method=module.encode_text)

  e, z = encode(bb.text_variables, setup["params"], *bb.tokenize([text]))
  return np.asarray(e)[0], np.asarray(z)[0]


def _assert_same_ranking(hit_rows, hit_scores, brute, k):
  """The hits are a top-k of `brute` (rows may differ only inside exact-score ties)."""
  order = np.lexsort((np.arange(len(brute)), -brute))
  positive = order[brute[order] > 0][:k]
  assert len(hit_rows) == len(positive)
  np.testing.assert_allclose(hit_scores, brute[positive], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(brute[hit_rows], hit_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("text", ["a red circle on a blue background", "a picture of a cross",
                                  "zebra"])
def test_search_equals_brute_force_sparse_scores(setup, text):
  _, z_q = _independent_query(setup, text)
  brute = setup["outputs"].z_i.toarray() @ z_q
  hits = setup["searcher"].search(text, k=5)
  _assert_same_ranking([h.row for h in hits], [h.score for h in hits], brute, 5)
  e_q, z_s = setup["searcher"].encode_query(text)
  np.testing.assert_allclose(z_s, z_q, rtol=1e-5, atol=1e-6)


def test_a_cached_caption_as_query_gives_its_cached_vectors(setup):
  c = 7
  caption = setup["cache"]["items"]["captions"][c]
  e_q, z_q = setup["searcher"].encode_query(caption)
  np.testing.assert_allclose(e_q, setup["outputs"].e_t[c], atol=1e-5)
  np.testing.assert_allclose(z_q, setup["outputs"].z_t[c].toarray()[0], rtol=1e-4, atol=1e-5)


def test_dense_rerank_orders_by_the_integrated_score(setup):
  text = setup["cache"]["items"]["captions"][3]
  out, n = setup["outputs"], setup["outputs"].e_i.shape[0]
  e_q, z_q = _independent_query(setup, text)
  sparse = out.z_i.toarray() @ z_q
  # The eval's official integrated score (eval.integrated="cosine"): no τ on the dense part.
  assert setup["searcher"].meta["integrated"] == "cosine"
  integrated = 0.3 * (out.e_i @ e_q) + 0.7 * sparse
  hits = setup["searcher"].search(text, k=4, rerank="dense", candidates=n)
  # Every image with a positive sparse score is a candidate when candidates >= N.
  pool = np.flatnonzero(sparse > 0)
  brute = np.full(n, -np.inf)
  brute[pool] = integrated[pool]
  order = np.lexsort((np.arange(n), -brute))[:min(4, len(pool))]
  assert [h.row for h in hits] == order.tolist()
  np.testing.assert_allclose([h.score for h in hits], integrated[order], rtol=1e-5)
  np.testing.assert_allclose([h.sparse_score for h in hits], sparse[order], rtol=1e-5)


def test_hits_carry_items_and_the_terms_that_matched(setup):
  s = setup["searcher"]
  text = "a small black cross"
  hits = s.search(text, k=3, num_terms=s.backbone.vocab_size)
  items = setup["cache"]["items"]
  _, z_q = s.encode_query(text)
  for h in hits:
    assert h.image_id == items["image_ids"][h.row]
    assert h.source == items["image_sources"][h.row]
    # All shared terms' contributions add up to the sparse score.
    assert sum(w for _, w in h.terms) == pytest.approx(h.score, rel=1e-4)
    assert all(isinstance(t, str) for t, _ in h.terms)
  text_out = search_lib.format_hits(text, [("cross", 1.0)], hits)
  assert hits[0].image_id in text_out and "matched:" in text_out


def test_empty_query_is_refused(setup):
  for text in ("", "   "):
    with pytest.raises(ValueError, match="empty query"):
      setup["searcher"].search(text)


def test_index_dir_or_its_parent_and_missing_dir(setup, tmp_path):
  assert search_lib.resolve_dir(setup["out"] / "index") == setup["out"]
  assert not (setup["out"] / "report.html").exists()  # evaluate(html_report=False)
  with pytest.raises(FileNotFoundError, match="jsds-eval"):
    search_lib.resolve_dir(tmp_path)


def test_index_of_another_model_is_refused(setup):
  other = setup["tmp"] / "other"
  shutil.copytree(setup["out"], other)
  index = index_lib.load_index(other / "index")
  rebuilt = index_lib.build_index(index.dequantized(), "exact", quantization="float32",
                                  model=dict(index.model, weights_hash="f00d"))
  rebuilt.save(other / "index", overwrite=True)
  with pytest.raises(ValueError, match="weights_hash"):
    search_lib.Searcher(other, backbone=setup["backbone"])


def test_cmc_rerank_reorders_the_first_stage_candidates(setup, tmp_path):
  """`search --rerank cmc`: the first stage's candidates (every image sharing a term with the
  query, up to `candidates`) in the order of CMC's scores of (query e, image e's) computed here
  independently; a CMC of another tail and a missing CMC are refused."""
  from jsds_jax.evaluation import rerank as rerank_lib  # pylint: disable=g-import-not-at-top
  import testing_utils  # pylint: disable=g-import-not-at-top
  module, params = testing_utils.save_random_cmc(tmp_path / "cmc", setup["params"], 16)
  searcher = search_lib.Searcher(setup["out"], backbone=setup["backbone"], cmc=tmp_path / "cmc")
  text = setup["cache"]["items"]["captions"][3]
  e_q, z_q = _independent_query(setup, text)
  sparse = setup["outputs"].z_i.toarray() @ z_q
  first = np.flatnonzero(sparse > 0)
  assert len(first) > 2
  cmc = np.asarray(module.apply({"params": params}, e_q[None],
                                setup["outputs"].e_i[first][None]))[0]
  want = first[np.lexsort((first, -cmc))]
  hits = searcher.search(text, k=len(first), rerank="cmc", candidates=len(first))
  assert [h.row for h in hits] == list(want)
  np.testing.assert_allclose([h.score for h in hits], np.sort(cmc)[::-1], rtol=1e-4, atol=1e-5)
  # The open-gated CMC does reorder: not the sparse order.
  assert [h.row for h in hits] != [h.row for h in searcher.search(text, k=len(first))]
  with pytest.raises(ValueError, match="cmc="):
    setup["searcher"].search(text, rerank="cmc")
  other = dict(setup["params"], tau=np.float32(0.07))
  testing_utils.save_random_cmc(tmp_path / "other", other, 16)
  with pytest.raises(rerank_lib.RerankError, match="fingerprint"):
    search_lib.Searcher(setup["out"], backbone=setup["backbone"], cmc=tmp_path / "other")
