"""`eval --rerank cmc,itm`: first stage -> CMC over its top K -> ITM over CMC's top k'.

The tiny backbone has no ITM head and no trained CMC: a random `BlipItm` over its 32-d image
tokens and a random CMC with open gates (so it really reorders) stand in. What is tested is the
chain's wiring: each of the four lines agrees with the stage run on its own, and the order of
the stages matters where it must.
"""

import pytest

from jsds_jax import eval as eval_lib
from jsds_jax.evaluation import cross_encoder
from jsds_jax.evaluation import pipeline
from jsds_jax.models.trunk import backbones
from jsds_jax.models.trunk import bert
from jsds_jax.models.trunk import blip_itm
from test_eval import tiny_config  # tests/test_eval.py
from test_eval import tiny_params
import testing_utils  # tests/testing_utils.py


def test_parse_rerank():
  assert eval_lib.parse_rerank("") == ()
  assert eval_lib.parse_rerank("cmc, itm") == ("cmc", "itm")
  for bad in ("itm,cmc", "cmc,cmc", "cmc,ce"):
    with pytest.raises(eval_lib.EvalError, match="rerank"):
      eval_lib.parse_rerank(bad)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("pipeline")
  config = tiny_config(tmp, tmp_path_factory)  # the eval tests' data folder, shared
  config.data.num_images = 60  # a 6-image, 30-caption test split
  config.encode.image_tokens = True
  backbone = backbones.load_backbone(config.backbone)
  split_dir = eval_lib.find_or_build_cache(config, "test", backbone)
  tail = tiny_params(backbone)
  testing_utils.save_random_cmc(tmp / "cmc", tail, 16)
  config.cmc.checkpoint = str(tmp / "cmc")
  cfg = bert.BertConfig(vocab_size=backbone.vocab_size, hidden_size=16, num_layers=1,
                        num_heads=2, intermediate_size=24, max_position_embeddings=16,
                        type_vocab_size=0)
  itm = (blip_itm.BlipItm(cfg, enc_token_id=1), blip_itm.random_itm_params(cfg, 32, seed=0))
  return config, backbone, split_dir, tail, itm, tmp


def _eval(setup, name, k_prime, rerank_with="cmc", itm=True):
  config, backbone, split_dir, tail, (module, params), tmp = setup
  ce = (module, params, cross_encoder.RerankSettings(k=k_prime)) if itm else None
  return eval_lib.evaluate(config, tail, split_dir, tmp / name, backbone=backbone,
                           html_report=False, write_index=False, rerank_with=rerank_with,
                           cross_encoder=ce)


def test_four_lines_agree_with_each_stage_alone(setup):
  config = setup[0]
  config.cmc.pipeline_k = 4
  config.cmc.rerank_ks = (4,)
  report = _eval(setup, "chain", k_prime=3)
  itm_only = _eval(setup, "itm", k_prime=3, rerank_with="")
  pipe = report["pipeline"]
  assert (pipe["k"], pipe["k_prime"]) == (4, 3)
  assert set(pipe["table"]) == {"sparse", "dense", "integrated"}
  moved = False
  for kind, lines in pipe["table"].items():
    assert tuple(lines) == pipeline.LINES
    for d in ("t2i", "i2t"):
      for r in (1, 5, 10):
        key = f"R@{r}"
        assert lines["alone"][d][key] == pytest.approx(report[d][kind][key])
        # The chain's +ITM is ITM on the first stage's top k', as `--rerank itm` computes it.
        assert lines["+ITM"][d][key] == pytest.approx(itm_only[d][f"{kind}+itm"][key])
        # +CMC is the rerank table's CMC at K.
        k = min(4, 6 if d == "t2i" else 30)
        assert lines["+CMC"][d][key] == pytest.approx(
            report["rerank"]["table"][kind][d]["cmc"][k][key])
      moved |= lines["+CMC+ITM"][d] != lines["+ITM"][d]
  # ITM over CMC's top 3 of 4 is not ITM over the first stage's top 3 everywhere.
  assert moved
  md = (setup[5] / "chain" / "report.md").read_text()
  assert "→ CMC (top K = 4) → ITM (top k′ = 3)" in md and "| integrated | +CMC+ITM |" in md
  # zero_shot+itm (BLIP's recipe) is still reported beside the chain.
  assert "zero_shot+itm" in report["t2i"]


def test_chain_order_edges(setup):
  """k' = 1: ITM rescoring one candidate changes nothing, so +CMC+ITM is +CMC; k' = every
  document: ITM ranks everything whatever came before, so +CMC+ITM is +ITM."""
  config = setup[0]
  config.cmc.pipeline_k = 30
  config.cmc.rerank_ks = (30,)
  one = _eval(setup, "one", k_prime=1)["pipeline"]["table"]
  every = _eval(setup, "every", k_prime=30)["pipeline"]["table"]
  for kind in one:
    assert one[kind]["+CMC+ITM"] == one[kind]["+CMC"]
    assert every[kind]["+CMC+ITM"] == every[kind]["+ITM"]


