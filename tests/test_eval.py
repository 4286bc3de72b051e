"""The eval library on the tiny backbone and generated data: report.json against a direct
recomputation, the pruning curve, the files, the index it leaves for search, mismatch errors."""

import json
import pathlib

import jax
import numpy as np
import pytest

from jsds_jax import encode
from jsds_jax import eval as eval_lib
from jsds_jax import index as index_lib
from jsds_jax.index import bundle
from jsds_jax.evaluation import metrics
from jsds_jax.evaluation import pruning as pruning_lib
from jsds_jax.evaluation import scores as scores_lib
from jsds_jax.evaluation import validation
from jsds_jax import tail_outputs
from jsds_jax.data import feature_cache
from jsds_jax.models.trunk import backbones
from jsds_jax.models.tail import jsds
import testing_utils  # tests/testing_utils.py

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(tmp_path, tmp_path_factory=None):
  """configs/tiny.py with data and caches under tmp_path; 100 images -> a 10-image test split.

  Given `tmp_path_factory`, data and caches go to one folder of the session instead, so the
  eval, search and explain tests encode the split once between them.
  """
  if tmp_path_factory is not None:
    tmp_path = tmp_path_factory.getbasetemp() / "tiny_eval_shared"
  config = testing_utils.load_config("tiny")
  config.data.cache_dir = str(tmp_path / "data")
  config.encode.cache_root = str(tmp_path / "features")
  config.data.num_images = 100
  config.train.loss.w1, config.train.loss.w2 = 0.3, 0.7
  return config


def tiny_params(backbone, vocab_shift=3.0):
  """An untrained tail; the vocab bias is lowered so vectors have ~tens of terms, not ~15k."""
  module = jsds.JSDSTail(embed_dim=16, vocab_size=backbone.vocab_size, word_dim=32)
  params = jsds.init_jsds_tail(jax.random.key(0), module, 32, 32, backbone.image_proj,
                               backbone.text_proj, backbone.word_embeddings)
  head = dict(params["sparse_head"], vocab_bias=params["sparse_head"]["vocab_bias"] - vocab_shift)
  return dict(params, sparse_head=head, tau=np.float32(0.05))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("eval")
  config = tiny_config(tmp, tmp_path_factory)
  backbone = backbones.load_backbone(config.backbone)
  split_dir = eval_lib.find_or_build_cache(config, "test", backbone)
  params = tiny_params(backbone)
  # batch_size 3 does not divide 10 images / 20 captions: the padded last batch is exercised.
  report = eval_lib.evaluate(config, params, split_dir, tmp / "out", backbone=backbone,
                             checkpoint="ckpt/step_7", batch_size=3)
  return dict(config=config, backbone=backbone, split_dir=split_dir, params=params,
              report=report, out=tmp / "out", tmp=tmp)


def _direct(params, cache):
  """e and dense z of every item, one unbatched apply (independent of tail_outputs)."""
  module = tail_outputs.tail_module_for(params)
  out = module.apply({"params": params}, np.asarray(cache["image_pooled"]),
                     np.asarray(cache["text_pooled"]))
  return {k: np.asarray(v) for k, v in out.items()}


def test_report_json_shape_and_metrics_equal_recomputation(setup):
  on_disk = json.loads((setup["out"] / "report.json").read_text())
  for direction in ("t2i", "i2t"):
    assert {"dense", "sparse", "integrated"} <= set(on_disk[direction])
    for kind in ("dense", "sparse", "integrated"):
      assert {"R@1", "R@5", "R@10", "MRR@10"} <= set(on_disk[direction][kind])
  assert set(on_disk["sparsity"]) == {"caption_nnz", "image_nnz", "flops"}

  cache = feature_cache.load_split(setup["split_dir"])
  d = _direct(setup["params"], cache)
  tau = float(d["tau"])
  assert tau == pytest.approx(0.05)
  cos = d["e_t"] @ d["e_i"].T
  dense = cos / tau
  sparse = d["z_t"] @ d["z_i"].T
  # The official eval's integrated score: w1·cos + w2·sparse, no τ (config eval.integrated).
  want = {"dense": dense, "sparse": sparse, "integrated": 0.3 * cos + 0.7 * sparse}
  assert on_disk["integrated_formula"] == "w1·cos + w2·z_t·z_i"
  cap_index = np.asarray(cache["caption_image_index"])
  for kind, scores in want.items():
    m = metrics.retrieval_metrics(scores, cap_index)
    for direction in ("t2i", "i2t"):
      for key, value in m[direction].items():
        assert on_disk[direction][kind][key] == pytest.approx(value, abs=1e-9), (kind, key)
  assert 5 < on_disk["sparsity"]["caption_nnz"] < 500, "the fixture wants genuinely sparse z"
  assert on_disk["sparsity"]["caption_nnz"] == pytest.approx(metrics.mean_nnz(d["z_t"]))
  assert on_disk["sparsity"]["image_nnz"] == pytest.approx(metrics.mean_nnz(d["z_i"]))
  assert on_disk["sparsity"]["flops"] == pytest.approx(metrics.sparse_flops(d["z_t"], d["z_i"]))


