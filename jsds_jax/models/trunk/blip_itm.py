"""BLIP's ITM cross-encoder: the text encoder in multimodal mode and `itm_head` (D -> 2).

BLIP's retrieval reranks its ITC top k with image-text matching: the caption runs through the
same BERT as the unimodal text tower, but every layer also cross-attends to the image's
final-layer token states (the vision tower's output after its last LayerNorm, all S = 1 + P
tokens), and `itm_head` reads the [CLS] position:

  logits = itm_head(text_encoder(ids, mask, encoder_hidden_states=image_tokens)[:, 0])  (B, 2)

logits[:, 1] is the "match" logit BLIP adds to the ITC similarity (salesforce/BLIP
`train_retrieval.py`, `evaluation()`).

The first token: the original BLIP replaces it by `[ENC]` for ITM (`text_ids[:, 0] =
tokenizer.enc_token_id`); Hugging Face's `BlipForImageTextRetrieval` keeps what the tokenizer
wrote ([CLS]), which its checkpoints were not trained with (transformers issues #22732,
#25629). `BlipItm.enc_token_id` follows the original by default; None follows Hugging Face.

The converter reads a whole `BlipForImageTextRetrieval` state dict with one reader, so every
tensor is used: the vision tower, the text encoder with its cross-attention, both projections
and `itm_head`. The unimodal text tower's params are the cross-encoder's minus its
cross-attention (`unimodal_text_params`): the two share every other weight.
"""

from collections.abc import Mapping
import dataclasses
import os
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jsds_jax.models.trunk import bert
from jsds_jax.models.trunk import blip
from jsds_jax.models.trunk import convert
from jsds_jax.models.trunk import vit

ENC_TOKEN = "[ENC]"
# bert-base-uncased has 30522 words; BLIP's tokenizer adds [DEC] (30522) then [ENC] (30523).
BLIP_ENC_TOKEN_ID = 30523

_VISION_PREFIX = "vision_model."
_TEXT_PREFIX = "text_encoder."


class BlipItm(nn.Module):
  """BLIP's ITM cross-encoder.

  Attributes:
    config: the text encoder's shape (BLIP: BERT-base without token types).
    enc_token_id: the id written over every caption's first token (the original BLIP's
      `[ENC]`); None keeps the tokenizer's first token, as Hugging Face does.
    dtype: computation dtype; params stay float32, logits come back float32.
    attention_impl: `jax.nn.dot_product_attention` implementation (None/"xla" or "cudnn").
    cross_attention_from: the first layer that cross-attends to the image: 0 for BLIP (every
      layer); ALBEF's `fusion_layer` (6) for ALBEF's ITM (`albef.load_albef_itm`), whose
      first layers are its text-only ones and whose first token stays [CLS]
      (enc_token_id=None).
  """

  config: bert.BertConfig
  enc_token_id: Optional[int] = BLIP_ENC_TOKEN_ID
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  cross_attention_from: int = 0

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, image_tokens: jax.Array,
               image_mask: Optional[jax.Array] = None) -> jax.Array:
    """Scores B (caption, image) pairs.

    Args:
      input_ids: (B, L) int32 caption tokens as the tokenizer wrote them.
      attention_mask: (B, L) int, 1 for real tokens.
      image_tokens: (B, S, D_v) the images' final-layer token states, or (1, S, D_v): one
        image against B captions (its keys and values are then projected once per layer).
      image_mask: (B or 1, S) int or None (every image token visible, as BLIP).

    Returns:
      (B, 2) float32 logits [no match, match].
    """
    if self.enc_token_id is not None:
      if not 0 <= self.enc_token_id < self.config.vocab_size:
        raise ValueError(f"enc_token_id {self.enc_token_id} is outside the vocabulary of "
                         f"{self.config.vocab_size} words")
      input_ids = jnp.asarray(input_ids).at[:, 0].set(self.enc_token_id)
    states = bert.BertEncoder(self.config, pooling="cls", dtype=self.dtype,
                              attention_impl=self.attention_impl, cross_attention=True,
                              cross_attention_from=self.cross_attention_from, name="text")(input_ids, attention_mask, None, image_tokens,
                                           image_mask)
    logits = nn.Dense(2, dtype=self.dtype, param_dtype=jnp.float32, name="itm_head")(
        states.pooled)
    return logits.astype(jnp.float32)


