"""CMC candidates and training: mining on hand-made scores, a tiny run on 4 fake devices that is
killed and resumed to the same params, reranking, and the errors a user can cause."""

import jax
import numpy as np
import pytest

from jsds_jax import checkpoint
from jsds_jax import cmc_candidates
from jsds_jax import metric_writer
from jsds_jax import train
from jsds_jax import train_cmc
from jsds_jax import trained_cmc
from jsds_jax.data import feature_cache
from jsds_jax.evaluation import rerank
from jsds_jax.models.tail import jsds
import testing_utils  # tests/testing_utils.py

D_IMG, D_TXT, EMBED, VOCAB, WORD_DIM = 24, 20, 16, 200, 16
_OPTS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# ---------------------------------------------------------------------------------- mining


def test_mining_takes_gold_hard_and_random_candidates():
  rng = np.random.default_rng(0)
  n_img, n_cap = 40, 80
  cap_img = np.repeat(np.arange(n_img), 2)  # two captions per image
  scores = rng.normal(size=(n_cap, n_img)).astype(np.float32)
  view = rerank.direction_view(scores, cap_img, "t2i")
  c = cmc_candidates.mine_direction(view, num_candidates=8, max_rank=20, seed=0)
  assert c.candidates.shape == (n_cap, 8)
  for q in range(n_cap):
    row = c.candidates[q]
    assert len(set(row.tolist())) == 8
    np.testing.assert_array_equal(c.positive[q], row == cap_img[q])
    assert c.positive[q].sum() == 1
    order = np.argsort(-scores[q], kind="stable")
    others = order[order != cap_img[q]]
    # gold, then the 3 best others, then 4 from first-stage ranks [4, 20), golds excluded
    assert row[0] == cap_img[q]
    np.testing.assert_array_equal(row[1:4], others[:3])
    rank_of = np.argsort(order)
    assert all(4 <= rank_of[d] < 20 for d in row[4:])
    np.testing.assert_allclose(c.teacher[q], scores[q, row])
  # i2t: both captions of an image are gold, and neither is taken as a negative
  view = rerank.direction_view(scores, cap_img, "i2t")
  c = cmc_candidates.mine_direction(view, num_candidates=8, max_rank=40, seed=0)
  assert c.candidates.shape == (n_img, 8)
  assert np.all(c.positive.sum(axis=1) == 2)
  np.testing.assert_array_equal(c.positive, cap_img[c.candidates] == np.arange(n_img)[:, None])
  # Fewer documents than C: every document is a candidate.
  small = rerank.direction_view(scores[:10, :5], cap_img[:10], "t2i")
  c = cmc_candidates.mine_direction(small, num_candidates=8)
  assert c.candidates.shape == (10, 5)
  np.testing.assert_array_equal(c.candidates[:, 0], cap_img[:10])
  assert np.all(np.sort(c.candidates, axis=1) == np.arange(5))
  with pytest.raises(rerank.RerankError, match="num_candidates"):
    cmc_candidates.mine_direction(view, num_candidates=1)