def test_validation_metrics_equal_the_eval_report(setup):
  """Validation (train's Evaluator, on the mesh) and the eval binary's report agree on every
  metric they share, under the same names, for the same params and split."""
  params = setup["params"]
  w1, w2 = setup["report"]["w1"], setup["report"]["w2"]
  val = validation.evaluate_split(params, tail_outputs.tail_module_for(params),
                                  setup["split_dir"], w1, w2)
  report = setup["report"]
  for kind in ("dense", "sparse", "integrated"):
    for direction in ("t2i", "i2t"):
      assert val[kind][direction] == pytest.approx(report[direction][kind], abs=1e-6), (
          kind, direction)
  assert val["sparsity"] == pytest.approx(report["sparsity"], rel=1e-9)
  flat = validation.flatten_metrics(val)
  assert flat["sparse/t2i/R@1"] == report["t2i"]["sparse"]["R@1"]
  assert flat["sparsity/caption_nnz"] == pytest.approx(report["sparsity"]["caption_nnz"])
def test_own_caption_terms_in_validation_equal_the_host_restriction(setup):
  """model.own_caption_terms: validation (on the mesh) and apply_tail (eval, on the host)
  restrict the captions alike, and the captions get sparser."""
  params = setup["params"]
  cache = feature_cache.load_split(setup["split_dir"])
  full = tail_outputs.apply_tail(params, cache)
  own = tail_outputs.apply_tail(params, cache, own_caption_terms=True)
  ids = np.asarray(cache[feature_cache.TOKEN_IDS])
  for r in range(own.z_t.shape[0]):
    assert set(own.z_t[r].indices) <= set(ids[r][ids[r] >= 0])
  assert own.z_t.nnz < full.z_t.nnz
  assert (own.z_i != full.z_i).nnz == 0  # images untouched
  val = validation.Evaluator(tail_outputs.tail_module_for(params, own_caption_terms=True),
                             setup["split_dir"])(params)
  assert val["sparsity"]["caption_nnz"] == pytest.approx(metrics.mean_nnz(own.z_t.toarray()))
  s_s = (own.z_t @ own.z_i.T).toarray()
  want = metrics.retrieval_metrics(s_s, np.asarray(cache["caption_image_index"]))
  assert val["sparse"]["t2i"]["R@1"] == pytest.approx(want["t2i"]["R@1"], abs=1e-6)


def test_lexical_section_equals_recomputation(setup):
  from jsds_jax import explain  # pylint: disable=g-import-not-at-top
  from jsds_jax.evaluation import lexical  # pylint: disable=g-import-not-at-top
  cache = feature_cache.load_split(setup["split_dir"])
  d = _direct(setup["params"], cache)
  vocab = explain.vocabulary(setup["backbone"])
  want = lexical.lexical_metrics_of(d["z_t"], d["z_i"], np.asarray(cache["text_token_ids"]),
                                    np.asarray(cache["caption_image_index"]), vocab)
  got = setup["report"]["lexical"]
  for key in ("caption_self_grounding", "image_grounding", "junk_mass", "max_top_term_share",
              "special_or_punct_in_top"):
    assert got[key] == pytest.approx(want[key], abs=1e-6), key
  assert [t for t, _ in got["top_terms"]] == [t for t, _ in want["top_terms"]]
  assert 0.0 < got["junk_mass"] < 1.0
  md = (setup["out"] / "report.md").read_text()
  assert "## Lexical" in md and "Integrated score = w1·cos + w2·z_t·z_i" in md


def test_zero_shot_reference_is_the_backbone_projection(setup):
  cache = feature_cache.load_split(setup["split_dir"])
  bb = setup["backbone"]

  def proj(h, p):
    x = np.asarray(h) @ p["kernel"] + p["bias"]
    return x / np.linalg.norm(x, axis=1, keepdims=True)

  zs = proj(cache["text_pooled"], bb.text_proj) @ proj(cache["image_pooled"], bb.image_proj).T
  m = metrics.retrieval_metrics(zs, np.asarray(cache["caption_image_index"]))
  assert setup["report"]["t2i"]["zero_shot"] == pytest.approx(m["t2i"])
  assert setup["report"]["i2t"]["zero_shot"] == pytest.approx(m["i2t"])
  # A backbone without projections (lit) gets no reference line.
  assert scores_lib.zero_shot_scores({"word_embeddings": np.zeros((3, 2))}, cache) is None