def match_logit(module: BlipItm, params: Mapping[str, Any], input_ids: jax.Array,
                attention_mask: jax.Array, image_tokens: jax.Array) -> jax.Array:
  """The "match" logit BLIP ranks by: `BlipItm(...)[:, 1]`, (B,) float32."""
  return module.apply({"params": params}, input_ids, attention_mask, image_tokens)[:, 1]


def has_itm_weights(state_dict: Mapping[str, Any]) -> bool:
  """Whether a BLIP state dict holds the ITM head and the text encoder's cross-attention."""
  names = state_dict.keys()
  return "itm_head.weight" in names and any(
      k.startswith(f"{_TEXT_PREFIX}encoder.layer.") and ".crossattention." in k for k in names)


def convert_blip_itm(state_dict: Mapping[str, Any], config: blip.BlipConfig,
                     source: str = "BLIP state dict") -> dict:
  """A whole `BlipForImageTextRetrieval` state dict -> the towers and the cross-encoder.

  Every tensor is read (buffers aside) and every param filled, or this raises.

  Returns:
    {"vision": VisionTransformer params, "vision_proj", "text_proj": {"kernel", "bias"},
     "itm": BlipItm params {"text": BertEncoder(cross_attention=True) params,
     "itm_head": {"kernel": (D_t, 2), "bias": (2,)}}}, float32 numpy. The unimodal text
    tower's params are `unimodal_text_params(out["itm"])`.

  Raises:
    convert.ConversionError: the checkpoint has no ITM head or no cross-attention (e.g. a
      dual-encoder-only export), or any tensor is missing, unused or the wrong shape.
  """
  if not has_itm_weights(state_dict):
    raise convert.ConversionError(
        f"{source}: no ITM weights (itm_head.* and text_encoder.encoder.layer.*.crossattention.*)"
        "; the cross-encoder stage needs a BlipForImageTextRetrieval checkpoint such as "
        "Salesforce/blip-itm-base-coco, or turn the stage off")
  ignore = [rf"^{re.escape(_TEXT_PREFIX)}embeddings\.position_ids$"]
  reader = convert.StateDictReader(state_dict, source=source, ignore=ignore)
  text = bert.convert_bert(reader, config.text, prefix=_TEXT_PREFIX, source=source,
                           context_width=config.vision.hidden_size)
  out = {
      "vision": vit.convert_vit(reader, config.vision, layout="hf_blip", prefix=_VISION_PREFIX,
                                source=source),
      "vision_proj": reader.dense("vision_proj"),
      "text_proj": reader.dense("text_proj"),
      "itm": {"text": text, "itm_head": reader.dense("itm_head")},
  }
  reader.assert_all_used()
  check_itm_params(out["itm"], BlipItm(config.text, enc_token_id=None),
                   config.vision.hidden_size, source)
  return out


def check_itm_params(itm: Mapping[str, Any], module: BlipItm, image_width: int,
                     source: str) -> None:
  """Raises ConversionError unless `itm` (converted {"text", "itm_head"}) has `module`'s param
  tree and a (hidden, 2) head; `image_width` is the image token states' width."""
  hidden = module.config.hidden_size
  head = itm["itm_head"]["kernel"].shape
  if head != (hidden, 2):
    raise convert.ConversionError(f"{source}: itm_head kernel {head}, expected {(hidden, 2)}")
  ids = jnp.zeros((1, 2), jnp.int32)
  image = jnp.zeros((1, 1, image_width), jnp.float32)
  ref = jax.eval_shape(module.init, jax.random.key(0), ids, ids, image)["params"]
  convert.assert_same_structure(itm, ref, source)


def unimodal_text_params(itm_params: Mapping[str, Any]) -> dict:
  """The unimodal text tower's params (`BertEncoder(cross_attention=False)`) inside `BlipItm`'s:
  the same tensors without the cross-attention sublayers."""
  text = itm_params["text"]
  return {name: ({k: v for k, v in sub.items() if not k.startswith("cross_")}
                 if name.startswith("layer_") else sub) for name, sub in text.items()}


