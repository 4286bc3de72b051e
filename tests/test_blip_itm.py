"""BLIP's ITM cross-encoder against Hugging Face `BlipForImageTextRetrieval(use_itm_head=True)`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jsds_jax.models.trunk import bert
from jsds_jax.models.trunk import blip
from jsds_jax.models.trunk import convert
from jsds_jax.models.trunk import blip_itm

TOL = 1e-4
ENC = 99  # the tiny vocabulary's stand-in for [ENC]


def _tiny_hf_config():
  return transformers.BlipConfig(
      vision_config=dict(image_size=32, patch_size=8, hidden_size=24, intermediate_size=37,
                         num_hidden_layers=2, num_attention_heads=4),
      text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=37,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40,
                       bos_token_id=98, pad_token_id=0, sep_token_id=3, eos_token_id=2),
      image_text_hidden_size=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A random tiny BLIP whose vision width (24) differs from the text width (32), so that the
  cross-attention's key/value shapes are checked too."""
  path = tmp_path_factory.mktemp("tiny_blip_itm")
  torch.manual_seed(0)
  model = transformers.BlipForImageTextRetrieval(_tiny_hf_config()).eval()
  with torch.no_grad():
    emb = model.vision_model.embeddings
    emb.class_embedding.normal_(0, 0.5)
    emb.position_embedding.normal_(0, 0.5)
    # A default-initialised head gives logits near 0; widen it so a wrong input shows.
    model.itm_head.weight.normal_(0, 1.0)
    model.itm_head.bias.normal_(0, 1.0)
  model.save_pretrained(path)
  return model, path


def _batch(rng, b=4, l=7):
  pixels = rng.normal(size=(b, 32, 32, 3)).astype(np.float32)
  ids = np.zeros((b, l), np.int32)
  mask = np.zeros((b, l), np.int32)
  for i, n in enumerate([7, 5, 3, 2][:b]):
    ids[i, :n] = rng.integers(4, 98, n)
    ids[i, 0] = 1  # a [CLS]-like first token
    mask[i, :n] = 1
  return pixels, ids, mask


def _hf_logits(model, pixels, ids, mask):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(),
                pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                attention_mask=torch.from_numpy(mask).long(), use_itm_head=True)
  return out.itm_score.numpy(), out.last_hidden_state.numpy()


@pytest.mark.parametrize("enc_token_id", [ENC, None])
def test_itm_logits_match_hugging_face(tiny, enc_token_id):
  """[ENC] on our side is the same as writing it into Hugging Face's input ids; None keeps the
  first token on both sides."""
  model, path = tiny
  loaded = blip_itm.load_blip_itm(path, enc_token_id=enc_token_id)
  assert loaded.itm.enc_token_id == enc_token_id
  pixels, ids, mask = _batch(np.random.default_rng(0))
  hf_ids = ids.copy()
  if enc_token_id is not None:
    hf_ids[:, 0] = enc_token_id
  ref, ref_image_tokens = _hf_logits(model, pixels, hf_ids, mask)

  image = jax.jit(loaded.towers.vision_tower.apply)({"params": loaded.towers.vision_params},
                                                    pixels)
  np.testing.assert_allclose(image.tokens, ref_image_tokens, atol=TOL, rtol=0)
  logits = jax.jit(loaded.itm.apply)({"params": loaded.itm_params}, ids, mask, image.tokens)
  assert logits.shape == (4, 2) and logits.dtype == jnp.float32
  assert np.abs(ref).max() > 0.5  # the logits are not all near zero
  np.testing.assert_allclose(logits, ref, atol=TOL, rtol=0)
  # The first token matters: the other setting gives other logits.
  other = blip_itm.BlipItm(loaded.itm.config, enc_token_id=None if enc_token_id else ENC)
  assert np.abs(other.apply({"params": loaded.itm_params}, ids, mask, image.tokens)
                - logits).max() > 1e-3
  np.testing.assert_allclose(
      blip_itm.match_logit(loaded.itm, loaded.itm_params, ids, mask, image.tokens),
      ref[:, 1], atol=TOL, rtol=0)


def test_one_image_against_many_captions(tiny):
  """A (1, S, D) image broadcast inside the module equals the image repeated B times."""
  _, path = tiny
  loaded = blip_itm.load_blip_itm(path, enc_token_id=ENC)
  pixels, ids, mask = _batch(np.random.default_rng(1))
  tokens = loaded.towers.vision_tower.apply({"params": loaded.towers.vision_params},
                                            pixels[:1]).tokens
  apply = jax.jit(loaded.itm.apply)
  shared = apply({"params": loaded.itm_params}, ids, mask, tokens)
  repeated = apply({"params": loaded.itm_params}, ids, mask, jnp.repeat(tokens, 4, axis=0))
  np.testing.assert_allclose(shared, repeated, atol=1e-5, rtol=0)


def test_every_tensor_used_and_unimodal_path_unchanged(tiny):
  """The converter reads the whole checkpoint; the towers it returns are load_blip's."""
  model, path = tiny
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  config = blip.BlipConfig.from_hf(model.config)
  out = blip_itm.convert_blip_itm(sd, config)
  ref = blip.convert_blip(sd, config)
  text = blip_itm.unimodal_text_params(out["itm"])
  same = jax.tree_util.tree_map(np.array_equal, text, ref["text"])
  assert all(jax.tree_util.tree_leaves(same))
  np.testing.assert_array_equal(out["itm"]["itm_head"]["kernel"],
                                model.itm_head.weight.detach().numpy().T)
  layer = out["itm"]["text"]["layer_1"]
  assert layer["cross_key"]["kernel"].shape == (24, 32)  # vision width -> text width
  loaded = blip_itm.load_blip_itm(path, enc_token_id=None)
  assert jax.tree_util.tree_structure(loaded.towers.text_params) == \
      jax.tree_util.tree_structure(ref["text"])
  # An extra tensor in the checkpoint is not silently ignored.
  with pytest.raises(convert.ConversionError, match="not used"):
    blip_itm.convert_blip_itm({**sd, "itm_head.extra": np.zeros(2, np.float32)}, config)


def test_checkpoint_without_itm_weights_is_refused(tiny):
  model, _ = tiny
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  config = blip.BlipConfig.from_hf(model.config)
  no_head = {k: v for k, v in sd.items() if not k.startswith("itm_head.")}
  with pytest.raises(convert.ConversionError, match="no ITM weights.*blip-itm-base-coco"):
    blip_itm.convert_blip_itm(no_head, config)
  no_cross = {k: v for k, v in sd.items() if ".crossattention." not in k}
  with pytest.raises(convert.ConversionError, match="no ITM weights"):
    blip_itm.convert_blip_itm(no_cross, config)


def test_enc_token_id():
  assert blip_itm.enc_token_id_of(None, 30524) == blip_itm.BLIP_ENC_TOKEN_ID == 30523
  with pytest.raises(ValueError, match="enc_token_id"):
    blip_itm.enc_token_id_of(None, 100)

  class Tok:
    unk_token_id = 100

    def convert_tokens_to_ids(self, token):
      return 7 if token == "[ENC]" else self.unk_token_id

  assert blip_itm.enc_token_id_of(Tok(), 100) == 7
  cfg = bert.BertConfig(vocab_size=50, hidden_size=8, num_layers=1, num_heads=2,
                        intermediate_size=16, type_vocab_size=0)
  ids = jnp.zeros((1, 3), jnp.int32)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    blip_itm.BlipItm(cfg, enc_token_id=60).init(jax.random.key(0), ids, ids,
                                                 jnp.zeros((1, 2, 8)))
