"""BLIP's unimodal towers from a Hugging Face `BlipForImageTextRetrieval` checkpoint.

BLIP's retrieval model scores with two unimodal towers (ITC) and reranks with a fusion pass
(ITM). We use only the unimodal path, exactly as Hugging Face computes `use_itm_head=False`:

  image: vision_model(pixels).last_hidden_state[:, 0]   (final-LN [CLS]) -> vision_proj
  text:  text_encoder(input_ids, attention_mask)[:, 0] (no cross-attention) -> text_proj

The text encoder is a BERT without token-type embeddings whose layers also hold cross-attention
weights; the unimodal pass skips them, so the converter leaves them out on purpose, together
with the ITM head.
"""

from collections.abc import Mapping
import dataclasses
import json
import os
import pathlib
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from jsds_jax.models.trunk import bert
from jsds_jax.models.trunk import convert
from jsds_jax.models.trunk import vit
from jsds_jax.models.trunk import weights

# OpenAI CLIP's statistics, which BLIP's image processor uses.
BLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

_VISION_PREFIX = "vision_model."
_TEXT_PREFIX = "text_encoder."
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


@dataclasses.dataclass(frozen=True)
class BlipConfig:
  """Shapes of BLIP's unimodal towers.

  Attributes:
    vision: the ViT image tower.
    text: the BERT text tower (type_vocab_size 0).
    embed_dim: width of `vision_proj` / `text_proj` outputs (256 for BLIP).
  """

  vision: vit.ViTConfig
  text: bert.BertConfig
  embed_dim: int = 256

  @classmethod
  def from_hf(cls, hf_config: Any) -> "BlipConfig":
    """From a Hugging Face `BlipConfig` object or its `config.json` dict.

    A dict goes through `transformers.BlipConfig.from_dict` first, because `save_pretrained`
    leaves out fields that equal their defaults.
    """
    if isinstance(hf_config, Mapping):
      import transformers  # pylint: disable=g-import-not-at-top
      hf_config = transformers.BlipConfig.from_dict(dict(hf_config))
    text = hf_config.text_config
    if getattr(text, "type_vocab_size", 0):
      raise ValueError("BLIP's text encoder has no token-type embeddings")
    return cls(vision=vit.ViTConfig.from_hf(hf_config.vision_config),
               text=bert.BertConfig.from_hf(text),
               embed_dim=int(hf_config.image_text_hidden_size))


def blip_ignore_patterns(config: BlipConfig) -> list[str]:
  """Tensors of a `BlipForImageTextRetrieval` state dict the unimodal towers do not use."""
  return [r"^itm_head\."] + bert.bert_ignore_patterns(_TEXT_PREFIX, config.text)


def convert_blip(state_dict: Mapping[str, Any], config: BlipConfig,
                 source: str = "BLIP state dict") -> dict:
  """`BlipForImageTextRetrieval` tensors -> our towers' params and BLIP's projections.

  Returns:
    {"vision": VisionTransformer params, "text": BertEncoder params,
     "vision_proj": {"kernel": (D_v, P), "bias": (P,)}, "text_proj": {"kernel": (D_t, P),
     "bias": (P,)}, "word_embeddings": (V, D_t)}, all float32 numpy.
  """
  reader = convert.StateDictReader(state_dict, source=source,
                                   ignore=blip_ignore_patterns(config))
  out = {
      "vision": vit.convert_vit(reader, config.vision, layout="hf_blip", prefix=_VISION_PREFIX,
                                source=source),
      "text": bert.convert_bert(reader, config.text, prefix=_TEXT_PREFIX, source=source),
      "vision_proj": reader.dense("vision_proj"),
      "text_proj": reader.dense("text_proj"),
  }
  reader.assert_all_used()
  for name, d in (("vision_proj", config.vision.hidden_size),
                  ("text_proj", config.text.hidden_size)):
    if out[name]["kernel"].shape != (d, config.embed_dim):
      raise convert.ConversionError(f"{source}: {name} kernel {out[name]['kernel'].shape}, "
                                    f"expected {(d, config.embed_dim)}")
  out["word_embeddings"] = bert.word_embeddings(state_dict, _TEXT_PREFIX)
  return out


