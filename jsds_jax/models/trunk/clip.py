"""CLIP image and text towers in the Hugging Face `CLIPModel` layout, and their loader.

The towers reproduce `transformers.CLIPVisionModel` / `CLIPTextModel` (ViT-B/32, B/16, L/14 and
any other size a `config.json` describes); the projections (`visual_projection`,
`text_projection`) stay outside the modules and come back from `convert_clip` as
`{"kernel": (D, P), "bias": (P,)}` like every other backbone's.

  loaded = load_clip("/path/to/save_pretrained_dir")
  out = loaded.vision_tower.apply({"params": loaded.vision_params}, pixels)
  image_embeds = out.pooled @ loaded.projections["image"]["kernel"]
"""

from collections.abc import Mapping
import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jsds_jax.models.trunk import convert
from jsds_jax.models.trunk import weights
from jsds_jax.models.trunk.tower_output import TowerOutput

# CLIP's image normalisation, used when a checkpoint ships no `preprocessor_config.json`.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Hugging Face CLIP configs written before transformers PR #24773 carry eos_token_id=2, which is
# wrong for the real vocabulary; for those HF pools at argmax(input_ids) (the EOS token is the
# largest id in CLIP's vocabulary) and we must do the same to match their features.
_LEGACY_EOS_TOKEN_ID = 2

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


