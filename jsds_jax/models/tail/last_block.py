"""The "last_block" variant: a trainable copy of a tower's last transformer block.

DESIGN.md §3: instead of the cached pooled state h, the feature cache holds the token states
entering the tower's last block (`TowerOutput.last_block_input`), and training runs that block
(initialised from the frozen tower) plus whatever the tower does after it, then pools as the
tower pools. `block_for(tower)` gives the module that does exactly that for one tower, with its
params named as in the tower, so `block_params(tower, params)` is a plain subset of the tower's
params and the frozen tower's pooled output is reproduced bit for bit before training moves it
(tests/test_last_block.py):

  VisionTransformer (BLIP, ALBEF)  blocks_{N-1} -> norm -> [CLS]
  BertEncoder (BLIP, ALBEF, MiniLM) layer_{N-1} (padding masked) -> [CLS] or masked mean
  CLIPVisionTower                  layers_{N-1} -> post_layernorm([CLS])
  CLIPTextTower                    layers_{N-1} (causal, padding masked) -> final_layer_norm
                                   -> the EOS position (found from the token ids)

A tower without transformer blocks (EfficientNet-Lite, `lit`'s image side) has no such variant:
`block_for` raises.

Every block maps (tokens (B, L, D), token_ids (B, L) int32 with -1 at padding) to (B, D);
image blocks ignore the ids (pass None).
"""

from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jsds_jax.models.trunk import bert
from jsds_jax.models.trunk import clip
from jsds_jax.models.trunk import vit


class ViTLastBlock(nn.Module):
  """The last block, final LayerNorm and [CLS] of a `vit.VisionTransformer`."""

  config: vit.ViTConfig
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, tokens: jax.Array, token_ids: Optional[jax.Array] = None) -> jax.Array:
    """(B, 1 + P, D) states entering the last block -> (B, D) pooled."""
    del token_ids
    cfg = self.config
    x = vit.ViTBlock(cfg, dtype=self.dtype, attention_impl=self.attention_impl,
                     name=f"blocks_{cfg.num_layers - 1}")(
        tokens.astype(self.dtype))
    x = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32,
                     name="norm")(x)
    return x[:, 0]


class BertLastBlock(nn.Module):
  """The last layer used and the pooling of a `bert.BertEncoder`."""

  config: bert.BertConfig
  depth: int
  pooling: str = "cls"
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, tokens: jax.Array, token_ids: jax.Array) -> jax.Array:
    """(B, L, D) states entering the last layer, (B, L) ids (-1 = padding) -> (B, D)."""
    attention_mask = (token_ids >= 0).astype(jnp.int32)
    mask = (attention_mask > 0)[:, None, None, :]
    x = bert.BertLayer(self.config, dtype=self.dtype, attention_impl=self.attention_impl,
                       name=f"layer_{self.depth - 1}")(
        tokens.astype(self.dtype), mask)
    return x[:, 0] if self.pooling == "cls" else bert.mean_pool(x, attention_mask)


class CLIPVisionLastBlock(nn.Module):
  """The last layer and post_layernorm([CLS]) of a `clip.CLIPVisionTower`."""

  config: clip.CLIPVisionConfig
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, tokens: jax.Array, token_ids: Optional[jax.Array] = None) -> jax.Array:
    del token_ids
    c = self.config
    x = clip.encoder_layer(c, self.dtype, self.attention_impl,
                           name=f"layers_{c.num_hidden_layers - 1}")(tokens.astype(self.dtype))
    return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(
        x[:, 0])


class CLIPTextLastBlock(nn.Module):
  """The last layer, final_layer_norm and EOS pooling of a `clip.CLIPTextTower`."""

  config: clip.CLIPTextConfig
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None

  @nn.compact
  def __call__(self, tokens: jax.Array, token_ids: jax.Array) -> jax.Array:
    c = self.config
    mask = clip.key_padding_mask((token_ids >= 0).astype(jnp.int32))
    x = clip.encoder_layer(c, self.dtype, self.attention_impl,
                           name=f"layers_{c.num_hidden_layers - 1}")(
                               tokens.astype(self.dtype), mask, True)
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)
    # Padding (-1) never wins the EOS search: the legacy rule takes the largest id, the other
    # the first position equal to the EOS id.
    return x[jnp.arange(x.shape[0]), clip.eos_positions(token_ids, c.eos_token_id)]


