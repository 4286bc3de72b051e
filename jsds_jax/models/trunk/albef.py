"""ALBEF's unimodal towers from an ALBEF / LAVIS retrieval checkpoint (`.pth`).

ALBEF scores retrieval candidates with two unimodal towers (ITC):

  image: visual_encoder(pixels)[:, 0]   (timm-style ViT-B/16, final-LN [CLS]) -> vision_proj
  text:  text_encoder(ids, mask, mode="text")[:, 0] -> text_proj

where "text" mode runs only the first `fusion_layer` (6 of 12) BERT layers; the later layers
hold cross-attention and serve the fusion (ITM) path. `load_albef` converts the towers only;
`load_albef_itm` also converts the fusion path and `itm_head` into a `blip_itm.BlipItm`
configured for ALBEF (cross-attention from layer `fusion_layer` on, first token [CLS]), the
cross-encoder of ALBEF's retrieval eval (LAVIS `albef_models.compute_sim_matrix`: the text
encoder in its default "multimodal" mode, all 12 layers, over the image's final token states;
score = itm_head(...)[:, 1] + ITC similarity over the ITC top `k_test`, 128 on COCO). The
checkpoint also carries momentum copies (`*_m`), queues and `temp`: training state, left out
on purpose (and the ITM head and fusion layers by `load_albef`).

Layouts: the visual encoder uses timm's names (`visual_encoder.blocks.N.attn.qkv`, `norm`); the
text encoder sits under `text_encoder.bert.` (pretraining checkpoints, `BertForMaskedLM`) or
`text_encoder.` (retrieval / LAVIS checkpoints, `BertModel`); both are recognised. The
checkpoint holds no model config: shapes are read off the tensors, and the head counts (not
visible in the weights) default to ViT-B / BERT-base's 12 unless a `config_bert.json` (ALBEF's
BERT config, with `fusion_layer`) sits beside the weights.
"""

from collections.abc import Mapping
import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jsds_jax.models.trunk import bert
from jsds_jax.models.trunk import blip
from jsds_jax.models.trunk import blip_itm
from jsds_jax.models.trunk import convert
from jsds_jax.models.trunk import vit
from jsds_jax.models.trunk import weights

# ALBEF normalises with OpenAI CLIP's statistics, at 384 px for retrieval.
ALBEF_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
ALBEF_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

_VISION_PREFIX = "visual_encoder."
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


@dataclasses.dataclass(frozen=True)
class AlbefConfig:
  """Shapes of ALBEF's unimodal towers.

  Attributes:
    vision: the ViT (LayerNorm eps 1e-6).
    text: the whole BERT, fusion layers included (only `text_layers` of them are built).
    embed_dim: width of `vision_proj` / `text_proj` outputs (256).
    text_layers: ALBEF's `fusion_layer`: how many layers "text" mode runs (6).
    text_prefix: "text_encoder.bert." or "text_encoder.".
  """

  vision: vit.ViTConfig
  text: bert.BertConfig
  embed_dim: int = 256
  text_layers: int = 6
  text_prefix: str = "text_encoder."


def albef_text_prefix(state_dict: Mapping[str, Any]) -> str:
  """Where the BERT tensors sit: "text_encoder.bert." or "text_encoder."."""
  for prefix in ("text_encoder.bert.", "text_encoder."):
    if f"{prefix}embeddings.word_embeddings.weight" in state_dict:
      return prefix
  raise convert.ConversionError("no ALBEF text encoder: expected "
                                "'text_encoder[.bert].embeddings.word_embeddings.weight'")