# ----------------------------------------------------------------------------------------------
# Configs.


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Sizes of the CLIP image tower (defaults: ViT-B/32 at 224 px, as `transformers`)."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Sizes and special tokens of the CLIP text tower (defaults as `transformers`)."""

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  pad_token_id: Optional[int] = 1
  bos_token_id: Optional[int] = 49406
  eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A CLIP dual encoder: both towers and the width P of the shared embedding space."""

  vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
  text: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592

  @classmethod
  def from_hf(cls, source: str | os.PathLike | Mapping[str, Any]) -> "CLIPConfig":
    """Reads a `transformers.CLIPModel` config.

    Args:
      source: a checkpoint directory, the path of its `config.json`, or the config as a dict
        (`CLIPConfig.to_dict()` in transformers).

    Returns:
      The config; keys missing from the file take transformers' defaults, as they do there.
    """
    if isinstance(source, Mapping):
      raw = dict(source)
    else:
      path = pathlib.Path(source)
      if path.is_dir():
        path = path / "config.json"
      raw = json.loads(path.read_text())
    if raw.get("model_type", "clip") != "clip":
      raise ValueError(f"expected a CLIPModel config (model_type 'clip'), got "
                       f"model_type '{raw.get('model_type')}'")
    # Old hub configs keep (part of) the tower configs under `*_config_dict`, which wins there.
    vision = {**(raw.get("vision_config") or {}), **(raw.get("vision_config_dict") or {})}
    text = {**(raw.get("text_config") or {}), **(raw.get("text_config_dict") or {})}
    return cls(vision=_dataclass_from_dict(CLIPVisionConfig, vision),
               text=_dataclass_from_dict(CLIPTextConfig, text),
               projection_dim=int(raw.get("projection_dim") or 512),
               logit_scale_init_value=float(raw.get("logit_scale_init_value", 2.6592)))

  @classmethod
  def preset(cls, name: str) -> "CLIPConfig":
    """The sizes of a published OpenAI CLIP model: one of `PRESETS` ("ViT-B/32", ...)."""
    if name not in PRESETS:
      raise KeyError(f"unknown CLIP preset '{name}'; known: {sorted(PRESETS)}")
    return PRESETS[name]


def _square(value, name: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f"only square {name} is supported, got {value}")
    value = value[0]
  return int(value)


def _dataclass_from_dict(cls, raw: Mapping[str, Any]):
  kwargs = {f.name: raw[f.name] for f in dataclasses.fields(cls)
            if raw.get(f.name) is not None}
  for name in ("image_size", "patch_size"):
    if name in kwargs:
      kwargs[name] = _square(kwargs[name], name)
  eos = kwargs.get("eos_token_id")
  if isinstance(eos, (list, tuple)):
    if len(eos) != 1:
      raise ValueError(f"CLIP pools at one EOS token id, got eos_token_id={eos}")
    kwargs["eos_token_id"] = eos[0]
  return cls(**kwargs)


_B_TEXT = CLIPTextConfig()
PRESETS: dict[str, CLIPConfig] = {
    "ViT-B/32": CLIPConfig(vision=CLIPVisionConfig(patch_size=32), text=_B_TEXT),
    "ViT-B/16": CLIPConfig(vision=CLIPVisionConfig(patch_size=16), text=_B_TEXT),
    "ViT-L/14": CLIPConfig(
        vision=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, patch_size=14),
        text=CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
        projection_dim=768),
}
PRESETS["ViT-L/14-336"] = dataclasses.replace(
    PRESETS["ViT-L/14"], vision=dataclasses.replace(PRESETS["ViT-L/14"].vision, image_size=336))


# ----------------------------------------------------------------------------------------------
# Modules.


def _quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "quick_gelu": _quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str):
  """The elementwise function transformers calls `name` (ACT2FN)."""
  if name not in _ACTIVATIONS:
    raise ValueError(f"unsupported hidden_act '{name}'; supported: {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


class CLIPAttention(nn.Module):
  """Multi-head self-attention with separate q/k/v/out projections (HF `CLIPAttention`).

  Attributes:
    num_heads: number of heads; the head width is D // num_heads.
    dtype: computation dtype.
    attention_impl: `implementation` of `jax.nn.dot_product_attention`: None (XLA) or "cudnn".
  """

  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None,
               is_causal: bool = False) -> jax.Array:
    """Args: x (B, L, D); mask (B, 1, L, L) bool, True = may attend. Returns (B, L, D)."""
    batch, length, width = x.shape
    heads = functools.partial(nn.Dense, width, dtype=self.dtype)
    split = lambda y: y.reshape(batch, length, self.num_heads, width // self.num_heads)
    q = split(heads(name="q_proj")(x))
    k = split(heads(name="k_proj")(x))
    v = split(heads(name="v_proj")(x))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                       implementation=self.attention_impl)
    return heads(name="out_proj")(out.reshape(batch, length, width))


class CLIPMLP(nn.Module):
  """fc1 -> activation -> fc2 (HF `CLIPMLP`)."""

  intermediate_size: int
  hidden_act: str = "quick_gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
    h = activation(self.hidden_act)(h)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
  """A pre-LayerNorm transformer block (HF `CLIPEncoderLayer`).

  Its params sit under `layers_{i}` in both towers, so the "last_block" variant can apply one
  block on its own to cached `last_block_input` states (text: with `key_padding_mask` and
  `is_causal=True`).
  """

  num_heads: int
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None,
               is_causal: bool = False) -> jax.Array:
    """Args: x (B, L, D); mask (B, 1, L, L) bool or None. Returns (B, L, D)."""
    norm = functools.partial(nn.LayerNorm, epsilon=self.layer_norm_eps, dtype=self.dtype)
    h = norm(name="layer_norm1")(x)
    x = x + CLIPAttention(self.num_heads, self.dtype, self.attention_impl, name="self_attn")(
        h, mask, is_causal)
    h = norm(name="layer_norm2")(x)
    return x + CLIPMLP(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(h)


def encoder_layer(config: CLIPVisionConfig | CLIPTextConfig, dtype: Any = jnp.float32,
                  attention_impl: Optional[str] = None,
                  name: Optional[str] = None) -> CLIPEncoderLayer:
  """One block of the tower `config` describes; its params are that tower's `layers_{i}`."""
  return CLIPEncoderLayer(config.num_attention_heads, config.intermediate_size,
                          config.hidden_act, config.layer_norm_eps, dtype, attention_impl,
                          name=name)


def _encoder_layers(x, config, dtype, attention_impl, mask=None, is_causal=False):
  """Runs the `layers_{i}` stack; returns (final states, states entering the last block)."""
  last_block_input = x
  for i in range(config.num_hidden_layers):
    last_block_input = x
    x = encoder_layer(config, dtype, attention_impl, name=f"layers_{i}")(x, mask, is_causal)
  return x, last_block_input


