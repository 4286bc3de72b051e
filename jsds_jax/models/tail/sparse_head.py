"""The sparse head shared by both modalities: z = log(1 + relu(E · LN(W_s e + b_s) + c)).

DESIGN.md §3: applied to the dense embedding e of an image or a caption (the same params for
both), it gives a |V|-dim non-negative term-weight vector. E is tied to the text encoder's word
embeddings at initialisation (`with_word_embeddings`) and then trained like any other param;
W_s and the LayerNorm are new.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jsds_jax.models.trunk import convert

# PyTorch nn.LayerNorm's default, which the official code's new vocab LayerNorm uses.
LN_EPS = 1e-5


class SparseHead(nn.Module):
  """Maps dense embeddings to non-negative vocabulary-sized term weights.

  Attributes:
    vocab_size: |V| (30524 BLIP, 30522 ALBEF/BERT/MiniLM).
    word_dim: d_w, the word-embedding width (768 BERT-base, 384 MiniLM).
    use_vocab_bias: whether to add the (V,) bias c (init 0).
    dtype: computation dtype; params stay float32.
    embedding_init: initialiser of E for a fresh init; `with_word_embeddings` then overwrites
      it with the text encoder's embeddings.
  """

  vocab_size: int
  word_dim: int
  use_vocab_bias: bool = True
  dtype: Any = jnp.float32
  embedding_init: Any = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, e: Any, with_logits: bool = False) -> Any:
    """The head on one batch, or on several sharing one pass through the (B, V) part.

    Args:
      e: (B, d_e) dense embeddings, or a tuple of such arrays (e.g. images and captions):
        every row goes through the same params, and the gradient of E is then one matmul
        over all rows instead of one per array, summed.
      with_logits: also return the logits l = E · LN(W_s e + b_s) + c (float32), for a loss
        on them (`term_losses.bow_loss`: unlike z, they carry gradient where relu cuts z to
        0). z is then computed by plain autodiff from l, with the same values as without.

    Returns:
      z (B, V) >= 0 in `dtype`, or a tuple of them, one per input; with `with_logits` each z
      is a pair (z, l).
    """
    proj = nn.Dense(self.word_dim, dtype=self.dtype, param_dtype=jnp.float32, name="proj")
    norm = nn.LayerNorm(LN_EPS, dtype=self.dtype, param_dtype=jnp.float32, name="layer_norm")
    emb = self.param("word_embeddings", self.embedding_init, (self.vocab_size, self.word_dim),
                     jnp.float32)
    c = None
    if self.use_vocab_bias:
      c = self.param("vocab_bias", nn.initializers.zeros_init(), (self.vocab_size,), jnp.float32)
    many = isinstance(e, (tuple, list))
    if with_logits:
      outs = tuple(_weights_and_logits(norm(proj(x)), emb, c, jnp.dtype(self.dtype))
                   for x in (e if many else (e,)))
      return outs if many else outs[0]
    zs = term_weights(tuple(norm(proj(x)) for x in (e if many else (e,))), emb, c,
                      jnp.dtype(self.dtype))
    return zs if many else zs[0]


def _weights_and_logits(x: jax.Array, emb: jax.Array, bias: Optional[jax.Array],
                        dtype: Any) -> tuple[jax.Array, jax.Array]:
  """(z, l) for one (B, d_w) input, as `term_weights` computes z, differentiated by JAX."""
  logits = jnp.einsum("bd,vd->bv", x.astype(dtype), emb.astype(dtype),
                      preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias
  return jnp.log1p(jax.nn.relu(logits)).astype(dtype), logits


# The (B, V) part of the head is most of a training step's cost (three ΣB·d_w·V matmuls;
# the sparse scores and the optimizer are most of the rest), so it is one function with a
# hand-written gradient:
#   * the backward pass reads only the outputs z: for l > 0, dz/dl = 1 / (1 + l) = exp(-z),
#     and z > 0 exactly where l > 0, so neither the logits nor relu's mask are kept alive;
#   * several inputs (images, captions) give separate outputs, so nothing downstream slices a
#     (B, V) array, while their gradients are stacked into one (ΣB, V) array as they are
#     computed: dE and dc are one matmul each;
#   * dc = 1ᵀ·dl is a matmul: XLA's CPU reduce over the batch axis of a (B, V) array runs
#     ~30× slower than the same sum as a (1, B) x (B, V) product;
#   * dE = dlᵀ·x is accumulated in float32 whatever `dtype` is (a parameter gradient), while
#     the forward product and dx run in `dtype` (bfloat16 halves their cost where the hardware
#     has bf16 matmuls) with float32 accumulation.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def term_weights(xs: tuple[jax.Array, ...], emb: jax.Array, bias: Optional[jax.Array],
                 dtype: Any) -> tuple[jax.Array, ...]:
  """z = log(1 + relu(x Eᵀ + c)) for each x in `xs`.

  Args:
    xs: tuple of (B_k, d_w) LayerNorm outputs.
    emb: (V, d_w) float32 word embeddings E.
    bias: (V,) float32 vocab bias c, or None.
    dtype: the matmul's input dtype (and z's); accumulation is float32.

  Returns:
    A tuple of z (B_k, V) in `dtype`, >= 0.
  """
  return _term_weights_fwd(xs, emb, bias, dtype)[0]


def _term_weights_fwd(xs, emb, bias, dtype):
  emb_c = emb.astype(dtype)
  zs = []
  for x in xs:
    logits = jnp.einsum("bd,vd->bv", x.astype(dtype), emb_c, preferred_element_type=jnp.float32)
    if bias is not None:
      logits = logits + bias
    zs.append(jnp.log1p(jax.nn.relu(logits)).astype(dtype))
  zs = tuple(zs)
  return zs, (xs, emb_c, bias, zs)


def _term_weights_bwd(dtype, res, dzs):
  xs, emb_c, bias, zs = res
  dl = jnp.concatenate([
      jnp.where(z > 0, dz.astype(jnp.float32) * jnp.exp(-z.astype(jnp.float32)), 0.0)
      for z, dz in zip(zs, dzs)])
  x_all = jnp.concatenate([x.astype(jnp.float32) for x in xs])
  dx = jnp.einsum("bv,vd->bd", dl.astype(dtype), emb_c, preferred_element_type=jnp.float32)
  splits = np.cumsum([x.shape[0] for x in xs])[:-1]
  dxs = tuple(d.astype(x.dtype) for d, x in zip(jnp.split(dx, splits), xs))
  demb = jnp.einsum("bv,bd->vd", dl, x_all)
  dbias = None if bias is None else jnp.einsum("b,bv->v", jnp.ones(dl.shape[:1], jnp.float32), dl)
  return dxs, demb, dbias


term_weights.defvjp(_term_weights_fwd, _term_weights_bwd)


def with_word_embeddings(params: dict, word_embeddings: Any) -> dict:
  """Returns `params` (of a `SparseHead`) with E replaced by the given word embeddings.

  Args:
    params: the head's params tree {"proj", "layer_norm", "word_embeddings", ...}.
    word_embeddings: (V, d_w) array, the text encoder's input word embeddings.

  Returns:
    A new params tree (the input is not modified); E as float32.

  Raises:
    ConversionError: the shape differs from the head's (V, d_w).
  """
  emb = np.asarray(word_embeddings, np.float32)
  want = tuple(params["word_embeddings"].shape)
  if emb.shape != want:
    raise convert.ConversionError(
        f"word embeddings have shape {emb.shape}, the sparse head expects (V, d_w) = {want}")
  return {**params, "word_embeddings": jnp.asarray(emb)}


def init_sparse_head(rng: jax.Array, module: SparseHead, embed_dim: int,
                     word_embeddings: Any = None) -> dict:
  """Params of `module`, with E tied to `word_embeddings` when given.

  Args:
    rng: PRNG key.
    module: the `SparseHead`.
    embed_dim: d_e, the width of the dense embeddings it reads.
    word_embeddings: (V, d_w) or None (E stays at `module.embedding_init`).

  Returns:
    The params tree, float32.

  Raises:
    ConversionError: `word_embeddings` is not (V, d_w).
  """
  if word_embeddings is not None:
    # E is about to be replaced: skip drawing |V|·d_w random numbers for it.
    module = module.clone(embedding_init=nn.initializers.zeros_init())
  params = jax.jit(module.init)(rng, jnp.zeros((1, embed_dim), jnp.float32))["params"]
  if word_embeddings is not None:
    params = with_word_embeddings(params, word_embeddings)
  return params
