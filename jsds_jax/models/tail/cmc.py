"""CMC: a query and K retrieved candidates compared together in one small self-attention stack.

"Comparing Neighbors Together Makes it Easy" (Song et al., EMNLP 2024; DESIGN.md §4). The query
embedding q and the candidates' embeddings c_1..c_K form one sequence [q; c_1..c_K] with no
positional or type embeddings, so the module is order-free: permuting the candidates permutes
their scores. L post-LN transformer encoder layers (self-attention with full attention, then a
ReLU FFN; LayerNorm after each residual, as PyTorch's `nn.TransformerEncoderLayer` with its
default `norm_first=False`) each sit inside a gated residual

    x ← σ(g)·layer(x) + (1 − σ(g))·x,    g a scalar per layer, −5 at init,

so a fresh module returns almost its inputs and scores almost like the first stage's ⟨q, c_k⟩.
score_k = ⟨q′, c_k′⟩ of the contextualised query and candidate, unscaled.

Fidelity to yc-song/cmc (branch `submission`, `retriever.py`): `IdentityInitializedTransformer
EncoderLayer` wraps `torch.nn.TransformerEncoderLayer(d_model, n_head)` (FFN 2048, ReLU, dropout
0.1, LayerNorm eps 1e-5) in that gate with `nn.Parameter([-5.])`, or a fixed 0 (a 0.5/0.5 mix)
with `fixed_initial_weight` (`gate="fixed"` here); `torch.nn.TransformerEncoder` stacks copies of
it; `extend_multi(..., dot=True)` scores by `bmm(out[:, 0], out[:, 1:]ᵀ)`. Our parameter names
map one to one onto that layer's (`params_from_torch` converts), which the parity test uses.
"""

from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

GATE_INIT = -5.0
LN_EPS = 1e-5  # torch.nn.TransformerEncoderLayer's layer_norm_eps
GATES = ("learned", "fixed")


class CMCError(ValueError):
  """CMC inputs or params that do not fit together (names what does not match)."""


class SelfAttention(nn.Module):
  """Multi-head self-attention with one fused q/k/v projection (torch's `in_proj`).

  Computed head-major, (B, H, L, dh), so that both attention matmuls are plain batched GEMMs
  over the heads without transposes of the (L, L) logits; 1/√dh is applied to q (L·D
  multiplies, not H·L²); the softmax is left unnormalised until after weights·V (the output is
  divided by each row's sum: H·L·dh divides instead of H·L² — the same numbers up to float32
  rounding). On one CPU thread the forward is 1.5–2× faster than with the textbook (B, L, H, dh)
  layout (bench/README, "CMC reranker").

  Attributes:
    num_heads: H; the width D must be a multiple of it.
    dropout: on the attention weights (training only).
    dtype: computation dtype.
    attention_block: 0, or score this many queries of the sequence at a time against all keys
      (same result, O(block·L) memory instead of O(L²): for thousands of candidates; on a CPU
      a block of ~128 also keeps the (H, block, L) logits within the last-level cache).
  """

  num_heads: int
  dropout: float = 0.1
  dtype: Any = jnp.float32
  attention_block: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, deterministic: bool) -> jax.Array:
    """Args: x (B, L, D); key_mask (B, L) bool, False = padding (never attended to).
    Returns: (B, L, D)."""
    b, l, d = x.shape
    if d % self.num_heads:
      raise CMCError(f"CMC width {d} is not a multiple of num_heads={self.num_heads}")
    h, dh = self.num_heads, d // self.num_heads
    qkv = nn.Dense(3 * d, dtype=self.dtype, name="in_proj")(x).reshape(b, l, 3, h, dh)
    qkv = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # (3, B, H, L, dh)
    q = qkv[0] * jnp.asarray(1 / np.sqrt(dh), self.dtype)
    k, v = qkv[1], qkv[2]
    keep_key = key_mask[:, None, None, :]

    def attend(qb, rng):
      """qb (B, H, Lq, dh) -> (B, H, Lq, dh): these queries against every key."""
      logits = jnp.einsum("bhqd,bhkd->bhqk", qb, k).astype(jnp.float32)
      logits = jnp.where(keep_key, logits, -jnp.inf)
      # The query (position 0) is never masked, so every row has a finite max and a sum > 0.
      p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
      total = jnp.sum(p, axis=-1, keepdims=True)
      if not deterministic and self.dropout > 0:
        keep = jax.random.bernoulli(rng, 1 - self.dropout, p.shape)
        p = jnp.where(keep, p / (1 - self.dropout), 0)
      out = jnp.einsum("bhqk,bhkd->bhqd", p.astype(self.dtype), v)
      return (out / total).astype(self.dtype)

    rng = None if deterministic or self.dropout == 0 else self.make_rng("dropout")
    block = self.attention_block
    if not block or l <= block:
      out = attend(q, rng)
    else:
      # Query blocks one after another: the (H, L, L) logits never exist at once, only
      # (H, block, L); the same numbers, a memory of O(block·L) instead of O(L²).
      nb = -(-l // block)
      qp = jnp.pad(q, ((0, 0), (0, 0), (0, nb * block - l), (0, 0)))
      qp = jnp.moveaxis(qp.reshape(b, h, nb, block, dh), 2, 0)
      rngs = (jax.random.split(rng, nb) if rng is not None else jnp.zeros((nb,), jnp.uint32))
      out = jax.lax.map(lambda a: attend(a[0], None if rng is None else a[1]), (qp, rngs))
      out = jnp.moveaxis(out, 0, 2).reshape(b, h, nb * block, dh)[:, :, :l]
    out = jnp.transpose(out, (0, 2, 1, 3)).reshape(b, l, d)
    return nn.Dense(d, dtype=self.dtype, name="out_proj")(out)


class EncoderLayer(nn.Module):
  """One post-LN transformer encoder layer: LN(x + SA(x)), then LN(x + FFN(x)), ReLU FFN.

  Attributes:
    num_heads, mlp_dim, dropout, dtype: as `CMC`.
  """

  num_heads: int = 4
  mlp_dim: int = 2048
  dropout: float = 0.1
  dtype: Any = jnp.float32
  attention_block: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, deterministic: bool) -> jax.Array:
    """Args: x (B, L, D); key_mask (B, L) bool. Returns: (B, L, D)."""
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=deterministic)
    a = SelfAttention(self.num_heads, self.dropout, self.dtype, self.attention_block,
                      name="self_attn")(
        x, key_mask, deterministic)
    x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm1")(x + drop(a))
    h = nn.relu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="linear1")(x))
    h = nn.Dense(x.shape[-1], dtype=self.dtype, name="linear2")(drop(h))
    return nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, name="norm2")(x + drop(h))