class CLIPVisionTower(nn.Module):
  """The CLIP ViT (HF `CLIPVisionModel`), without `visual_projection`.

  Attributes:
    config: the tower's sizes.
    dtype: computation dtype (params stay float32).
    attention_impl: None (XLA) or "cudnn" for `jax.nn.dot_product_attention`.
  """

  config: CLIPVisionConfig
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, pixels: jax.Array) -> TowerOutput:
    """Encodes images.

    Args:
      pixels: (B, H, W, 3) float32, normalised with the checkpoint's mean/std; H = W =
        `config.image_size`.

    Returns:
      TowerOutput with pooled (B, D) = post_layernorm of the [CLS] state (what HF feeds to
      `visual_projection`), tokens (B, 1 + N, D) = encoder output before post_layernorm (HF
      `last_hidden_state`), last_block_input (B, 1 + N, D).
    """
    c = self.config
    if pixels.shape[1:3] != (c.image_size, c.image_size):
      raise ValueError(f"expected {c.image_size}x{c.image_size} images, got {pixels.shape}")
    batch = pixels.shape[0]
    x = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size,) * 2,
                padding="VALID", use_bias=False, dtype=self.dtype, name="patch_embedding")(
                    pixels.astype(self.dtype))
    x = x.reshape(batch, -1, c.hidden_size)  # row-major patches, the order of HF's flatten(2)
    cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,))
    cls = jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, c.hidden_size))
    x = jnp.concatenate([cls, x], axis=1)
    positions = nn.Embed(c.num_positions, c.hidden_size, dtype=self.dtype,
                         name="position_embedding")(jnp.arange(c.num_positions))
    x = x + positions[None]
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)
    tokens, last_block_input = _encoder_layers(x, c, self.dtype, self.attention_impl)
    pooled = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(
        tokens[:, 0])
    return TowerOutput(pooled=pooled, tokens=tokens, last_block_input=last_block_input)


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """Where HF `CLIPTextModel` pools: (B, L) int32 ids -> (B,) int32 positions.

  With the legacy `eos_token_id == 2` it is the first position of the largest id; otherwise the
  first position holding `eos_token_id` (pads may equal EOS, hence "first"), 0 if there is none.
  """
  if eos_token_id == _LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(input_ids, axis=-1).astype(jnp.int32)
  return jnp.argmax(input_ids == eos_token_id, axis=-1).astype(jnp.int32)


def key_padding_mask(attention_mask: jax.Array) -> jax.Array:
  """(B, L) int 0/1 -> (B, 1, L, L) bool: query t may attend key s where s is a real token.

  The text tower combines it with `is_causal=True`; use the same pair to run a text
  `CLIPEncoderLayer` on its own.
  """
  batch, length = attention_mask.shape
  # Full (T, S) extent because the cuDNN kernel rejects a mask that only broadcasts over T.
  return jnp.broadcast_to(attention_mask.astype(bool)[:, None, None, :],
                          (batch, 1, length, length))


class CLIPTextTower(nn.Module):
  """The CLIP text transformer (HF `CLIPTextModel`), without `text_projection`.

  Attributes:
    config: the tower's sizes and special tokens.
    dtype: computation dtype (params stay float32).
    attention_impl: None (XLA) or "cudnn" for `jax.nn.dot_product_attention`.
  """

  config: CLIPTextConfig
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, input_ids: jax.Array,
               attention_mask: Optional[jax.Array] = None) -> TowerOutput:
    """Encodes token sequences.

    Attention is causal and, as in HF, also skips keys where `attention_mask` is 0. A query row
    with no visible key (a sequence that starts with padding) gets a uniform average, which need
    not match HF; CLIP's tokenizer pads on the right, where this never happens.

    Args:
      input_ids: (B, L) int32, L <= `config.max_position_embeddings`.
      attention_mask: (B, L) int32, 1 for real tokens; None means all ones.

    Returns:
      TowerOutput with pooled (B, D) = final_layer_norm state at the EOS position (see
      `eos_positions`), tokens (B, L, D) = final_layer_norm states (HF `last_hidden_state`),
      last_block_input (B, L, D).
    """
    c = self.config
    batch, length = input_ids.shape
    if length > c.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                       f"{c.max_position_embeddings}")
    x = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="token_embedding")(input_ids)
    x = x + nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype,
                     name="position_embedding")(jnp.arange(length))[None]
    mask = None if attention_mask is None else key_padding_mask(attention_mask)
    x, last_block_input = _encoder_layers(x, c, self.dtype, self.attention_impl, mask,
                                          is_causal=True)
    tokens = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)
    pooled = tokens[jnp.arange(batch), eos_positions(input_ids, c.eos_token_id)]
    return TowerOutput(pooled=pooled, tokens=tokens, last_block_input=last_block_input)


# ----------------------------------------------------------------------------------------------
# Conversion from the PyTorch state dict.