def enc_token_id_of(tokenizer: Any, vocab_size: int) -> int:
  """The `[ENC]` id: from the tokenizer when it knows the token, else BLIP's fixed id.

  Raises:
    ValueError: neither gives an id inside the vocabulary (then set the id explicitly).
  """
  if tokenizer is not None:
    tid = tokenizer.convert_tokens_to_ids(ENC_TOKEN)
    if tid is not None and tid != getattr(tokenizer, "unk_token_id", None):
      return int(tid)
  if BLIP_ENC_TOKEN_ID < vocab_size:
    return BLIP_ENC_TOKEN_ID
  raise ValueError(f"cannot tell the {ENC_TOKEN} token's id: the tokenizer does not know it "
                   f"and the vocabulary has only {vocab_size} words; pass enc_token_id "
                   "(or None to keep the first token as Hugging Face does)")


@dataclasses.dataclass(frozen=True)
class BlipWithItm:
  """A loaded BLIP checkpoint with its cross-encoder.

  Attributes:
    towers: the unimodal towers and what the tail needs (`blip.Blip`).
    itm: the `BlipItm` module.
    itm_params: its params.
  """

  towers: blip.Blip
  itm: BlipItm
  itm_params: dict


def load_blip_itm(checkpoint_dir: str | os.PathLike, dtype: Any = jnp.float32,
                  attention_impl: Optional[str] = None,
                  enc_token_id: Optional[int] | str = "auto") -> BlipWithItm:
  """Loads BLIP's towers and ITM cross-encoder from a `BlipForImageTextRetrieval` checkpoint.

  Args:
    checkpoint_dir: a `save_pretrained` directory or a hub id such as
      "Salesforce/blip-itm-base-coco" (needs network).
    dtype, attention_impl: for every module.
    enc_token_id: "auto" (the tokenizer's `[ENC]`, else 30523), an id, or None to keep the
      first token as Hugging Face does.
  """
  directory, config, state_dict, (mean, std), tokenizer = blip.read_checkpoint(checkpoint_dir)
  converted = convert_blip_itm(state_dict, config, source=str(directory))
  towers = blip.Blip(
      config=config,
      vision_tower=vit.VisionTransformer(config.vision, dtype=dtype,
                                         attention_impl=attention_impl),
      vision_params=converted["vision"],
      text_tower=bert.BertEncoder(config.text, pooling="cls", dtype=dtype,
                                  attention_impl=attention_impl),
      text_params=unimodal_text_params(converted["itm"]),
      vision_proj=converted["vision_proj"],
      text_proj=converted["text_proj"],
      word_embeddings=bert.word_embeddings(state_dict, _TEXT_PREFIX),
      image_size=config.vision.image_size,
      image_mean=mean,
      image_std=std,
      tokenizer=tokenizer)
  if enc_token_id == "auto":
    enc_token_id = enc_token_id_of(tokenizer, config.text.vocab_size)
  module = BlipItm(config.text, enc_token_id=enc_token_id, dtype=dtype,
                   attention_impl=attention_impl)
  return BlipWithItm(towers=towers, itm=module, itm_params=converted["itm"])


def blip_base_itm_config() -> bert.BertConfig:
  """BLIP-base's text encoder (BERT-base, vocabulary 30524, no token types): for benchmarks with
  random weights."""
  return bert.BertConfig(vocab_size=30524, hidden_size=768, num_layers=12, num_heads=12,
                         intermediate_size=3072, max_position_embeddings=512, type_vocab_size=0)


def random_itm_params(config: bert.BertConfig, image_width: int, seed: int = 0) -> dict:
  """Random `BlipItm` params (float32 numpy), for benchmarks and tests."""
  ids = jnp.zeros((1, 2), jnp.int32)
  image = jnp.zeros((1, 1, image_width), jnp.float32)
  init = jax.jit(BlipItm(config, enc_token_id=None).init)
  return jax.tree_util.tree_map(np.asarray, init(jax.random.key(seed), ids, ids, image)["params"])