def infer_albef_config(state_dict: Mapping[str, Any], vision_heads: int = 12,
                       text_heads: int = 12, fusion_layer: Optional[int] = None,
                       text_layer_norm_eps: float = 1e-12) -> AlbefConfig:
  """An `AlbefConfig` read off tensor shapes.

  Args:
    state_dict: the checkpoint's flat state dict.
    vision_heads, text_heads: attention heads (not visible in the weights).
    fusion_layer: layers run in text mode; None = the first layer holding cross-attention.
    text_layer_norm_eps: BERT's LayerNorm epsilon.
  """
  prefix = albef_text_prefix(state_dict)
  shape = lambda name: np.shape(state_dict[f"{prefix}{name}"])
  layer_re = re.compile("^" + re.escape(prefix) + r"encoder\.layer\.(\d+)\.")
  matches = [(int(m.group(1)), k) for k in state_dict if (m := layer_re.match(k))]
  layers = [i for i, _ in matches]
  cross = [i for i, k in matches if ".crossattention." in k]
  num_layers = 1 + max(layers)
  if fusion_layer is None:
    fusion_layer = min(cross) if cross else num_layers
  type_name = f"{prefix}embeddings.token_type_embeddings.weight"
  text = bert.BertConfig(
      vocab_size=shape("embeddings.word_embeddings.weight")[0],
      hidden_size=shape("embeddings.word_embeddings.weight")[1],
      num_layers=num_layers, num_heads=text_heads,
      intermediate_size=shape("encoder.layer.0.intermediate.dense.weight")[0],
      max_position_embeddings=shape("embeddings.position_embeddings.weight")[0],
      type_vocab_size=np.shape(state_dict[type_name])[0] if type_name in state_dict else 0,
      layer_norm_eps=text_layer_norm_eps, hidden_act="gelu")
  vision = vit.infer_vit_config(state_dict, "timm", _VISION_PREFIX, num_heads=vision_heads,
                                layer_norm_eps=1e-6)
  embed_dim = int(np.shape(state_dict["vision_proj.weight"])[0])
  return AlbefConfig(vision=vision, text=text, embed_dim=embed_dim, text_layers=int(fusion_layer),
                     text_prefix=prefix)


# Training state of an ALBEF checkpoint that no tower or cross-encoder reads.
_TRAINING_STATE = [
    r"^(visual_encoder_m|text_encoder_m|vision_proj_m|text_proj_m)\.",  # Momentum copies.
    r"^(image_queue|text_queue|idx_queue|queue_ptr|temp)$",
    r"^text_encoder\.cls\.",  # Pretraining's MLM head.
]


def albef_ignore_patterns(config: AlbefConfig) -> list[str]:
  """Tensors of an ALBEF checkpoint the unimodal towers do not use."""
  return _TRAINING_STATE + [r"^itm_head\."] + bert.bert_ignore_patterns(
      config.text_prefix, config.text, config.text_layers)


def albef_itm_ignore_patterns(config: AlbefConfig) -> list[str]:
  """Tensors of an ALBEF checkpoint that the towers with the cross-encoder do not use: the
  training state and BERT's buffers and pooler, nothing of the fusion path."""
  return _TRAINING_STATE + bert.bert_ignore_patterns(config.text_prefix, config.text,
                                                     cross_attention=True)


def convert_albef(state_dict: Mapping[str, Any], config: AlbefConfig,
                  source: str = "ALBEF state dict") -> dict:
  """ALBEF tensors -> our towers' params and ALBEF's projections.

  Returns:
    {"vision": VisionTransformer params, "text": BertEncoder(num_layers_used=text_layers)
     params, "vision_proj", "text_proj": {"kernel": (D, P), "bias": (P,)},
     "word_embeddings": (V, D_t)}, all float32 numpy.
  """
  reader = convert.StateDictReader(state_dict, source=source,
                                   ignore=albef_ignore_patterns(config))
  out = {
      "vision": vit.convert_vit(reader, config.vision, layout="timm", prefix=_VISION_PREFIX,
                                source=source),
      "text": bert.convert_bert(reader, config.text, prefix=config.text_prefix,
                                num_layers_used=config.text_layers, source=source),
      "vision_proj": reader.dense("vision_proj"),
      "text_proj": reader.dense("text_proj"),
  }
  reader.assert_all_used()
  out["word_embeddings"] = bert.word_embeddings(state_dict, config.text_prefix)
  return out


def has_itm_weights(state_dict: Mapping[str, Any], config: AlbefConfig) -> bool:
  """Whether an ALBEF state dict holds `itm_head` and the fusion layers' cross-attention."""
  prefix = f"{config.text_prefix}encoder.layer."
  return "itm_head.weight" in state_dict and any(
      k.startswith(prefix) and ".crossattention." in k for k in state_dict)


