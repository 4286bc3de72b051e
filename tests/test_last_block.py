"""The last-block modules reproduce each frozen tower's pooled output from its cached
`last_block_input`, with the tower's own params (random tiny towers of every family)."""

import jax
import numpy as np
import pytest

from jsds_jax.models import bert
from jsds_jax.models import clip
from jsds_jax.models import efficientnet_lite
from jsds_jax.models import last_block
from jsds_jax.models import vit

B, L = 3, 7


def _ids(rng, vocab, eos=None):
  """(B, L) int32 ids with right padding (mask 0), and the cache's -1-padded form."""
  ids = rng.integers(5, vocab - 1, size=(B, L)).astype(np.int32)
  lengths = np.array([L, 4, 2])
  mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
  if eos is not None:
    ids[np.arange(B), lengths - 1] = eos
  ids = np.where(mask > 0, ids, 0).astype(np.int32)
  return ids, mask, np.where(mask > 0, ids, -1).astype(np.int32)


def _check(tower, variables, out, cached_ids):
  block = last_block.block_for(tower)
  params = last_block.block_params(block, variables["params"])
  got = block.apply({"params": params}, out.last_block_input, cached_ids)
  np.testing.assert_allclose(got, out.pooled, rtol=0, atol=1e-5)
  # A different block input gives a different output: the block really runs.
  moved = block.apply({"params": params}, out.last_block_input * 1.5, cached_ids)
  assert np.abs(np.asarray(moved) - np.asarray(out.pooled)).max() > 1e-3


def test_vit():
  cfg = vit.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2,
                      intermediate_size=64)
  tower = vit.VisionTransformer(cfg)
  pixels = np.random.default_rng(0).normal(size=(B, 32, 32, 3)).astype(np.float32)
  variables = tower.init(jax.random.key(0), pixels)
  _check(tower, variables, tower.apply(variables, pixels), None)


@pytest.mark.parametrize("pooling,used", [("cls", None), ("mean", None), ("cls", 2)])
def test_bert(pooling, used):
  cfg = bert.BertConfig(vocab_size=100, hidden_size=32, num_layers=3, num_heads=2,
                        intermediate_size=64, max_position_embeddings=16)
  tower = bert.BertEncoder(cfg, pooling=pooling, num_layers_used=used)
  ids, mask, cached = _ids(np.random.default_rng(1), 100)
  variables = tower.init(jax.random.key(1), ids, mask)
  _check(tower, variables, tower.apply(variables, ids, mask), cached)


def test_clip_towers():
  rng = np.random.default_rng(2)
  vcfg = clip.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, image_size=32, patch_size=16)
  vtower = clip.CLIPVisionTower(vcfg)
  pixels = rng.normal(size=(B, 32, 32, 3)).astype(np.float32)
  vvars = vtower.init(jax.random.key(2), pixels)
  _check(vtower, vvars, vtower.apply(vvars, pixels), None)

  tcfg = clip.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=2,
                             max_position_embeddings=16, eos_token_id=99)
  ttower = clip.CLIPTextTower(tcfg)
  ids, mask, cached = _ids(rng, 100, eos=99)
  tvars = ttower.init(jax.random.key(3), ids, mask)
  _check(ttower, tvars, ttower.apply(tvars, ids, mask), cached)


def test_a_cnn_tower_has_no_last_block():
  with pytest.raises(ValueError, match="EfficientNetLite tower has no transformer blocks"):
    last_block.block_for(efficientnet_lite.EfficientNetLite())
  block = last_block.block_for(vit.VisionTransformer(vit.ViTConfig(num_layers=2)))
  with pytest.raises(ValueError, match="blocks_1"):
    last_block.block_params(block, {"blocks_0": {}})
