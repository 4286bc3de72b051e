"""The last-block modules reproduce each frozen tower's pooled output from its cached
`last_block_input`, with the tower's own params (random tiny towers of every family)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsds_jax import config_base
from jsds_jax import input_pipeline
from jsds_jax import optim
from jsds_jax import train_step
from jsds_jax.models.trunk import bert
from jsds_jax.models.trunk import clip
from jsds_jax.models.trunk import efficientnet_lite
from jsds_jax.models.tail import jsds
from jsds_jax.models.tail import last_block
from jsds_jax.models.trunk import vit

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


# ----------------------------------------------------------------------------------------------
# The train step of the variant: token states streamed in, the blocks trained with the tail.

N_IMG, CAPS, BATCH, P_DIM, V, DW = 8, 2, 4, 8, 64, 8
_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def variant():
  rng = np.random.default_rng(3)
  icfg = vit.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_layers=2, num_heads=2,
                       intermediate_size=32)
  tcfg = bert.BertConfig(vocab_size=V, hidden_size=16, num_layers=2, num_heads=2,
                         intermediate_size=32, max_position_embeddings=16)
  itower, ttower = vit.VisionTransformer(icfg), bert.BertEncoder(tcfg)
  pixels = rng.normal(size=(N_IMG, 16, 16, 3)).astype(np.float32)
  ids = rng.integers(1, V, size=(N_IMG * CAPS, 6)).astype(np.int32)
  mask = (np.arange(6)[None] < rng.integers(2, 7, size=(N_IMG * CAPS, 1))).astype(np.int32)
  ivars = itower.init(jax.random.key(0), pixels)
  tvars = ttower.init(jax.random.key(1), ids, mask)
  iout, tout = itower.apply(ivars, pixels), ttower.apply(tvars, ids, mask)
  iblock, tblock = last_block.block_for(itower), last_block.block_for(ttower)
  module = jsds.JSDSTail(embed_dim=P_DIM, vocab_size=V, word_dim=DW, image_block=iblock,
                         text_block=tblock)
  params = jsds.init_jsds_tail(jax.random.key(2), module, 16, 16,
                               image_block_params=last_block.block_params(iblock, ivars["params"]),
                               text_block_params=last_block.block_params(tblock, tvars["params"]))
  return dict(module=module, params=params, cap_img=np.repeat(np.arange(N_IMG), CAPS),
              image_tokens=np.asarray(iout.last_block_input),
              text_tokens=np.asarray(tout.last_block_input),
              image_pooled=np.asarray(iout.pooled), text_pooled=np.asarray(tout.pooled),
              ids=np.where(mask > 0, ids, -1).astype(np.int32))


def _train_variant(v, n_devices, steps=2):
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:n_devices]), ("data",))
  tc = config_base.base_config().train
  tc.batch_size, tc.warmup_fraction = BATCH, 0.0
  tx = optim.make_optimizer(tc, steps)
  features = input_pipeline.device_features(v["image_pooled"], v["text_pooled"], v["cap_img"],
                                            mesh, text_token_ids=v["ids"])
  order = input_pipeline.epoch_order(0, 0, v["cap_img"], BATCH)
  step = train_step.make_train_step(v["module"], tx, tc, steps, mesh, compiler_options=_FAST)
  state = train_step.create_train_state(jax.tree.map(jnp.copy, v["params"]), tx,
                                        jax.random.key(4), mesh)
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  losses = []
  for k in range(steps):
    caps = order[k]
    streamed = jax.device_put({"image_tokens": v["image_tokens"][v["cap_img"][caps]],
                               "text_tokens": v["text_tokens"][caps]}, batch_sharding)
    state, metrics = step(state, features, input_pipeline.device_order(order, mesh), k, streamed)
    losses.append(float(metrics["loss"]))
  return state, losses


def test_variant_step_trains_the_blocks_and_shards(variant):
  one, losses = _train_variant(variant, 1)
  start = variant["params"]
  for name in ("image_block", "text_block"):
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         one.params[name], start[name])
    assert max(jax.tree.leaves(moved)) > 0, f"{name} was not trained"
  # Before any update the blocks reproduce the towers: the first loss equals the loss of the
  # plain tail (same params, no blocks) on the towers' pooled outputs.
  plain = variant["module"].clone(image_block=None, text_block=None)
  plain_params = {k: w for k, w in start.items() if not k.endswith("_block")}
  order = input_pipeline.epoch_order(0, 0, variant["cap_img"], BATCH)
  caps = order[0]
  img = variant["cap_img"][caps]
  out = plain.apply({"params": plain_params}, variant["image_pooled"][img],
                    variant["text_pooled"][caps])
  settings = train_step.LossSettings.from_config(config_base.base_config().train, 2)
  want, _ = train_step.loss_from_outputs(out, jnp.asarray(img), jnp.int32(0), settings)
  np.testing.assert_allclose(losses[0], float(want), rtol=1e-5)
  four, losses4 = _train_variant(variant, 4)
  np.testing.assert_allclose(losses4, losses, rtol=1e-5)
  flat_one = dict(jax.tree_util.tree_leaves_with_path(one.params))
  for path, a in jax.tree_util.tree_leaves_with_path(four.params):
    name = jax.tree_util.keystr(path)
    # Attention is invariant to the key bias, so its gradient is pure rounding noise, which
    # Adam's normalisation turns into ±lr steps of arbitrary sign: not comparable.
    if "bias" in name and ("'key'" in name or "'qkv'" in name):
      continue
    np.testing.assert_allclose(a, flat_one[path], rtol=1e-5, atol=1e-7, err_msg=name)
