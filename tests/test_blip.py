"""Parity of our BLIP towers with Hugging Face `BlipForImageTextRetrieval`'s unimodal path."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import testing_utils  # tests/testing_utils.py

from jsds_jax.models.trunk import blip
from jsds_jax.models.trunk import convert
from jsds_jax.models.trunk import vit

TOL = 1e-4


@pytest.fixture(name="tiny")
def _tiny(tiny_hf_blip):
  """The shared tiny BLIP (tests/conftest.py; HF's near-0 vision class/position embeddings
  redrawn so they matter)."""
  return tiny_hf_blip


def test_crossattention_is_in_the_checkpoint_and_skipped(tiny):
  """The converter must skip fusion weights on purpose, not by missing them."""
  model, path = tiny
  names = model.state_dict().keys()
  assert any(".crossattention." in k for k in names) and "itm_head.weight" in names
  loaded = blip.load_blip(path)
  assert loaded.config.text.type_vocab_size == 0
  # save_pretrained leaves defaults out of config.json; the dict path must fill them back in.
  assert blip.BlipConfig.from_hf(json.loads((path / "config.json").read_text())) == loaded.config
  assert loaded.config.vision == vit.ViTConfig(image_size=32, patch_size=8, hidden_size=24,
                                               num_layers=2, num_heads=4, intermediate_size=37,
                                               layer_norm_eps=1e-5)
  assert loaded.word_embeddings.shape == (100, 32)
  assert loaded.tokenizer is None  # save_pretrained of the model alone writes no tokenizer.
  assert loaded.image_mean == blip.BLIP_IMAGE_MEAN and loaded.image_std == blip.BLIP_IMAGE_STD
  np.testing.assert_array_equal(loaded.text_proj["kernel"],
                                model.text_proj.weight.detach().numpy().T)


def test_unimodal_parity(tiny):
  model, path = tiny
  loaded = blip.load_blip(path)
  pixels, ids, mask = testing_utils.blip_batch(np.random.default_rng(0), lengths=(7, 4, 2))

  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(),
                pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                attention_mask=torch.from_numpy(mask).long(), use_itm_head=False)
    ref_image_cls = out.last_hidden_state[:, 0]
    ref_text_cls = out.question_embeds[:, 0]
    ref_image_proj = model.vision_proj(ref_image_cls).numpy()
    ref_text_proj = model.text_proj(ref_text_cls).numpy()
    ref_scores = out.itm_score.numpy()

  image = jax.jit(loaded.vision_tower.apply)({"params": loaded.vision_params}, pixels)
  text = jax.jit(loaded.text_tower.apply)({"params": loaded.text_params}, ids, mask)
  np.testing.assert_allclose(image.pooled, ref_image_cls.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(image.tokens, out.last_hidden_state.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(text.pooled, ref_text_cls.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(text.tokens, out.question_embeds.numpy(), atol=TOL, rtol=0)

  proj = lambda p, x: np.asarray(x) @ p["kernel"] + p["bias"]
  image_proj = proj(loaded.vision_proj, image.pooled)
  text_proj = proj(loaded.text_proj, text.pooled)
  np.testing.assert_allclose(image_proj, ref_image_proj, atol=TOL, rtol=0)
  np.testing.assert_allclose(text_proj, ref_text_proj, atol=TOL, rtol=0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  np.testing.assert_allclose(unit(image_proj) @ unit(text_proj).T, ref_scores, atol=TOL, rtol=0)


def test_preprocessor_config_and_wrong_image_size(tiny, tmp_path):
  model, _ = tiny
  model.save_pretrained(tmp_path)
  (tmp_path / "preprocessor_config.json").write_text(
      json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
  loaded = blip.load_blip(tmp_path)
  assert loaded.image_mean == (0.5, 0.5, 0.5) and loaded.image_std == (0.25, 0.25, 0.25)
  assert loaded.image_size == 32
  with pytest.raises(ValueError, match="not interpolated"):
    jax.eval_shape(loaded.vision_tower.apply, {"params": loaded.vision_params},
                   jnp.zeros((1, 48, 48, 3)))


def test_checkpoint_for_another_resolution_is_refused(tiny):
  model, _ = tiny
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  config = blip.BlipConfig.from_hf(model.config)
  bigger = vit.ViTConfig(**{**config.vision.__dict__, "image_size": 48})
  with pytest.raises(convert.ConversionError, match="interpolat"):
    vit.convert_vit(sd, bigger, layout="hf_blip", prefix="vision_model.")


def test_vit_large_builds():
  """ViT-L/16 at 384 px: the parameter count follows from the shapes, no weights needed."""
  cfg = vit.ViTConfig(image_size=384, patch_size=16, hidden_size=1024, num_layers=24,
                      num_heads=16, intermediate_size=4096)
  shapes = jax.eval_shape(vit.VisionTransformer(cfg).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((2, 384, 384, 3), jnp.float32))
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
  d, f, tokens = 1024, 4096, 577
  block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
  assert n == (16 * 16 * 3 * d + d) + d + tokens * d + 24 * block + 2 * d
  assert 3.0e8 < n < 3.1e8
  out = jax.eval_shape(vit.VisionTransformer(cfg).apply, shapes,
                       jax.ShapeDtypeStruct((2, 384, 384, 3), jnp.float32))
  assert out.pooled.shape == (2, 1024) and out.tokens.shape == (2, 577, 1024)
  assert out.last_block_input.shape == (2, 577, 1024)


def test_bf16_compute_keeps_float32_params(tiny):
  """One switch for accelerators: bf16 activations, the same float32 params."""
  model, path = tiny
  loaded = blip.load_blip(path, dtype=jnp.bfloat16)
  assert loaded.vision_tower.dtype == loaded.text_tower.dtype == jnp.bfloat16
  for params in (loaded.vision_params, loaded.text_params):
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(params))
  pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  out = jax.jit(loaded.vision_tower.apply)({"params": loaded.vision_params}, pixels)
  with torch.no_grad():
    ref = model.vision_model(torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
  assert out.pooled.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out.pooled, np.float32),
                             ref.last_hidden_state[:, 0].numpy(), atol=0.1, rtol=0.05)