def test_mining_restricts_captions_as_the_tail_was_trained(tmp_path):
  """A tail trained with model.own_caption_terms is mined with its captions restricted (as its
  training, eval and search see them): the teacher scores are the restricted sparse scores,
  in another cache folder than the unrestricted mining's; train_cmc reads the field from the
  tail checkpoint's saved config."""
  from jsds_jax import tail_outputs  # pylint: disable=g-import-not-at-top
  from jsds_jax.evaluation import scores as scores_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  n_img = 10
  split = tmp_path / "train"
  testing_utils.write_split(split, rng.normal(size=(n_img, D_IMG)).astype(np.float32),
                            rng.normal(size=(2 * n_img, D_TXT)).astype(np.float32),
                            np.repeat(np.arange(n_img), 2))
  ids = rng.integers(0, VOCAB, (2 * n_img, 5)).astype(np.int32)
  ids[:, 4] = -1  # padding
  feature_cache.atomic_save_npy(split / f"{feature_cache.TOKEN_IDS}.npy", ids)
  meta = feature_cache.load_split(split)["meta"]
  meta["arrays"][feature_cache.TOKEN_IDS] = {"shape": list(ids.shape), "dtype": "int32"}
  feature_cache.atomic_write_json(split / feature_cache.META, meta)
  module = jsds.JSDSTail(embed_dim=EMBED, vocab_size=VOCAB, word_dim=WORD_DIM)
  params = jsds.init_jsds_tail(jax.random.key(0), module, D_IMG, D_TXT)
  params = dict(params, sparse_head=dict(params["sparse_head"],
                                         vocab_bias=params["sparse_head"]["vocab_bias"] + 1.0))
  kw = dict(first_stage="sparse", directions=("t2i",), num_candidates=4, max_rank=8, seed=0,
            w1=0.1, w2=0.1, inputs="dense", root=tmp_path / "cands")
  own = cmc_candidates.mine(params, split, own_caption_terms=True, **kw)
  plain = cmc_candidates.mine(params, split, **kw)
  assert own["dir"] != plain["dir"]
  cache = feature_cache.load_split(split)
  for mined, flag in ((own, True), (plain, False)):
    out = tail_outputs.apply_tail(params, cache, own_caption_terms=flag)
    s = scores_lib.score_matrices(out, 0.1, 0.1)["sparse"]
    c = mined["candidates"]["t2i"]
    np.testing.assert_allclose(c.teacher, np.take_along_axis(s[c.query_ids], c.candidates, 1),
                               rtol=1e-5, atol=1e-6)
  assert not np.allclose(own["candidates"]["t2i"].teacher, plain["candidates"]["t2i"].teacher)
  # Scores handed in (one matrix for several seeds) mine what mine() computes itself.
  s = scores_lib.score_matrices(tail_outputs.apply_tail(params, cache), 0.1, 0.1)["sparse"]
  given = cmc_candidates.mine(params, split, scores=s, **dict(kw, root=tmp_path / "given"))
  for f in ("query_ids", "candidates", "positive", "teacher"):
    np.testing.assert_array_equal(getattr(given["candidates"]["t2i"], f),
                                  getattr(plain["candidates"]["t2i"], f))
  shifted = cmc_candidates.mine(params, split, scores=-s, **dict(kw, root=tmp_path / "neg"))
  assert not np.array_equal(shifted["candidates"]["t2i"].teacher,
                            plain["candidates"]["t2i"].teacher)
  assert checkpoint.own_caption_terms({"config": {"model": {"own_caption_terms": True}}})
  assert not checkpoint.own_caption_terms({"mode": "jsds"})  # written before the field


def test_reranked_ranks_hand_made():
  # 2 captions, 4 images; caption 0's image is 2, caption 1's image is 3.
  scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.9, 0.8, 0.7, 0.6]], np.float32)
  view = rerank.direction_view(scores, np.array([2, 3]), "t2i")
  np.testing.assert_array_equal(rerank.first_stage_ranks(view), [2, 3])
  cands = rerank.top_k(view.scores, 3)
  np.testing.assert_array_equal(cands, [[0, 1, 2], [0, 1, 2]])
  cmc = np.array([[0.0, 0.5, 1.0], [3.0, 2.0, 1.0]], np.float32)
  # caption 0: its image moves to the top; caption 1: its image is not among the 3.
  np.testing.assert_array_equal(rerank.reranked_ranks(view, cands, cmc), [0, 3])
  # a tie with the gold counts against the model
  np.testing.assert_array_equal(
      rerank.reranked_ranks(view, cands, np.array([[1.0, 0.5, 1.0], [0, 0, 0]], np.float32)),
      [1, 3])
  with pytest.raises(rerank.RerankError, match="K = 0"):
    rerank.top_k(view.scores, 0)


# ---------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tail(tmp_path_factory):
  """Fake feature caches and a tail for them: (config, tail workdir)."""
  root = testing_utils.write_fake_features(
      tmp_path_factory.mktemp("features") / "fake-0123" / "fake", {"train": 32, "val": 12},
      d_img=D_IMG, d_txt=D_TXT, embed=EMBED, vocab=VOCAB, word_dim=WORD_DIM)
  config = testing_utils.load_config("tiny")
  config.train.features = str(root)
  # A tail saved directly (no training run: that is test_train.py's business), as a best
  # checkpoint with the metadata fields eval reads.
  module = jsds.JSDSTail(embed_dim=EMBED, vocab_size=VOCAB, word_dim=WORD_DIM)
  tail_init = feature_cache.load_tail_init(root.parent / feature_cache.TAIL_INIT)
  params = jsds.init_jsds_tail(
      jax.random.key(0), module, D_IMG, D_TXT,
      {"kernel": tail_init["image_proj.kernel"], "bias": tail_init["image_proj.bias"]},
      {"kernel": tail_init["text_proj.kernel"], "bias": tail_init["text_proj.bias"]},
      tail_init["word_embeddings"])
  workdir = tmp_path_factory.mktemp("tail")
  meta = {"backbone": "fake", "weights_hash": "f" * 64, "dataset": "fake", "mode": "jsds",
          "image_dim": D_IMG, "text_dim": D_TXT}
  ckpt = checkpoint.Checkpointer(workdir, 0, 1, async_save=False)
  ckpt.save_best(1, params, meta, checkpoint.Progress(), 0.0)
  ckpt.close()
  config.cmc.init_from = str(workdir)
  config.cmc.candidates_root = str(tmp_path_factory.mktemp("cands"))
  config.cmc.mlp_dim = 32
  config.cmc.num_candidates = 8
  config.cmc.batch_size = 8      # 2 per fake device
  config.cmc.num_epochs = 2      # 64 + 32 queries -> 12 steps per epoch
  config.cmc.eval_every_epochs = 2
  config.cmc.checkpoint_every = 6
  config.cmc.patience = 0
  config.cmc.val_k = 8
  config.cmc.gate_init = 0.0     # open gates: the tiny run should visibly move the scores
  return config, workdir


