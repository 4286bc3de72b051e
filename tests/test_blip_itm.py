"""BLIP's ITM cross-encoder against Hugging Face `BlipForImageTextRetrieval(use_itm_head=True)`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import testing_utils  # tests/testing_utils.py

from jsds_jax.models.trunk import bert
from jsds_jax.models.trunk import blip
from jsds_jax.models.trunk import convert
from jsds_jax.models.trunk import blip_itm

TOL = 1e-4
ENC = 99  # the tiny vocabulary's stand-in for [ENC]


@pytest.fixture(name="tiny")
def _tiny(tiny_hf_blip):
  """The shared tiny BLIP (tests/conftest.py): its vision width (24) differs from the text
  width (32), so that the cross-attention's key/value shapes are checked too."""
  return tiny_hf_blip


def _batch(rng):
  return testing_utils.blip_batch(rng, lengths=(7, 5, 3, 2))


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