def test_pruning_curve_is_monotone_in_flops(setup):
  curve = setup["report"]["pruning"]
  assert [r["k"] for r in curve] == list(pruning_lib.PRUNE_KS)
  flops = [r["flops"] for r in curve]
  assert all(a <= b + 1e-12 for a, b in zip(flops, flops[1:])), flops
  assert flops[0] < flops[-1]
  for r in curve[:-1]:
    assert r["caption_nnz"] <= r["k"] and r["image_nnz"] <= r["k"]
  full = curve[-1]
  assert full["flops"] == pytest.approx(setup["report"]["sparsity"]["flops"])
  assert full["sparse_R@1"] == pytest.approx(setup["report"]["t2i"]["sparse"]["R@1"])
  assert full["integrated_R@1"] == pytest.approx(setup["report"]["t2i"]["integrated"]["R@1"])


def test_prune_topk_keeps_the_largest_weights():
  import scipy.sparse as sp  # pylint: disable=g-import-not-at-top
  z = sp.csr_matrix(np.array([[0.0, 3.0, 1.0, 2.0, 2.0], [5.0, 0.0, 0.0, 0.0, 0.0]], np.float32))
  pruned = pruning_lib.prune_topk(z, 2).toarray()
  np.testing.assert_array_equal(pruned, [[0, 3, 0, 2, 0], [5, 0, 0, 0, 0]])  # tie: smaller id


def test_sparse_scores_dense_path_equals_sparse_path():
  import scipy.sparse as sp  # pylint: disable=g-import-not-at-top
  few = sp.random(30, 4000, density=0.002, format="csr", random_state=1, dtype=np.float32)
  many = sp.random(20, 4000, density=0.6, format="csr", random_state=2, dtype=np.float32)
  for z_t, z_i in ((few, few[:7]), (many, many[:9])):  # the sparse path, then the dense one
    want = z_t.toarray() @ z_i.toarray().T
    np.testing.assert_allclose(scores_lib.sparse_score_matrix(z_t, z_i, block=8), want,
                               rtol=1e-5, atol=1e-5)


def test_files_are_written_whole(setup):
  out = setup["out"]
  for name in ("report.json", "report.md", "pruning.png", "report.html", "search.json",
               "image_dense.npy", "tail.safetensors"):
    assert (out / name).is_file(), name
  assert (out / "pruning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  md = (out / "report.md").read_text()
  assert "| integrated |" in md and "| all |" in md
  assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
  # The stored tail is the evaluated one.
  back = bundle.load_tail_params(out / "tail.safetensors")
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(setup["params"])):
    assert np.shape(a) == np.shape(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float32))


def test_index_holds_the_image_vectors_and_the_model(setup):
  bb = setup["backbone"]
  index = index_lib.load_index(setup["out"] / "index")
  assert index.model == {"backbone": "tiny", "weights_hash": bb.weights_hash,
                         "vocab_size": bb.vocab_size, "checkpoint": "ckpt/step_7"}
  d = _direct(setup["params"], feature_cache.load_split(setup["split_dir"]))
  np.testing.assert_allclose(index.dequantized().toarray(), d["z_i"], rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="backbone"):
    index_lib.check_model(index, {"backbone": "lit"})


def test_mismatch_errors_name_what_differs(setup):
  cache_meta = feature_cache.load_split(setup["split_dir"])["meta"]
  params = setup["params"]
  with pytest.raises(eval_lib.EvalError, match="backbone is 'lit'"):
    eval_lib.check_compatible(params, cache_meta, {"backbone": "lit"})
  with pytest.raises(eval_lib.EvalError, match="weights_hash"):
    eval_lib.check_compatible(params, cache_meta, {"backbone": "tiny", "weights_hash": "abc"})
  with pytest.raises(eval_lib.EvalError, match="vocabulary size"):
    eval_lib.check_compatible(params, cache_meta, {"vocab_size": 30524})
  with pytest.raises(eval_lib.EvalError, match="vocabulary size"):
    eval_lib.check_compatible(params, cache_meta, vocab_size=30524)
  wide = dict(params, image_tail={"proj": {"kernel": np.zeros((48, 16), np.float32),
                                           "bias": np.zeros(16, np.float32)}})
  with pytest.raises(eval_lib.EvalError, match="image feature dims differ.*48.*32"):
    eval_lib.check_compatible(wide, cache_meta)
  with pytest.raises(eval_lib.EvalError, match="image feature dims"):
    eval_lib.evaluate(setup["config"], wide, setup["split_dir"], setup["tmp"] / "never",
                      backbone=setup["backbone"])
  assert not (setup["tmp"] / "never").exists()