@dataclasses.dataclass(frozen=True)
class Blip:
  """A loaded BLIP checkpoint: both towers ready to `apply`, and what the tail needs.

  Attributes:
    config: shapes.
    vision_tower: `VisionTransformer`; pixels (B, S, S, 3) normalised -> TowerOutput.
    vision_params: its params.
    text_tower: `BertEncoder` ([CLS] pooling, text-only).
    text_params: its params.
    vision_proj, text_proj: {"kernel": (768, 256), "bias": (256,)} float32 numpy.
    word_embeddings: (V, d_w) float32 (V = 30524 for BLIP).
    image_size: S in pixels.
    image_mean, image_std: per-channel normalisation in 0-1 units.
    tokenizer: a Hugging Face tokenizer, or None when the directory has no tokenizer files.
  """

  config: BlipConfig
  vision_tower: vit.VisionTransformer
  vision_params: dict
  text_tower: bert.BertEncoder
  text_params: dict
  vision_proj: dict
  text_proj: dict
  word_embeddings: np.ndarray
  image_size: int
  image_mean: tuple[float, float, float]
  image_std: tuple[float, float, float]
  tokenizer: Optional[Any] = None


def _normalisation(directory: pathlib.Path) -> tuple[tuple, tuple]:
  path = directory / "preprocessor_config.json"
  if path.exists():
    cfg = json.loads(path.read_text())
    if cfg.get("image_mean") and cfg.get("image_std"):
      return tuple(map(float, cfg["image_mean"])), tuple(map(float, cfg["image_std"]))
  return BLIP_IMAGE_MEAN, BLIP_IMAGE_STD


def read_checkpoint(checkpoint_dir: str | os.PathLike) -> tuple[
    pathlib.Path, BlipConfig, dict, tuple[tuple, tuple], Optional[Any]]:
  """What a `BlipForImageTextRetrieval` folder (or hub id) holds, unconverted.

  Returns:
    (the folder, its `BlipConfig`, the state dict, (image_mean, image_std), the Hugging Face
    tokenizer or None when the folder has no tokenizer files).
  """
  import transformers  # pylint: disable=g-import-not-at-top
  directory = weights.resolve_checkpoint(str(checkpoint_dir))
  config = BlipConfig.from_hf(transformers.BlipConfig.from_pretrained(str(directory)))
  state_dict = weights.load_state_dict(weights.find_weight_file(directory))
  tokenizer = None
  if any((directory / f).exists() for f in _TOKENIZER_FILES):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
  return directory, config, state_dict, _normalisation(directory), tokenizer


def load_blip(checkpoint_dir: str | os.PathLike, dtype: Any = jnp.float32,
              attention_impl: Optional[str] = None) -> Blip:
  """Loads BLIP's unimodal towers from a `BlipForImageTextRetrieval` directory or hub id.

  Args:
    checkpoint_dir: what `save_pretrained` wrote (config.json + weights, optionally the
      processor's files), or a hub id such as "Salesforce/blip-itm-base-coco" (needs network).
    dtype: computation dtype of both towers.
    attention_impl: `jax.nn.dot_product_attention` implementation for both towers.
  """
  directory, config, state_dict, (mean, std), tokenizer = read_checkpoint(checkpoint_dir)
  converted = convert_blip(state_dict, config, source=str(directory))
  return Blip(
      config=config,
      vision_tower=vit.VisionTransformer(config.vision, dtype=dtype,
                                         attention_impl=attention_impl),
      vision_params=converted["vision"],
      text_tower=bert.BertEncoder(config.text, pooling="cls", dtype=dtype,
                                  attention_impl=attention_impl),
      text_params=converted["text"],
      vision_proj=converted["vision_proj"],
      text_proj=converted["text_proj"],
      word_embeddings=converted["word_embeddings"],
      image_size=config.vision.image_size,
      image_mean=mean,
      image_std=std,
      tokenizer=tokenizer)