def test_chain_needs_a_cmc_and_image_tokens(setup):
  from jsds_jax.evaluation import rerank  # pylint: disable=g-import-not-at-top
  config = setup[0]
  saved = config.cmc.checkpoint
  config.cmc.checkpoint = ""
  try:
    with pytest.raises(rerank.RerankError, match="cmc.checkpoint"):
      _eval(setup, "nockpt", k_prime=3)
  finally:
    config.cmc.checkpoint = saved
  # A cache without image tokens is refused with the fix in the message.
  config.encode.image_tokens = False
  plain = eval_lib.find_or_build_cache(config, "test", setup[1])
  with pytest.raises(eval_lib.EvalError, match="encode.image_tokens=True"):
    eval_lib.evaluate(config, setup[3], plain, setup[5] / "noimg", backbone=setup[1],
                      html_report=False, write_index=False, rerank_with="cmc",
                      cross_encoder=(*setup[4], cross_encoder.RerankSettings(k=3)))
  config.encode.image_tokens = True


@pytest.mark.slow
def test_tiny_end_to_end_itm_teacher_then_chain(setup, tmp_path):
  """encode -> train the tail -> train CMC with ITM's logits as its teacher -> eval with the
  chain: the teacher CMC learned from is ITM's logit of each mined pair, and the report has the
  four lines."""
  import glob  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jsds_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from jsds_jax import train  # pylint: disable=g-import-not-at-top
  from jsds_jax import train_cmc  # pylint: disable=g-import-not-at-top
  from jsds_jax.data import feature_cache  # pylint: disable=g-import-not-at-top
  config, backbone, split_dir, _, (module, params), _ = setup
  cfg = config.copy_and_resolve_references()
  cfg.train.num_epochs = 1
  tail_dir = tmp_path / "tail"
  train.train_and_evaluate(cfg, tail_dir, backbone=backbone)
  cfg.cmc.init_from = str(tail_dir)
  cfg.cmc.candidates_root = str(tmp_path / "cands")
  cfg.cmc.teacher = "itm"
  cfg.cmc.mlp_dim = 32
  cfg.cmc.num_candidates = 8
  cfg.cmc.batch_size = 8
  cfg.cmc.num_epochs = 1
  cfg.cmc.val_k = 8
  cfg.cmc.patience = 0
  res = train_cmc.train_and_evaluate(cfg, tmp_path / "cmc", cross_encoder=(module, params))
  assert res["status"] == "completed"
  cands_dir = pathlib.Path(res["candidates_dir"])
  train_cache = feature_cache.load_split(train.feature_dirs(cfg, ["train"])["train"])
  for d in ("t2i", "i2t"):
    with np.load(cands_dir / f"{d}.npz") as z:
      q, c = z["query_ids"][:3], z["candidates"][:3]
    (path,) = glob.glob(str(cands_dir / f"{d}.itm-*.npy"))
    direct = cross_encoder.blip_logit_fn(module, params, train_cache["text_token_ids"],
                                         train_cache["image_tokens"], d)(q, c)
    np.testing.assert_allclose(np.load(path)[:3], direct, rtol=1e-4, atol=1e-5)
  assert checkpoint.load_params(tmp_path / "cmc")[1]["teacher"].startswith("itm-")
  cfg.cmc.checkpoint = str(tmp_path / "cmc")
  cfg.cmc.pipeline_k = 4
  cfg.cmc.rerank_ks = (4,)
  tail_params, tail_meta = checkpoint.load_params(tail_dir)
  report = eval_lib.evaluate(cfg, tail_params, split_dir, tmp_path / "eval", tail_meta,
                             backbone=backbone, html_report=False, write_index=False,
                             rerank_with="cmc",
                             cross_encoder=(module, params, cross_encoder.RerankSettings(k=3)))
  assert list(report["pipeline"]["table"]["integrated"]) == list(pipeline.LINES)
  assert "| integrated | +CMC+ITM |" in (tmp_path / "eval" / "report.md").read_text()
  # A training cache without image tokens is refused, naming the fix.
  from jsds_jax import cmc_candidates  # pylint: disable=g-import-not-at-top
  from jsds_jax.evaluation import rerank  # pylint: disable=g-import-not-at-top
  cfg.encode.image_tokens = False
  plain = eval_lib.find_or_build_cache(cfg, "test", backbone)
  with pytest.raises(rerank.RerankError, match="image_tokens=True"):
    cmc_candidates.cross_encoder_teacher({"candidates": {}, "dir": tmp_path}, plain, module,
                                         params)