def block_for(tower: nn.Module, dtype: Any = jnp.float32) -> nn.Module:
  """The trainable last block (+ pooling) of a frozen tower, with the tower's attention
  implementation ("cudnn" on NVIDIA GPUs where the tower uses it).

  Raises:
    ValueError: the tower has no transformer blocks (e.g. EfficientNet-Lite).
  """
  impl = getattr(tower, "attention_impl", None)
  if isinstance(tower, vit.VisionTransformer):
    return ViTLastBlock(tower.config, dtype, impl)
  if isinstance(tower, bert.BertEncoder):
    return BertLastBlock(tower.config, tower.depth, tower.pooling, dtype, impl)
  if isinstance(tower, clip.CLIPVisionTower):
    return CLIPVisionLastBlock(tower.config, dtype, impl)
  if isinstance(tower, clip.CLIPTextTower):
    return CLIPTextLastBlock(tower.config, dtype, impl)
  raise ValueError(f"the {type(tower).__name__} tower has no transformer blocks: the "
                   "last_block variant needs a transformer tower on that side")


def block_params(block: nn.Module, tower_params: Mapping[str, Any]) -> dict:
  """The frozen tower's params for `block` (the entries of the same names), as float32 arrays.

  Args:
    block: `block_for(tower)`.
    tower_params: the tower's "params" collection.
  """
  names = _param_names(block)
  missing = sorted(set(names) - set(tower_params))
  if missing:
    raise ValueError(f"the tower's params have no {missing} for {type(block).__name__}")
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                      {k: tower_params[k] for k in names})


def _param_names(block: nn.Module) -> list[str]:
  if isinstance(block, ViTLastBlock):
    return [f"blocks_{block.config.num_layers - 1}", "norm"]
  if isinstance(block, BertLastBlock):
    return [f"layer_{block.depth - 1}"]
  if isinstance(block, CLIPVisionLastBlock):
    return [f"layers_{block.config.num_hidden_layers - 1}", "post_layernorm"]
  if isinstance(block, CLIPTextLastBlock):
    return [f"layers_{block.config.num_hidden_layers - 1}", "final_layer_norm"]
  raise ValueError(f"not a last-block module: {type(block).__name__}")


SIDES = {"": (), "image": ("image",), "text": ("text",), "both": ("image", "text")}


def sides(setting: str) -> tuple[str, ...]:
  """`model.last_block` ("", "image", "text", "both") as the sides that get a block."""
  if setting not in SIDES:
    raise ValueError(f"model.last_block must be one of {sorted(SIDES)}, got {setting!r}")
  return SIDES[setting]


def blocks_for_backbone(backbone: Any, setting: str,
                        dtype: Any = jnp.float32) -> dict[str, tuple[nn.Module, dict]]:
  """{side: (block module, its starting params from the frozen tower)} for `model.last_block`.

  Args:
    backbone: a loaded `backbones.Backbone`.
    setting: "", "image", "text" or "both".
    dtype: the blocks' computation dtype.

  Raises:
    ValueError: a requested side's tower has no transformer blocks.
  """
  out = {}
  for side in sides(setting):
    tower = backbone.image_tower if side == "image" else backbone.text_tower
    variables = backbone.image_variables if side == "image" else backbone.text_variables
    try:
      block = block_for(tower, dtype)
    except ValueError as e:
      raise ValueError(f"model.last_block={setting!r}: the {backbone.name} backbone's {side} "
                       f"side cannot: {e}") from e
    out[side] = (block, block_params(block, variables["params"]))
  return out