class GatedLayer(nn.Module):
  """σ(g)·layer(x) + (1 − σ(g))·x with a scalar g: trainable from `gate_init`, or fixed at it.

  Attributes:
    gate: "learned" (g a param, init `gate_init`) or "fixed" (g = `gate_init`, no param).
    gate_init: g's value at init (official: −5 learned, 0 fixed).
  """

  num_heads: int = 4
  mlp_dim: int = 2048
  dropout: float = 0.1
  gate: str = "learned"
  gate_init: float = GATE_INIT
  dtype: Any = jnp.float32
  attention_block: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, deterministic: bool) -> jax.Array:
    """Args: x (B, L, D); key_mask (B, L) bool. Returns: (B, L, D)."""
    y = EncoderLayer(self.num_heads, self.mlp_dim, self.dropout, self.dtype,
                     self.attention_block, name="encoder_layer")(x, key_mask, deterministic)
    if self.gate == "learned":
      g = self.param("gate", nn.initializers.constant(self.gate_init), (), jnp.float32)
    else:
      g = jnp.asarray(self.gate_init, jnp.float32)
    s = jax.nn.sigmoid(g).astype(y.dtype)
    return s * y + (1 - s) * x


class CMC(nn.Module):
  """Scores K candidates for a query in the context of each other (DESIGN.md §4).

  Attributes:
    num_layers: L gated encoder layers (official 2).
    num_heads: attention heads (official 4).
    mlp_dim: FFN width (PyTorch's default 2048, which the official layer keeps).
    dropout: on attention weights, after attention and in the FFN (training only).
    gate: "learned" (g from −5, the paper) or "fixed" (g = `gate_init`, the README's 0).
    gate_init: the gate logit's start (learned) or value (fixed).
    dtype: computation dtype; params stay float32.
    attention_block: 0, or attend this many sequence positions at a time (`SelfAttention`):
      the same scores with O(block·K) memory, for K in the thousands (128 is fast on a CPU).
    input_scale: q and c are multiplied by it first, so a fresh module scores
      input_scale²·⟨q, c⟩: with τ^(-1/2) of the tail, the dense first stage's cos/τ (whose
      spread a softmax can use) instead of a cosine in [-1, 1]. 1 = the official module.
  """

  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 2048
  dropout: float = 0.1
  gate: str = "learned"
  gate_init: float = GATE_INIT
  dtype: Any = jnp.float32
  attention_block: int = 0
  input_scale: float = 1.0

  @nn.compact
  def __call__(self, q: jax.Array, c: jax.Array, mask: Optional[jax.Array] = None,
               deterministic: bool = True) -> jax.Array:
    """Scores every candidate of every query.

    Args:
      q: (B, D) query embeddings.
      c: (B, K, D) candidate embeddings.
      mask: (B, K) bool, False at padded candidates (neither attended to nor meaningful in
        the output); None = all K are real.
      deterministic: False in training (dropout on; needs a "dropout" rng).

    Returns:
      (B, K) float32 scores ⟨q′, c_k′⟩; padded candidates get −inf.
    """
    if self.gate not in GATES:
      raise CMCError(f"CMC gate {self.gate!r} is not one of {GATES}")
    if q.ndim != 2 or c.ndim != 3 or c.shape[0] != q.shape[0] or c.shape[2] != q.shape[1]:
      raise CMCError(f"CMC takes q (B, D) and c (B, K, D); got {q.shape} and {c.shape}")
    if c.shape[1] == 0:
      raise CMCError("CMC got K = 0 candidates: rerank at least one")
    b, k, _ = c.shape
    mask = jnp.ones((b, k), bool) if mask is None else jnp.asarray(mask, bool)
    x = jnp.concatenate([q[:, None, :], c], axis=1).astype(self.dtype)
    if self.input_scale != 1.0:
      x = x * jnp.asarray(self.input_scale, self.dtype)
    key_mask = jnp.concatenate([jnp.ones((b, 1), bool), mask], axis=1)
    for i in range(self.num_layers):
      x = GatedLayer(self.num_heads, self.mlp_dim, self.dropout, self.gate, self.gate_init,
                     self.dtype, self.attention_block, name=f"layers_{i}")(
                         x, key_mask, deterministic)
    x = x.astype(jnp.float32)
    scores = jnp.einsum("bd,bkd->bk", x[:, 0], x[:, 1:])
    return jnp.where(mask, scores, -jnp.inf)


