"""The sparse head shared by both modalities: z = log(1 + relu(E · LN(W_s e + b_s) + c)).

DESIGN.md §3: applied to the dense embedding e of an image or a caption (the same params for
both), it gives a |V|-dim non-negative term-weight vector. E is tied to the text encoder's word
embeddings at initialisation (`with_word_embeddings`) and then trained like any other param;
W_s and the LayerNorm are new.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jsds_jax.models import convert

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
  def __call__(self, e: jax.Array) -> jax.Array:
    """Args: e (B, d_e) dense embeddings. Returns: z (B, V) >= 0, in `dtype`."""
    x = nn.Dense(self.word_dim, dtype=self.dtype, param_dtype=jnp.float32, name="proj")(e)
    x = nn.LayerNorm(LN_EPS, dtype=self.dtype, param_dtype=jnp.float32, name="layer_norm")(x)
    emb = self.param("word_embeddings", self.embedding_init, (self.vocab_size, self.word_dim),
                     jnp.float32)
    # One (B, d_w) x (d_w, V) contraction with elementwise ops after it, so XLA fuses the
    # bias, relu and log1p into the matmul's epilogue and never materialises extra (B, V) temps.
    logits = jnp.einsum("bd,vd->bv", x.astype(self.dtype), emb.astype(self.dtype))
    if self.use_vocab_bias:
      c = self.param("vocab_bias", nn.initializers.zeros_init(), (self.vocab_size,), jnp.float32)
      logits = logits + c.astype(self.dtype)
    return jnp.log1p(jax.nn.relu(logits))


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