def test_missing_split_and_missing_cache(setup, tmp_path):
  with pytest.raises(eval_lib.EvalError, match="'nope'"):
    eval_lib.find_or_build_cache(setup["config"], "nope", setup["backbone"])
  with pytest.raises(feature_cache.CacheError, match="no finished feature cache"):
    eval_lib.evaluate(setup["config"], setup["params"], tmp_path / "none", tmp_path / "out",
                      backbone=setup["backbone"])


def test_missing_cache_is_encoded_with_the_encode_key(setup, tmp_path, monkeypatch):
  config = tiny_config(tmp_path)  # an empty cache root
  want = encode.cache_dir_for(config, setup["backbone"], "test")
  calls = []

  def fake_encode(config_arg, *, splits=None, progress=True):
    del progress
    calls.append((config_arg, splits))
    return {"test": want}

  # The real encode ran in the shared fixture (its cache root started empty in one of the
  # three files); here only the call matters: this config, this split alone.
  monkeypatch.setattr(encode, "encode", fake_encode)
  assert eval_lib.find_or_build_cache(config, "test", setup["backbone"]) == want
  assert calls == [(config, ["test"])]
  assert setup["split_dir"] == encode.cache_dir_for(setup["config"], setup["backbone"], "test")
  assert feature_cache.is_complete(setup["split_dir"])
  calls.clear()
  assert eval_lib.find_or_build_cache(setup["config"], "test", setup["backbone"]) == (
      setup["split_dir"])
  assert not calls, "a complete cache is not encoded again"


@pytest.fixture(scope="module")
def trained_run(setup, tmp_path_factory):
  """A one-epoch tiny training run on the shared caches: a real checkpoint to evaluate."""
  from jsds_jax import train  # pylint: disable=g-import-not-at-top
  config = tiny_config(None, tmp_path_factory)
  config.train.num_epochs = 1
  workdir = tmp_path_factory.mktemp("run")
  train.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.mark.slow
def test_evaluate_checkpoint_end_to_end(trained_run, tmp_path):
  from jsds_jax import checkpoint  # pylint: disable=g-import-not-at-top
  config, workdir = trained_run
  report = eval_lib.evaluate_checkpoint(config, workdir, tmp_path / "out")
  step_dir = checkpoint.resolve_step_dir(workdir).resolve()
  assert report["checkpoint"] == str(step_dir) and report["mode"] == "jsds"
  params, _ = checkpoint.load_params(workdir)
  cache = feature_cache.load_split(report["split"]["cache"])
  d = _direct(params, cache)
  m = metrics.retrieval_metrics(d["z_t"] @ d["z_i"].T, np.asarray(cache["caption_image_index"]))
  assert report["t2i"]["sparse"] == pytest.approx(m["t2i"])
  index = index_lib.load_index(tmp_path / "out" / "index")
  assert index.model["checkpoint"] == str(step_dir)
  # The same checkpoint against another backbone's weights (tiny seed 1) is refused early.
  other = tiny_config(tmp_path)  # a fresh, empty cache root
  other.backbone.seed = 1
  with pytest.raises(eval_lib.EvalError, match="weights_hash"):
    eval_lib.evaluate_checkpoint(other, workdir, tmp_path / "other")
  assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_eval_and_search_binaries(trained_run, tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  config, workdir = trained_run
  # The run's persistent compilation cache (conftest.py) is in the environment: the search
  # binary reuses the tiny backbone's compiled programs instead of compiling them again.
  env = dict(__import__("os").environ, XLA_FLAGS=testing_utils.xla_flags(1))
  overrides = [f"--config.data.cache_dir={config.data.cache_dir}",
               f"--config.encode.cache_root={config.encode.cache_root}",
               "--config.data.num_images=100"]
  done = subprocess.run(
      [sys.executable, "-m", "jsds_jax.eval", f"--config={_ROOT / 'configs' / 'tiny.py'}",
       f"--checkpoint={workdir}", f"--out={tmp_path / 'out'}", "--split=test", "--nohtml"]
      + overrides, env=env, cwd=_ROOT, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "| sparse |" in done.stdout
  report = json.loads((tmp_path / "out" / "report.json").read_text())
  assert set(report["sparsity"]) == {"caption_nnz", "image_nnz", "flops"}
  assert not (tmp_path / "out" / "report.html").exists()
  done = subprocess.run(
      [sys.executable, "-m", "jsds_jax.search", f"--index={tmp_path / 'out'}", "--k=3",
       "--rerank=dense", "a red circle"], env=env, cwd=_ROOT, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "query: a red circle" in done.stdout and "  1. score" in done.stdout