class CLIPWeights(NamedTuple):
  """What `convert_clip` returns (unpacks as a 4-tuple).

  Attributes:
    vision: params of `CLIPVisionTower` (the tree under "params"), numpy float32.
    text: params of `CLIPTextTower`, numpy float32.
    projections: {"image": {"kernel": (Dv, P), "bias": (P,)}, "text": {"kernel": (Dt, P),
      "bias": (P,)}}; CLIP's projections have no bias, so the biases are zeros.
    logit_scale: the checkpoint's learned log inverse temperature (scores = exp(s) * cos).
  """

  vision: dict
  text: dict
  projections: dict
  logit_scale: float


def _convert_layer(reader: convert.StateDictReader, prefix: str) -> dict:
  return {
      "layer_norm1": reader.layer_norm(f"{prefix}.layer_norm1"),
      "self_attn": {name: reader.dense(f"{prefix}.self_attn.{name}")
                    for name in ("q_proj", "k_proj", "v_proj", "out_proj")},
      "layer_norm2": reader.layer_norm(f"{prefix}.layer_norm2"),
      "mlp": {"fc1": reader.dense(f"{prefix}.mlp.fc1"), "fc2": reader.dense(f"{prefix}.mlp.fc2")},
  }


def _convert_vision(reader: convert.StateDictReader, config: CLIPVisionConfig) -> dict:
  p = "vision_model"
  params = {
      "patch_embedding": reader.conv(f"{p}.embeddings.patch_embedding", bias=False),
      "class_embedding": reader.get(f"{p}.embeddings.class_embedding"),
      "position_embedding": reader.embedding(f"{p}.embeddings.position_embedding"),
      "pre_layrnorm": reader.layer_norm(f"{p}.pre_layrnorm"),
      "post_layernorm": reader.layer_norm(f"{p}.post_layernorm"),
  }
  for i in range(config.num_hidden_layers):
    params[f"layers_{i}"] = _convert_layer(reader, f"{p}.encoder.layers.{i}")
  return params


def _convert_text(reader: convert.StateDictReader, config: CLIPTextConfig) -> dict:
  p = "text_model"
  params = {
      "token_embedding": reader.embedding(f"{p}.embeddings.token_embedding"),
      "position_embedding": reader.embedding(f"{p}.embeddings.position_embedding"),
      "final_layer_norm": reader.layer_norm(f"{p}.final_layer_norm"),
  }
  for i in range(config.num_hidden_layers):
    params[f"layers_{i}"] = _convert_layer(reader, f"{p}.encoder.layers.{i}")
  return params


def _projection(reader: convert.StateDictReader, name: str) -> dict:
  kernel = reader.get(f"{name}.weight").T
  return {"kernel": kernel, "bias": np.zeros(kernel.shape[1], np.float32)}


def vision_init_shapes(config: CLIPVisionConfig) -> Any:
  """The params tree of `CLIPVisionTower(config)` as shape structs, allocating nothing."""
  pixels = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.num_channels),
                                jnp.float32)
  return jax.eval_shape(CLIPVisionTower(config).init, jax.random.key(0), pixels)["params"]


def text_init_shapes(config: CLIPTextConfig) -> Any:
  """The params tree of `CLIPTextTower(config)` as shape structs, allocating nothing."""
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(CLIPTextTower(config).init, jax.random.key(0), ids, ids)["params"]


def convert_clip(state_dict: Mapping[str, Any] | convert.StateDictReader,
                 config: CLIPConfig) -> CLIPWeights:
  """Converts a `transformers.CLIPModel` state dict into our towers' params.

  Args:
    state_dict: {name: array} as saved by `CLIPModel.save_pretrained` (or a `StateDictReader`
      over it; then its own `ignore` list applies). `position_ids` buffers are ignored.
    config: the model's config (`CLIPConfig.from_hf`).

  Returns:
    CLIPWeights(vision, text, projections, logit_scale).

  Raises:
    ConversionError: a tensor is missing, left over, or has the wrong shape.
  """
  reader = (state_dict if isinstance(state_dict, convert.StateDictReader)
            else convert.StateDictReader(state_dict, source="CLIPModel state dict",
                                         ignore=(r"(^|\.)position_ids$",)))
  vision = _convert_vision(reader, config.vision)
  text = _convert_text(reader, config.text)
  projections = {"image": _projection(reader, "visual_projection"),
                 "text": _projection(reader, "text_projection")}
  logit_scale = float(reader.get("logit_scale").reshape(()))
  reader.assert_all_used()
  convert.assert_same_structure(vision, vision_init_shapes(config.vision),
                                source=f"{reader.source} (vision)")
  convert.assert_same_structure(text, text_init_shapes(config.text),
                                source=f"{reader.source} (text)")
  for name, width in (("image", config.vision.hidden_size), ("text", config.text.hidden_size)):
    shape = projections[name]["kernel"].shape
    if shape != (width, config.projection_dim):
      raise convert.ConversionError(
          f"{reader.source}: {name} projection has shape {shape}, expected "
          f"{(width, config.projection_dim)}")
  return CLIPWeights(vision, text, projections, logit_scale)


