"""The trained dense tail of one modality: e = normalize(W h + b).

The frozen trunk gives h, the pre-projection [CLS] state (DESIGN.md §3); the dense tail is the
backbone's own projection (`vision_proj` / `text_proj` for BLIP and ALBEF), made trainable and
followed by L2 normalisation. Its params start from that projection when the backbone has one
(`init_dense_tail(..., projection=...)`) and from a fresh initialisation otherwise (`lit`).

In the "last_block" variant (DESIGN.md §3, `model.last_block`) h is not read from the cache
but computed by a trainable copy of the tower's last transformer block from the cached token
states entering it (`jsds_jax/models/tail/last_block.py`, held by `JSDSTail`); this module is the
same either way.
"""

from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jsds_jax.models.trunk import convert

# F.normalize's eps: a zero vector maps to zero instead of NaN.
NORM_EPS = 1e-12


def l2_normalize(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """x / max(‖x‖₂, eps) along the last axis, computed in at least float32.

  Args:
    x: (..., D).
    eps: floor on the norm, so zero rows stay zero and their gradient stays finite.

  Returns:
    (..., D) in x's dtype.
  """
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  sq = jnp.sum(xf * xf, axis=-1, keepdims=True)
  return (xf * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))).astype(x.dtype)


class DenseTail(nn.Module):
  """e = normalize(W h + b): one modality's trainable projection onto the unit sphere.

  Attributes:
    out_dim: P, the dense embedding width (256 for BLIP/ALBEF).
    use_bias: whether the projection has a bias (the backbones' projections do).
    dtype: computation dtype; params stay float32.
  """

  out_dim: int
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    """Args: h (B, D_in) pre-projection features. Returns: e (B, out_dim), unit L2 norm."""
    x = nn.Dense(self.out_dim, use_bias=self.use_bias, dtype=self.dtype,
                 param_dtype=jnp.float32, name="proj")(h)
    return l2_normalize(x)


def projection_params(projection: Mapping[str, Any]) -> dict:
  """A backbone projection {"kernel": (D_in, P), "bias": (P,)} as `DenseTail` params.

  Returns:
    {"proj": {"kernel": (D_in, P) float32, "bias": (P,) float32}}; "bias" only where given.
  """
  unknown = sorted(set(projection) - {"kernel", "bias"})
  if unknown:
    raise convert.ConversionError(f"projection has unexpected entries {unknown}")
  return {"proj": {k: np.asarray(v, np.float32) for k, v in projection.items()}}


def init_dense_tail(rng: jax.Array, module: DenseTail, in_dim: int,
                    projection: Optional[Mapping[str, Any]] = None) -> dict:
  """Params of `module`: the backbone's projection when given, a fresh init otherwise.

  Args:
    rng: PRNG key for the fresh initialisation.
    module: the `DenseTail`.
    in_dim: D_in, the width of h.
    projection: {"kernel": (D_in, P), "bias": (P,)} from a converter, or None (`lit`).

  Returns:
    The params tree ({"proj": {"kernel", "bias"}}), float32.

  Raises:
    ConversionError: the projection's shapes do not fit (D_in, out_dim), or it has a bias
      where the module has none (or the reverse).
  """
  h = jnp.zeros((1, in_dim), jnp.float32)
  if projection is None:
    return jax.jit(module.init)(rng, h)["params"]
  # Shapes only: nothing random is computed (or compiled) for params about to be replaced.
  reference = jax.eval_shape(module.init, rng, h)["params"]
  loaded = projection_params(projection)
  convert.assert_same_structure(loaded, reference, "dense tail projection")
  return jax.tree_util.tree_map(jnp.asarray, loaded)
