"""CLIP towers against `transformers.CLIPModel`: tiny random model, saved and reloaded."""

import dataclasses
import json
import string

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsds_jax.models.trunk import clip
from jsds_jax.models.trunk import convert
from jsds_jax.models.trunk import weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB = 100
BOS, EOS = 98, 99  # the tokenizer below pads with EOS, like CLIP's own


def _tiny_tokenizer():
  letters = string.ascii_lowercase
  vocab = {c: i for i, c in enumerate(letters)}
  vocab.update({c + "</w>": 26 + i for i, c in enumerate(letters)})
  vocab.update({"th": 52, "the</w>": 53, "<|startoftext|>": BOS, "<|endoftext|>": EOS})
  return transformers.CLIPTokenizer(vocab=vocab, merges=[("t", "h"), ("th", "e</w>")])


def _hf_config(eos_token_id=EOS):
  text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=16, bos_token_id=BOS,
              eos_token_id=eos_token_id, pad_token_id=EOS)
  vision = dict(image_size=32, patch_size=8, hidden_size=24, intermediate_size=40,
                num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu")
  return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """(directory, HF model) of a tiny random CLIPModel saved with its tokenizer and processor."""
  torch.manual_seed(0)
  model = transformers.CLIPModel(_hf_config()).eval()
  # Random, not the init's ones/zeros, so a LayerNorm loaded into the wrong slot shows.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name or "layrnorm" in name:
        p.add_(0.1 * torch.randn_like(p))
  directory = tmp_path_factory.mktemp("tiny_clip")
  model.save_pretrained(directory)
  _tiny_tokenizer().save_pretrained(directory)
  (directory / "preprocessor_config.json").write_text(json.dumps(
      {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "crop_size": 32}))
  return directory, model


@pytest.fixture(scope="module")
def loaded(checkpoint):
  return clip.load_clip(checkpoint[0])


def _pixels(n=3, size=32):
  return np.random.default_rng(0).normal(size=(n, size, size, 3)).astype(np.float32)


def _max_diff(ours, theirs):
  return float(np.max(np.abs(np.asarray(ours, np.float32) - theirs.detach().numpy())))


def test_config_from_hf(checkpoint, loaded):
  cfg = loaded.config
  assert cfg == clip.CLIPConfig.from_hf(checkpoint[0] / "config.json")
  assert (cfg.vision.hidden_size, cfg.vision.patch_size, cfg.vision.hidden_act) == (24, 8, "gelu")
  assert (cfg.text.vocab_size, cfg.text.eos_token_id, cfg.text.hidden_act) == (
      VOCAB, EOS, "quick_gelu")
  assert cfg.projection_dim == 16
  assert cfg.vision.num_positions == 17
  assert loaded.image_size == 32


def test_image_parity(checkpoint, loaded):
  _, model = checkpoint
  pixels = _pixels()
  out = jax.jit(loaded.vision_tower.apply)({"params": loaded.vision_params}, pixels)
  with torch.no_grad():
    nchw = torch.from_numpy(pixels.transpose(0, 3, 1, 2))
    hf = model.vision_model(pixel_values=nchw, output_hidden_states=True)
    hf_features = model.get_image_features(pixel_values=nchw)
  hf_features = getattr(hf_features, "pooler_output", hf_features)
  ours_features = out.pooled @ loaded.projections["image"]["kernel"] + (
      loaded.projections["image"]["bias"])
  assert out.pooled.shape == (3, 24) and out.tokens.shape == (3, 17, 24)
  assert _max_diff(out.pooled, hf.pooler_output) <= TOL
  assert _max_diff(out.tokens, hf.last_hidden_state) <= TOL
  assert _max_diff(out.last_block_input, hf.hidden_states[-2]) <= TOL
  assert _max_diff(ours_features, hf_features) <= TOL


def _padded_batch():
  """Right-padded ids of lengths 16, 9, 3, EOS-padded, with attention masks (B, 16)."""
  rng = np.random.default_rng(1)
  lengths = (16, 9, 3)
  ids = np.full((len(lengths), 16), EOS, np.int32)
  mask = np.zeros_like(ids)
  for row, n in enumerate(lengths):
    ids[row, :n - 1] = rng.integers(0, 60, n - 1)
    ids[row, 0] = BOS
    mask[row, :n] = 1
  return ids, mask


def _check_text(tower, params, projection, model, ids, mask):
  out = jax.jit(tower.apply)({"params": params}, ids, mask)
  with torch.no_grad():
    t_ids, t_mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    hf = model.text_model(input_ids=t_ids, attention_mask=t_mask, output_hidden_states=True)
    hf_features = model.get_text_features(input_ids=t_ids, attention_mask=t_mask)
  hf_features = getattr(hf_features, "pooler_output", hf_features)
  assert _max_diff(out.pooled, hf.pooler_output) <= TOL
  assert _max_diff(out.tokens, hf.last_hidden_state) <= TOL
  assert _max_diff(out.last_block_input, hf.hidden_states[-2]) <= TOL
  ours_features = out.pooled @ projection["kernel"] + projection["bias"]
  assert _max_diff(ours_features, hf_features) <= TOL
  return out


def test_text_parity_padded_batch(checkpoint, loaded):
  ids, mask = _padded_batch()
  out = _check_text(loaded.text_tower, loaded.text_params, loaded.projections["text"],
                    checkpoint[1], ids, mask)
  # Pooling at the first EOS, not at a pad (pads equal EOS here) nor at the last position.
  np.testing.assert_array_equal(clip.eos_positions(ids, EOS), [15, 8, 2])
  np.testing.assert_allclose(out.pooled[2], out.tokens[2, 2], atol=0)
  # The "last_block" recipe: the last block alone on the cached states, then final LN.
  config, params = loaded.config.text, loaded.text_params

  @jax.jit
  def last_block(x):
    x = clip.encoder_layer(config).apply({"params": params["layers_1"]}, x,
                                         clip.key_padding_mask(mask), True)
    return flax.linen.LayerNorm(epsilon=config.layer_norm_eps).apply(
        {"params": params["final_layer_norm"]}, x)

  np.testing.assert_allclose(last_block(out.last_block_input), out.tokens, atol=TOL)


def test_text_parity_legacy_eos_id(checkpoint):
  """eos_token_id == 2 (pre-2023 HF configs): HF pools at argmax(input_ids)."""
  hf_config = _hf_config(eos_token_id=2)
  model = transformers.CLIPModel(hf_config).eval()
  model.load_state_dict(checkpoint[1].state_dict())
  config = clip.CLIPConfig.from_hf(hf_config.to_dict())
  assert config.text.eos_token_id == 2
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  converted = clip.convert_clip(state, config)
  ids, mask = _padded_batch()
  # Row 1 without BOS and EOS, its largest id in the middle: HF pools there, not at the end.
  ids[1, 0], ids[1, 4], ids[1, 8:] = 5, 97, 0
  np.testing.assert_array_equal(clip.eos_positions(ids, 2), [15, 4, 2])
  _check_text(clip.CLIPTextTower(config.text), converted.text, converted.projections["text"],
              model, ids, mask)


def test_loader_extras(checkpoint, loaded):
  directory, model = checkpoint
  assert loaded.mean == (0.5, 0.4, 0.3) and loaded.std == (0.2, 0.25, 0.3)
  np.testing.assert_array_equal(
      loaded.word_embeddings, model.text_model.embeddings.token_embedding.weight.detach().numpy())
  assert loaded.word_embeddings.shape == (VOCAB, 32)
  assert loaded.projections["text"]["bias"].shape == (16,)
  assert not np.any(loaded.projections["text"]["bias"])
  np.testing.assert_allclose(loaded.logit_scale, model.logit_scale.item(), rtol=1e-6)
  enc = loaded.tokenizer(["the cat", "a dog sat"], padding="max_length", max_length=16)
  assert enc["input_ids"][0][:3] == [BOS, 53, 2] and enc["input_ids"][0][-1] == EOS
  # Without processor and tokenizer files: CLIP's defaults and no tokenizer.
  assert clip.read_normalization(directory / "nowhere") == (clip.OPENAI_CLIP_MEAN,
                                                            clip.OPENAI_CLIP_STD)
  assert clip.load_tokenizer(directory / "nowhere") is None


def _state_dict(directory):
  return weights.load_state_dict(weights.find_weight_file(directory))


def test_conversion_rejects_missing_and_extra_tensors(checkpoint, loaded):
  directory, _ = checkpoint
  config = loaded.config
  state = _state_dict(directory)
  clip.convert_clip({**state, "text_model.embeddings.position_ids": np.arange(16)[None]}, config)
  missing = dict(state)
  del missing["vision_model.encoder.layers.1.mlp.fc2.bias"]
  with pytest.raises(convert.ConversionError, match="fc2.bias"):
    clip.convert_clip(missing, config)
  with pytest.raises(convert.ConversionError, match="not used"):
    clip.convert_clip({**state, "vision_model.encoder.layers.2.mlp.fc1.bias": np.zeros(40)},
                      config)
  # A config that disagrees with the weights (wrong projection width) fails too.
  with pytest.raises(convert.ConversionError, match="projection"):
    clip.convert_clip(state, dataclasses.replace(config, projection_dim=8))


def test_bf16_compute_keeps_float32_params(loaded):
  pixels = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  for tower, inputs in ((clip.CLIPVisionTower(loaded.config.vision, dtype=jnp.bfloat16),
                         (pixels,)),
                        (clip.CLIPTextTower(loaded.config.text, dtype=jnp.bfloat16),
                         (ids, ids))):
    variables = jax.eval_shape(tower.init, jax.random.key(0), *inputs)
    assert {x.dtype for x in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    out = jax.eval_shape(tower.apply, variables, *inputs)
    assert {x.dtype for x in jax.tree_util.tree_leaves(out)} == {jnp.dtype(jnp.bfloat16)}


# Vision tower, text tower, visual_projection, text_projection parameter counts of HF's
# CLIPModel for these sizes (counted once with transformers; they match OpenAI's models).
PRESET_COUNTS = {
    "ViT-B/32": (87_456_000, 63_165_952, 393_216, 262_144),
    "ViT-B/16": (85_799_424, 63_165_952, 393_216, 262_144),
    "ViT-L/14": (303_179_776, 123_060_480, 786_432, 589_824),
}


def test_preset_sizes():
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
  text_counts = {}  # B/32 and B/16 share their text tower
  for name, expected in PRESET_COUNTS.items():
    config = clip.CLIPConfig.preset(name)
    if config.text not in text_counts:
      text_counts[config.text] = count(clip.text_init_shapes(config.text))
    got = (count(clip.vision_init_shapes(config.vision)), text_counts[config.text],
           config.vision.hidden_size * config.projection_dim,
           config.text.hidden_size * config.projection_dim)
    assert got == expected, name