def itm_module(config: AlbefConfig, dtype: Any = jnp.float32,
               attention_impl: Optional[str] = None) -> blip_itm.BlipItm:
  """ALBEF's cross-encoder: `BlipItm` with cross-attention from layer `fusion_layer` on and the
  tokenizer's [CLS] first (ALBEF has no [ENC] token)."""
  return blip_itm.BlipItm(config.text, enc_token_id=None, dtype=dtype,
                          attention_impl=attention_impl,
                          cross_attention_from=config.text_layers)


def convert_albef_itm(state_dict: Mapping[str, Any], config: AlbefConfig,
                      source: str = "ALBEF state dict") -> dict:
  """A whole ALBEF / LAVIS retrieval checkpoint -> the towers and the ITM cross-encoder.

  One reader over the checkpoint: every tensor but the training state (momentum copies,
  queues, `temp`, an MLM head) and BERT's buffers is read, and every param filled, or this
  raises.

  Returns:
    {"vision", "vision_proj", "text_proj", "word_embeddings"} as `convert_albef`, and "itm":
    `itm_module(config)`'s params {"text": all `config.text.num_layers` layers, those from
    `text_layers` on with cross-attention, "itm_head": {"kernel": (D_t, 2), "bias": (2,)}}.
    The unimodal text tower's params are `unimodal_text_params(out["itm"], config)`.

  Raises:
    convert.ConversionError: no ITM head or no fusion cross-attention (e.g. a towers-only
      export), or a tensor missing, unused or of the wrong shape.
  """
  if not has_itm_weights(state_dict, config):
    raise convert.ConversionError(
        f"{source}: no ITM weights (itm_head.* and {config.text_prefix}encoder.layer.*."
        "crossattention.*); the cross-encoder stage needs an ALBEF retrieval checkpoint such "
        "as LAVIS' albef_coco_retrieval_lavis.pt, or turn the stage off")
  reader = convert.StateDictReader(state_dict, source=source,
                                   ignore=albef_itm_ignore_patterns(config))
  text = bert.convert_bert(reader, config.text, prefix=config.text_prefix, source=source,
                           context_width=config.vision.hidden_size,
                           cross_attention_from=config.text_layers)
  out = {
      "vision": vit.convert_vit(reader, config.vision, layout="timm", prefix=_VISION_PREFIX,
                                source=source),
      "vision_proj": reader.dense("vision_proj"),
      "text_proj": reader.dense("text_proj"),
      "itm": {"text": text, "itm_head": reader.dense("itm_head")},
  }
  reader.assert_all_used()
  blip_itm.check_itm_params(out["itm"], itm_module(config), config.vision.hidden_size, source)
  out["word_embeddings"] = bert.word_embeddings(state_dict, config.text_prefix)
  return out


def unimodal_text_params(itm_params: Mapping[str, Any], config: AlbefConfig) -> dict:
  """The text tower's params ("text" mode: `BertEncoder(num_layers_used=text_layers)`) inside
  the cross-encoder's: the embeddings and the first `text_layers` layers (which hold no
  cross-attention), the same tensors."""
  text = itm_params["text"]
  later = {f"layer_{i}" for i in range(config.text_layers, config.text.num_layers)}
  return {name: sub for name, sub in text.items() if name not in later}


@dataclasses.dataclass(frozen=True)
class Albef(blip.Blip):
  """A loaded ALBEF checkpoint: `blip.Blip`'s fields, with an `AlbefConfig`."""

  config: AlbefConfig


def weight_file(checkpoint: str | os.PathLike) -> pathlib.Path:
  """The `.pth` an ALBEF checkpoint (file or folder) names."""
  return _weight_file(pathlib.Path(os.path.expanduser(os.fspath(checkpoint))))


def _weight_file(path: pathlib.Path) -> pathlib.Path:
  if path.is_file():
    return path
  found = sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
  if len(found) != 1:
    raise FileNotFoundError(f"expected exactly one weights file ({', '.join(_WEIGHT_SUFFIXES)}) "
                            f"in '{path}', found {[p.name for p in found]}")
  return found[0]