def _flat(params):
  import jax  # pylint: disable=g-import-not-at-top
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(params)}


def test_train_resume_and_rerank(tail, tmp_path, monkeypatch):
  config, tail_dir = tail
  full = train_cmc.train_and_evaluate(config, tmp_path / "full", compiler_options=_OPTS)
  assert full["status"] == "completed" and full["step"] == 24
  assert full["num_queries"] == 64 + 32  # t2i captions + i2t images
  assert {"t2i/cmc_R@1", "i2t/cmc_R@1", "t2i/first_R@1"} <= set(full["final_val"])
  rows = metric_writer.read_jsonl(tmp_path / "full" / train_cmc.METRICS_FILE)
  losses = [r["loss"] for r in rows if r["kind"] == "train"]
  assert len(losses) == 2 and losses[-1] < losses[0]

  # A run that dies after step 7 (checkpoint at 6) resumes to the very same params.
  real = train_cmc.make_train_step

  def dying(*a, **kw):
    step = real(*a, **kw)
    count = {"n": 0}

    def wrapped(*args):
      count["n"] += 1
      if count["n"] > 7:
        raise KeyboardInterrupt("killed")
      return step(*args)
    return wrapped

  monkeypatch.setattr(train_cmc, "make_train_step", dying)
  with pytest.raises(KeyboardInterrupt):
    train_cmc.train_and_evaluate(config, tmp_path / "resumed", compiler_options=_OPTS)
  monkeypatch.setattr(train_cmc, "make_train_step", real)
  assert checkpoint.resolve_step_dir(tmp_path / "resumed" / "checkpoints").name == "6"
  again = train_cmc.train_and_evaluate(config, tmp_path / "resumed", compiler_options=_OPTS)
  assert again["step"] == 24
  a = _flat(checkpoint.load_params(tmp_path / "full" / "checkpoints")[0])
  b = _flat(checkpoint.load_params(tmp_path / "resumed" / "checkpoints")[0])
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)

  # The trained CMC reranks the tail it was trained on ...
  tail_params = checkpoint.load_params(tail_dir)[0]
  module, params, meta = trained_cmc.load_cmc(str(tmp_path / "full"), tail_params)
  assert meta["mode"] == "cmc" and module.mlp_dim == 32
  # ... and refuses anything else, naming it.
  other = dict(tail_params, tau=np.asarray(0.5, np.float32))
  with pytest.raises(rerank.RerankError, match="trained on the tail"):
    trained_cmc.load_cmc(str(tmp_path / "full"), other)
  with pytest.raises(rerank.RerankError, match="not a CMC checkpoint"):
    trained_cmc.load_cmc(str(tail_dir), tail_params)
  with pytest.raises(rerank.RerankError, match="same width|takes"):
    rerank.cmc_scores(module, params, np.zeros((2, 8), np.float32),
                      np.zeros((3, 8), np.float32), np.zeros((2, 2), np.int64))
  with pytest.raises(rerank.RerankError, match="caption embeddings"):
    rerank.embeddings_for("t2i", np.zeros((2, 16)), None)


def test_bad_settings_are_named(tail, tmp_path):
  config, _ = tail
  bad = config.copy_and_resolve_references()
  bad.cmc.init_from = ""
  with pytest.raises(checkpoint.CheckpointError, match="cmc.init_from"):
    train_cmc.train_and_evaluate(bad, tmp_path / "a")
  bad.cmc.init_from = config.cmc.init_from
  bad.cmc.inputs = "pre_projection"  # 24-d images, 20-d captions
  with pytest.raises(rerank.RerankError, match="one width"):
    train_cmc.train_and_evaluate(bad, tmp_path / "b")
  bad.cmc.inputs = "dense"
  bad.cmc.input_scale = "sqrt"
  with pytest.raises(rerank.RerankError, match="cmc.input_scale='sqrt'"):
    train_cmc.train_and_evaluate(bad, tmp_path / "c")
  bad.cmc.input_scale = "tau"
  bad.cmc.teacher = "bert"
  with pytest.raises(rerank.RerankError, match="cmc.teacher='bert'"):
    train_cmc.train_and_evaluate(bad, tmp_path / "d")