def init_cmc(rng: jax.Array, module: CMC, dim: int) -> dict:
  """Params of `module` for D = `dim`-wide inputs (float32)."""
  q = jnp.zeros((1, dim), jnp.float32)
  c = jnp.zeros((1, 2, dim), jnp.float32)
  return module.init(rng, q, c)["params"]


def cmc_input_dim(params: Mapping[str, Any]) -> int:
  """D, the input width the params were built for."""
  return int(np.shape(params["layers_0"]["encoder_layer"]["self_attn"]["in_proj"]["kernel"])[0])


def module_for(params: Mapping[str, Any], num_heads: int = 4, dropout: float = 0.1,
               gate: Optional[str] = None, gate_init: float = GATE_INIT,
               attention_block: int = 0, input_scale: float = 1.0) -> CMC:
  """The `CMC` whose params have the shapes of `params` (layers, FFN width, learned gate)."""
  layers = sorted(k for k in params if k.startswith("layers_"))
  if not layers:
    raise CMCError("these params are not CMC params (no layers_0): a CMC checkpoint is needed")
  mlp_dim = int(np.shape(params["layers_0"]["encoder_layer"]["linear1"]["kernel"])[1])
  learned = "gate" in params["layers_0"]
  if gate is None:
    gate = "learned" if learned else "fixed"
  return CMC(num_layers=len(layers), num_heads=num_heads, mlp_dim=mlp_dim, dropout=dropout,
             gate=gate, gate_init=gate_init, attention_block=attention_block,
             input_scale=input_scale)


def params_from_torch(state: Mapping[str, Any], num_layers: int, prefix: str = "") -> dict:
  """CMC params from a PyTorch state dict of the official gated encoder.

  Args:
    state: name -> array (torch tensors or NumPy), as `TransformerEncoder(Gated(
      TransformerEncoderLayer(d, h, batch_first=True)), L).state_dict()` names them:
      `{prefix}layers.{i}.encoder_layer.self_attn.in_proj_weight`, ..., `.weight` (the gate,
      absent when fixed).
    num_layers: L.
    prefix: e.g. "extend_multi_transformerencoder." for the official model's state dict.

  Returns:
    CMC params (float32); Dense kernels transposed, LayerNorm weight -> scale.
  """
  def get(name):
    key = prefix + name
    if key not in state:
      raise CMCError(f"the PyTorch state has no {key!r}")
    v = state[key]
    v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
    return np.asarray(v, np.float32)

  def dense(name):
    return {"kernel": get(f"{name}.weight").T, "bias": get(f"{name}.bias")}

  params = {}
  for i in range(num_layers):
    p = f"layers.{i}.encoder_layer."
    layer = {
        "self_attn": {
            "in_proj": {"kernel": get(p + "self_attn.in_proj_weight").T,
                        "bias": get(p + "self_attn.in_proj_bias")},
            "out_proj": dense(p + "self_attn.out_proj")},
        "linear1": dense(p + "linear1"), "linear2": dense(p + "linear2"),
        "norm1": {"scale": get(p + "norm1.weight"), "bias": get(p + "norm1.bias")},
        "norm2": {"scale": get(p + "norm2.weight"), "bias": get(p + "norm2.bias")}}
    params[f"layers_{i}"] = {"encoder_layer": layer}
    if prefix + f"layers.{i}.weight" in state:
      params[f"layers_{i}"]["gate"] = get(f"layers.{i}.weight").reshape(())
  return params