def _read(checkpoint: str | os.PathLike, vision_heads: int, text_heads: Optional[int]
          ) -> tuple[pathlib.Path, dict, AlbefConfig, Any]:
  """(weights file, state dict, config, tokenizer or None) of an ALBEF checkpoint."""
  path = pathlib.Path(os.path.expanduser(os.fspath(checkpoint)))
  weight_file = _weight_file(path)
  directory = weight_file.parent
  state_dict = weights.load_state_dict(weight_file)

  fusion_layer, eps = None, 1e-12
  bert_json = directory / "config_bert.json"
  if bert_json.exists():
    cfg = json.loads(bert_json.read_text())
    fusion_layer = cfg.get("fusion_layer")
    eps = float(cfg.get("layer_norm_eps", eps))
    if text_heads is None:
      text_heads = int(cfg["num_attention_heads"])
  config = infer_albef_config(state_dict, vision_heads=vision_heads,
                              text_heads=12 if text_heads is None else text_heads,
                              fusion_layer=fusion_layer, text_layer_norm_eps=eps)
  tokenizer = None
  if any((directory / f).exists() for f in _TOKENIZER_FILES):
    import transformers  # pylint: disable=g-import-not-at-top
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
  return weight_file, state_dict, config, tokenizer


def _towers(config: AlbefConfig, converted: Mapping[str, Any], text_params: Mapping[str, Any],
            tokenizer: Any, dtype: Any, attention_impl: Optional[str]) -> "Albef":
  return Albef(
      config=config,
      vision_tower=vit.VisionTransformer(config.vision, dtype=dtype,
                                         attention_impl=attention_impl),
      vision_params=converted["vision"],
      text_tower=bert.BertEncoder(config.text, pooling="cls",
                                  num_layers_used=config.text_layers, dtype=dtype,
                                  attention_impl=attention_impl),
      text_params=text_params,
      vision_proj=converted["vision_proj"],
      text_proj=converted["text_proj"],
      word_embeddings=converted["word_embeddings"],
      image_size=config.vision.image_size,
      image_mean=ALBEF_IMAGE_MEAN,
      image_std=ALBEF_IMAGE_STD,
      tokenizer=tokenizer)


def load_albef(checkpoint: str | os.PathLike, dtype: Any = jnp.float32,
               attention_impl: Optional[str] = None, vision_heads: int = 12,
               text_heads: Optional[int] = None) -> Albef:
  """Loads ALBEF's unimodal towers.

  Args:
    checkpoint: the `.pth` file, or a directory holding exactly one weights file and
      optionally ALBEF's `config_bert.json` and tokenizer files.
    dtype: computation dtype of both towers.
    attention_impl: `jax.nn.dot_product_attention` implementation for both towers.
    vision_heads: the ViT's attention heads (12 for ALBEF's ViT-B/16).
    text_heads: BERT's attention heads; None = `config_bert.json`'s, else 12.
  """
  weight_file, state_dict, config, tokenizer = _read(checkpoint, vision_heads, text_heads)
  converted = convert_albef(state_dict, config, source=str(weight_file))
  return _towers(config, converted, converted["text"], tokenizer, dtype, attention_impl)


def load_albef_itm(checkpoint: str | os.PathLike, dtype: Any = jnp.float32,
                   attention_impl: Optional[str] = None, vision_heads: int = 12,
                   text_heads: Optional[int] = None) -> blip_itm.BlipWithItm:
  """Loads ALBEF's towers and ITM cross-encoder (arguments as `load_albef`).

  Returns:
    `BlipWithItm(towers, itm=itm_module(config), itm_params)`; score pairs with
    `itm.apply({"params": itm_params}, ids, mask, image_tokens)` as BLIP's.

  Raises:
    convert.ConversionError: the checkpoint has no ITM weights (`convert_albef_itm`).
  """
  weight_file, state_dict, config, tokenizer = _read(checkpoint, vision_heads, text_heads)
  converted = convert_albef_itm(state_dict, config, source=str(weight_file))
  towers = _towers(config, converted, unimodal_text_params(converted["itm"], config), tokenizer,
                   dtype, attention_impl)
  return blip_itm.BlipWithItm(towers=towers, itm=itm_module(config, dtype, attention_impl),
                              itm_params=converted["itm"])