# ----------------------------------------------------------------------------------------------
# Loading a checkpoint directory.


@dataclasses.dataclass
class LoadedCLIP:
  """Everything `load_clip` reads from a checkpoint.

  Attributes:
    config: the model config.
    vision_tower, text_tower: the Flax modules.
    vision_params, text_params: their params (the trees under "params"), numpy float32.
    projections: {"image": {"kernel", "bias"}, "text": {"kernel", "bias"}}, see `CLIPWeights`.
    logit_scale: learned log inverse temperature.
    image_size: the side in pixels the vision tower takes.
    mean, std: per-channel (R, G, B) normalisation of [0, 1] pixels.
    tokenizer: a transformers CLIP tokenizer, or None when the checkpoint has no tokenizer files.
    word_embeddings: (V, d_w) float32 token embedding matrix of the text tower.
    weight_file: the weights file read (for hashing into caches and checkpoints).
  """

  config: CLIPConfig
  vision_tower: CLIPVisionTower
  text_tower: CLIPTextTower
  vision_params: dict
  text_params: dict
  projections: dict
  logit_scale: float
  image_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  tokenizer: Any
  word_embeddings: np.ndarray
  weight_file: pathlib.Path


def read_normalization(directory: str | os.PathLike) -> tuple[tuple, tuple]:
  """(mean, std) from `preprocessor_config.json`, else CLIP's defaults."""
  path = pathlib.Path(directory) / "preprocessor_config.json"
  mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
  if path.exists():
    raw = json.loads(path.read_text())
    mean = tuple(float(m) for m in raw.get("image_mean") or mean)
    std = tuple(float(s) for s in raw.get("image_std") or std)
  return mean, std


def load_tokenizer(directory: str | os.PathLike):
  """The checkpoint's tokenizer via transformers, or None if it ships no tokenizer files."""
  directory = pathlib.Path(directory)
  if not any((directory / name).exists() for name in _TOKENIZER_FILES):
    return None
  import transformers  # pylint: disable=g-import-not-at-top  # slow; only when needed
  return transformers.AutoTokenizer.from_pretrained(str(directory))


def load_clip(checkpoint: str | os.PathLike, dtype: Any = jnp.float32,
              attention_impl: Optional[str] = None) -> LoadedCLIP:
  """Loads a `CLIPModel.save_pretrained` directory (or a hub id, where online).

  Args:
    checkpoint: a directory holding `config.json` and `model.safetensors` or
      `pytorch_model.bin` (plus, optionally, tokenizer and `preprocessor_config.json` files).
    dtype: computation dtype of the towers.
    attention_impl: None (XLA) or "cudnn".

  Returns:
    A LoadedCLIP.
  """
  directory = weights.resolve_checkpoint(str(checkpoint))
  config = CLIPConfig.from_hf(directory / "config.json")
  weight_file = weights.find_weight_file(directory)
  state_dict = weights.load_state_dict(weight_file)
  reader = convert.StateDictReader(state_dict, source=str(weight_file),
                                   ignore=(r"(^|\.)position_ids$",))
  converted = convert_clip(reader, config)
  mean, std = read_normalization(directory)
  return LoadedCLIP(
      config=config,
      vision_tower=CLIPVisionTower(config.vision, dtype=dtype, attention_impl=attention_impl),
      text_tower=CLIPTextTower(config.text, dtype=dtype, attention_impl=attention_impl),
      vision_params=converted.vision,
      text_params=converted.text,
      projections=converted.projections,
      logit_scale=converted.logit_scale,
      image_size=config.vision.image_size,
      mean=mean,
      std=std,
      tokenizer=load_tokenizer(directory),
      word_embeddings=converted.text["token_embedding"]["embedding"],
      weight_file=weight_file,
  )