def test_gate_lr_moves_the_gates_at_their_own_rate():
  """`cmc.gate_lr`: Adam's first step moves each parameter by about its group's lr, so the
  gate logits move by gate_lr and every other weight by lr."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  cc = ml_collections.ConfigDict(dict(lr=1e-4, gate_lr=0.05, warmup_fraction=0.0,
                                      weight_decay=0.0, clip_norm=1e9))
  params = {"layers_0": {"gate": np.float32(-5.0),
                         "encoder_layer": {"w": np.ones((3,), np.float32)}}}
  grads = jax.tree_util.tree_map(lambda x: np.ones_like(x) * 0.3, params)
  tx = train_cmc.make_optimizer(cc, total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  moved = optax.apply_updates(params, updates)
  assert float(params["layers_0"]["gate"] - moved["layers_0"]["gate"]) == pytest.approx(
      0.05, rel=1e-3)
  np.testing.assert_allclose(params["layers_0"]["encoder_layer"]["w"]
                             - moved["layers_0"]["encoder_layer"]["w"], 1e-4, rtol=1e-3)
  cc.gate_lr = 0.0  # one lr for all
  one = train_cmc.make_optimizer(cc, 10)
  updates, _ = one.update(grads, one.init(params), params)
  assert float(-updates["layers_0"]["gate"]) == pytest.approx(1e-4, rel=1e-3)


def test_eval_rerank_cmc(tail, tmp_path):
  """`eval --rerank cmc`: the table has every first stage, direction and capped K; the first
  stage's own line agrees with eval's retrieval metrics; bad K and a missing CMC are named."""
  from jsds_jax import eval as eval_lib  # pylint: disable=g-import-not-at-top
  config, tail_dir = tail
  cmc_dir = tmp_path / "cmc"
  small = config.copy_and_resolve_references()
  small.cmc.num_epochs = 1
  small.cmc.eval_every_epochs = 1
  train_cmc.train_and_evaluate(small, cmc_dir, compiler_options=_OPTS)
  tail_params, tail_meta = checkpoint.load_params(tail_dir)
  split_dir = config.train.features + "/val"
  run = config.copy_and_resolve_references()
  run.cmc.checkpoint = str(cmc_dir)
  run.cmc.rerank_ks = (4, 16, 64)
  report = eval_lib.evaluate(run, tail_params, split_dir, tmp_path / "eval", tail_meta,
                             html_report=False, write_index=False, rerank_with="cmc")
  table = report["rerank"]["table"]
  assert set(table) == {"sparse", "dense", "integrated"}
  for kind in table:
    for d in ("t2i", "i2t"):
      res = table[kind][d]
      # 12 images: 16 and 64 collapse to 12 for t2i; 24 captions cap 64 at 24 for i2t.
      assert list(res["cmc"]) == ([4, 12] if d == "t2i" else [4, 16, 24])
      for r in (1, 5, 10):
        assert res["first_stage"][f"R@{r}"] == pytest.approx(report[d][kind][f"R@{r}"])
      # Reranking the top K never moves a gold across the K boundary: R@r for r >= K is the
      # first stage's.
      for k, m in res["cmc"].items():
        for r in rerank.RECALL_KS:
          if r >= k:
            assert m[f"R@{r}"] == pytest.approx(res["first_stage"][f"R@{r}"]), (kind, d, k, r)
  md = (tmp_path / "eval" / "report.md").read_text()
  assert "First stage alone vs + CMC" in md and "| integrated + CMC | t2i | 4 |" in md
  assert (tmp_path / "eval" / "rerank.html").exists()
  bad = run.copy_and_resolve_references()
  bad.cmc.rerank_ks = (0, 16)
  with pytest.raises(rerank.RerankError, match="K = 0"):
    eval_lib.evaluate(bad, tail_params, split_dir, tmp_path / "e2", tail_meta,
                      html_report=False, write_index=False, rerank_with="cmc")
  bad.cmc.rerank_ks = (16,)
  bad.cmc.checkpoint = ""
  with pytest.raises(rerank.RerankError, match="cmc.checkpoint"):
    eval_lib.evaluate(bad, tail_params, split_dir, tmp_path / "e3", tail_meta,
                      html_report=False, write_index=False, rerank_with="cmc")
