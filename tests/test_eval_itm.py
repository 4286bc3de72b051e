"""`eval` with the cross-encoder stage: the "+itm" lines on the tiny backbone's cache.

The tiny backbone has no ITM head, so a random `BlipItm` whose cross-attention reads its 32-d
image tokens stands in; what is tested is the wiring (cache, lines, report), not BLIP's weights
(tests/test_blip_itm.py checks those against Hugging Face).
"""

import pytest

from jsds_jax import encode
from jsds_jax import eval as eval_lib
from jsds_jax.data import feature_cache
from jsds_jax.evaluation import cross_encoder
from jsds_jax.models.trunk import backbones
from jsds_jax.models.trunk import bert
from jsds_jax.models.trunk import blip_itm
from test_eval import tiny_config  # tests/test_eval.py
from test_eval import tiny_params


def test_eval_adds_itm_lines(tmp_path):
  config = tiny_config(tmp_path)
  config.data.num_images = 60  # a 6-image test split
  config.encode.image_tokens = True
  backbone = backbones.load_backbone(config.backbone)
  split_dir = eval_lib.find_or_build_cache(config, "test", backbone)
  assert split_dir == encode.cache_dir_for(config, backbone, "test")
  cache = feature_cache.load_split(split_dir)
  n_img = cache["meta"]["num_images"]
  cfg = bert.BertConfig(vocab_size=backbone.vocab_size, hidden_size=16, num_layers=1,
                        num_heads=2, intermediate_size=24, max_position_embeddings=16,
                        type_vocab_size=0)
  module = blip_itm.BlipItm(cfg, enc_token_id=1)
  params = blip_itm.random_itm_params(cfg, image_width=32, seed=0)
  tail = tiny_params(backbone)
  # Every candidate in both directions: the first stage drops out.
  settings = cross_encoder.RerankSettings(k=max(n_img, cache["meta"]["num_captions"]))
  report = eval_lib.evaluate(config, tail, split_dir, tmp_path / "out", backbone=backbone,
                             html_report=False, write_index=False,
                             cross_encoder=(module, params, settings))
  for name in ("dense", "sparse", "integrated", "zero_shot"):
    assert f"{name}+itm" in report["t2i"] and f"{name}+itm" in report["i2t"]
  # With k' = all images the ranking is ITM logit + ITC whatever the first stage was.
  assert report["t2i"]["dense+itm"] == report["t2i"]["zero_shot+itm"]
  assert report["i2t"]["sparse+itm"] == report["i2t"]["zero_shot+itm"]
  assert "| zero_shot+itm |" in (tmp_path / "out" / "report.md").read_text()

  # A cache without image tokens is refused with the fix in the message.
  config.encode.image_tokens = False
  plain = eval_lib.find_or_build_cache(config, "test", backbone)
  with pytest.raises(eval_lib.EvalError, match="encode.image_tokens=True"):
    eval_lib.evaluate(config, tail, plain, tmp_path / "out2", backbone=backbone,
                      html_report=False, write_index=False,
                      cross_encoder=(module, params, settings))
