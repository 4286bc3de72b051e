"""Pre-LN Vision Transformer image tower (BLIP's and ALBEF's ViT) and its converters.

Conv patch embedding, a [CLS] token, learned position embeddings, N pre-LN blocks
(x += Attn(LN(x)); x += MLP(LN(x))) with a fused qkv projection, and a final LayerNorm. The
pooled output is the final-LN [CLS] state, what BLIP and ALBEF feed to `vision_proj`.

Two checkpoint layouts convert into the same params:

  * "hf_blip": Hugging Face `BlipVisionModel` (`vision_model.embeddings.*`,
    `encoder.layers.N.self_attn.qkv`, `post_layernorm`);
  * "timm": timm / ALBEF `VisionTransformer` (`cls_token`, `pos_embed`, `blocks.N.attn.qkv`,
    `norm`).

Both fuse q, k and v in one Linear laid out (3, heads, head_dim) along its outputs, so the fused
kernel is kept as is. Position embeddings are not interpolated: a checkpoint made for another
resolution, or pixels of another size, is an error.
"""

from collections.abc import Mapping
import dataclasses
import math
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jsds_jax.models.trunk import convert
from jsds_jax.models.trunk import tower_output

_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # Exact erf GELU, as torch's nn.GELU().
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
}


def _get(cfg: Any, name: str, default: Any = None) -> Any:
  if isinstance(cfg, Mapping):
    return cfg.get(name, default)
  return getattr(cfg, name, default)


def _square(value: Any, name: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f"only square {name} is supported, got {value}")
    value = value[0]
  return int(value)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Shape of a pre-LN ViT. Defaults: ViT-B/16 at 384 px (BLIP / ALBEF retrieval)."""

  image_size: int = 384
  patch_size: int = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu"

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                       f"{self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads "
                       f"{self.num_heads}")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act '{self.hidden_act}'; one of {sorted(_ACTIVATIONS)}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def from_hf(cls, hf_config: Any) -> "ViTConfig":
    """From a Hugging Face `BlipVisionConfig` (or similar) object or its dict."""
    return cls(
        image_size=_square(_get(hf_config, "image_size"), "image_size"),
        patch_size=_square(_get(hf_config, "patch_size"), "patch_size"),
        hidden_size=int(_get(hf_config, "hidden_size")),
        num_layers=int(_get(hf_config, "num_hidden_layers")),
        num_heads=int(_get(hf_config, "num_attention_heads")),
        intermediate_size=int(_get(hf_config, "intermediate_size")),
        layer_norm_eps=float(_get(hf_config, "layer_norm_eps", 1e-6)),
        hidden_act=_get(hf_config, "hidden_act", "gelu"))


class ViTAttention(nn.Module):
  """Multi-head self-attention with a fused qkv projection."""

  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, L, D) -> (B, L, D)."""
    b, l, d = x.shape
    qkv = nn.Dense(3 * d, dtype=self.dtype, param_dtype=jnp.float32, name="qkv")(x)
    qkv = qkv.reshape(b, l, 3, self.num_heads, d // self.num_heads)
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                       implementation=self.attention_impl)
    return nn.Dense(d, dtype=self.dtype, param_dtype=jnp.float32, name="proj")(
        out.reshape(b, l, d))


class ViTBlock(nn.Module):
  """One pre-LN block: x += Attn(LN(x)); x += MLP(LN(x))."""

  config: ViTConfig
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, L, D) -> (B, L, D)."""
    cfg = self.config
    norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype,
                                     param_dtype=jnp.float32, name=name)
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    x = x + ViTAttention(cfg.num_heads, dtype=self.dtype, attention_impl=self.attention_impl,
                         name="attn")(norm("norm1")(x))
    h = _ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, "fc1")(norm("norm2")(x)))
    return x + dense(cfg.hidden_size, "fc2")(h)


class VisionTransformer(nn.Module):
  """A pre-LN ViT image tower.

  Attributes:
    config: `ViTConfig`.
    dtype: computation dtype; params stay float32.
    attention_impl: `jax.nn.dot_product_attention` implementation: None (XLA) or "cudnn"
      (cuDNN flash attention on NVIDIA GPUs).
  """

  config: ViTConfig
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, pixels: jax.Array) -> tower_output.TowerOutput:
    """Encodes normalised images.

    Args:
      pixels: (B, H, W, 3) float32, normalised, H = W = config.image_size.

    Returns:
      TowerOutput with pooled (B, D) (the final-LN [CLS] state), tokens (B, 1 + P, D) (final-LN
      states) and last_block_input (B, 1 + P, D) (the residual stream entering the last block).
    """
    cfg = self.config
    if pixels.shape[1:] != (cfg.image_size, cfg.image_size, 3):
      raise ValueError(f"expected pixels (B, {cfg.image_size}, {cfg.image_size}, 3), got "
                       f"{pixels.shape}; position embeddings are not interpolated")
    p = cfg.patch_size
    x = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, name="patch_embed")(pixels.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, cfg.hidden_size)  # Row-major over the patch grid, as torch flatten(2).
    init = nn.initializers.truncated_normal(0.02)
    cls = self.param("cls_token", init, (1, 1, cfg.hidden_size), jnp.float32)
    pos = self.param("pos_embed", init, (1, cfg.num_patches + 1, cfg.hidden_size), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, cfg.hidden_size)), x],
                        axis=1)
    x = x + pos.astype(self.dtype)
    last_block_input = x
    for i in range(cfg.num_layers):
      last_block_input = x
      x = ViTBlock(cfg, dtype=self.dtype, attention_impl=self.attention_impl,
                   name=f"blocks_{i}")(x)
    x = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32,
                     name="norm")(x)
    return tower_output.TowerOutput(pooled=x[:, 0], tokens=x, last_block_input=last_block_input)


# Torch names, relative to the tower's prefix, of each part in the two layouts.
_LAYOUTS = {
    "hf_blip": {
        "cls": "embeddings.class_embedding", "pos": "embeddings.position_embedding",
        "patch": "embeddings.patch_embedding", "block": "encoder.layers.{i}.",
        "norm1": "layer_norm1", "qkv": "self_attn.qkv", "proj": "self_attn.projection",
        "norm2": "layer_norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2", "norm": "post_layernorm",
        "block_re": r"encoder\.layers\.(\d+)\.",
    },
    "timm": {
        "cls": "cls_token", "pos": "pos_embed", "patch": "patch_embed.proj",
        "block": "blocks.{i}.", "norm1": "norm1", "qkv": "attn.qkv", "proj": "attn.proj",
        "norm2": "norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2", "norm": "norm",
        "block_re": r"blocks\.(\d+)\.",
    },
}


def infer_vit_config(state_dict: Mapping[str, Any], layout: str, prefix: str = "",
                     num_heads: int = 12, layer_norm_eps: float = 1e-6,
                     hidden_act: str = "gelu") -> ViTConfig:
  """A `ViTConfig` read off tensor shapes (for checkpoints without a config, like ALBEF's).

  The head count and LayerNorm epsilon are not visible in the weights and must be given.
  """
  names = _LAYOUTS[layout]
  patch = np.shape(state_dict[f"{prefix}{names['patch']}.weight"])  # (D, 3, p, p)
  n_pos = np.shape(state_dict[f"{prefix}{names['pos']}"])[-2]
  grid = math.isqrt(n_pos - 1)
  if grid * grid != n_pos - 1:
    raise convert.ConversionError(f"position embeddings for {n_pos - 1} patches: not a square grid")
  block_re = re.compile("^" + re.escape(prefix) + names["block_re"])
  depth = 1 + max(int(m.group(1)) for k in state_dict if (m := block_re.match(k)))
  fc1 = np.shape(state_dict[f"{prefix}{names['block'].format(i=0)}{names['fc1']}.weight"])
  return ViTConfig(image_size=grid * patch[-1], patch_size=patch[-1], hidden_size=patch[0],
                   num_layers=depth, num_heads=num_heads, intermediate_size=fc1[0],
                   layer_norm_eps=layer_norm_eps, hidden_act=hidden_act)


def convert_vit(state_dict_or_reader: Mapping[str, Any] | convert.StateDictReader,
                config: ViTConfig, layout: str, prefix: str = "",
                source: str = "ViT state dict") -> dict:
  """A torch ViT state dict -> `VisionTransformer` params.

  Args:
    state_dict_or_reader: a flat state dict (only names under `prefix` are considered, and all
      of them must be used) or a `StateDictReader` shared with other converters (the caller
      then checks that everything was used).
    config: the tower's `ViTConfig`; its image size must match the position embeddings.
    layout: "hf_blip" or "timm" (see the module docstring).
    prefix: e.g. "vision_model." (BLIP) or "visual_encoder." (ALBEF).
    source: name for error messages.

  Returns:
    The params tree of `VisionTransformer(config)`.
  """
  if layout not in _LAYOUTS:
    raise ValueError(f"unknown ViT layout '{layout}'; one of {sorted(_LAYOUTS)}")
  names = _LAYOUTS[layout]
  if isinstance(state_dict_or_reader, convert.StateDictReader):
    reader, own = state_dict_or_reader, False
  else:
    sub = {k: v for k, v in state_dict_or_reader.items() if k.startswith(prefix)}
    reader, own = convert.StateDictReader(sub, source=source), True

  pos = reader.get(f"{prefix}{names['pos']}").reshape(1, -1, config.hidden_size)
  if pos.shape[1] != config.num_patches + 1:
    raise convert.ConversionError(
        f"{source}: position embeddings cover {pos.shape[1] - 1} patches but image_size "
        f"{config.image_size} / patch {config.patch_size} needs {config.num_patches}; "
        "interpolating position embeddings is not supported")
  params = {
      "patch_embed": reader.conv(f"{prefix}{names['patch']}"),
      "cls_token": reader.get(f"{prefix}{names['cls']}").reshape(1, 1, config.hidden_size),
      "pos_embed": pos,
      "norm": reader.layer_norm(f"{prefix}{names['norm']}"),
  }
  for i in range(config.num_layers):
    blk = prefix + names["block"].format(i=i)
    params[f"blocks_{i}"] = {
        "norm1": reader.layer_norm(blk + names["norm1"]),
        "attn": {"qkv": reader.dense(blk + names["qkv"]),
                 "proj": reader.dense(blk + names["proj"])},
        "norm2": reader.layer_norm(blk + names["norm2"]),
        "fc1": reader.dense(blk + names["fc1"]),
        "fc2": reader.dense(blk + names["fc2"]),
    }
  if own:
    reader.assert_all_used()
  pixels = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  ref = jax.eval_shape(VisionTransformer(config).init, jax.random.key(0), pixels)["params"]
  convert.assert_same_structure(params, ref, source)
  return params
