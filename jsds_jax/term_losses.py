"""Term-level losses that tie the sparse terms to words (issue 16): pure functions of the
sparse vectors z and the head's logits.

The contrastive and KD losses only ask that matching pairs score high; they say nothing about
*which* vocabulary entries carry the score, so the head is free to use the vocabulary as latent
dimensions (the demo's top terms were `pattern`, `protested`, `set` for nearly every vector).
Two extra signals, each behind its own config field (`train.loss.bow_*`, `train.loss.df_*`):

* a bag-of-words target (`bow_targets`, `bow_loss`): each vector's highest logits are pulled
  onto the content wordpieces of its caption (for an image: its paired caption's). STAIR (Chen et
  al., ICML 2023) grounds both sides by *masking* them to the caption's tokens in a first stage
  (our `train.pec_images`); this is a soft version of that constraint: it zeroes no term by
  itself (on the demo it still leaves short vectors, ~10 terms, of caption words and their
  neighbours, README "Lexical levers"). LexLIP (Luo
  et al., ICCV 2023) pretrains its lexicon-weighting heads through a bottleneck from which the
  paired text's masked words must be reconstructed: alike in spirit (the weights must name the
  caption's words), though there the target is reached through a decoder.
* a batch document-frequency penalty (`df_penalty`): a term that carries weight in more than a
  share ρ of a batch's vectors is penalised by how far its (smooth) document frequency exceeds
  ρ. FLOPS (Σ_v mean_b(z_bv)²) also hits shared terms, but it is quadratic in the mean weight
  and so also shrinks a term that is large in a few vectors; the hinge leaves a term alone
  until it is shared by more than ρ of the batch, which is what makes it explain nothing.

All functions are jit-able and compute in at least float32. The gradient of where(allowed, l,
-inf) is 0 at masked entries (no NaN): jnp.where passes the cotangent through one branch only.
"""

import jax
import jax.numpy as jnp

from jsds_jax import pec


def _at_least_f32(x) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _allowed_tokens(token_ids: jax.Array, allowed: jax.Array | None, vocab_size: int
                    ) -> jax.Array:
  """(B, V) bool: the terms each caption holds, among the `allowed` ones (None: all)."""
  hot = pec.token_mask(token_ids, vocab_size)
  return hot if allowed is None else hot & jnp.asarray(allowed, bool)[None, :]


def bow_targets(token_ids: jax.Array, allowed: jax.Array | None, vocab_size: int,
                weights: jax.Array | None = None) -> jax.Array:
  """Bag-of-words distributions q of captions over the vocabulary.

  A term counts once however often it occurs (a set of words, not counts: a repeated word does
  not name the picture better), and only where `allowed` is True (content wordpieces: not
  special, punctuation or a stopword).

  Args:
    token_ids: (B, L) int caption token ids, -1 at padding.
    allowed: (V,) bool, the terms a target may hold; None = every token.
    vocab_size: V.
    weights: (V,) float >= 0, each term's share before normalising (`idf_weights`: a word
      common in the training captions weighs less); None = uniform.

  Returns:
    (B, V) float32, each row proportional to `weights` (uniform without) over the caption's
    allowed terms, or all zero when it has none (or they all weigh 0).
  """
  hot = _allowed_tokens(token_ids, allowed, vocab_size).astype(jnp.float32)
  if weights is not None:
    hot = hot * jnp.asarray(weights, jnp.float32)[None, :]
  total = jnp.sum(hot, axis=-1, keepdims=True)
  return jnp.where(total > 0, hot / jnp.where(total > 0, total, 1.0), 0.0)


def idf_weights(token_ids: jax.Array, vocab_size: int) -> jax.Array:
  """Inverse document frequency of each term over a set of captions (config
  `train.loss.bow_idf`): idf_v = log((1 + N) / (1 + df_v)), df_v = how many of the N captions
  hold term v.

  A word in every caption weighs 0, one in no caption log(1 + N). On the demo, "letter" is in
  ~20% of the captions; with uniform targets it became the most common top term of up to 59%
  of the test vectors. Weighted by idf, a caption's rarer words take more of its target.

  Args:
    token_ids: (N, L) int caption token ids, -1 at padding.
    vocab_size: V.

  Returns:
    (V,) float32 >= 0.
  """
  df = jnp.sum(pec.token_mask(token_ids, vocab_size), axis=0, dtype=jnp.float32)
  n = float(token_ids.shape[0])
  return jnp.log((1.0 + n) / (1.0 + df))


def bow_loss(logits: jax.Array, q: jax.Array, allowed: jax.Array | None = None) -> jax.Array:
  """KL(q ‖ softmax(l)) over the allowed terms, averaged over rows that have a target.

  l are the head's logits (z = log(1 + relu(l))). Why a softmax over the logits: it asks that
  the caption's words have the *highest* logits of the vector, which is what makes them its top
  terms, and it says nothing about the logits' level, so it neither rewards nor punishes the
  vector's size (the L1 / FLOPS regulariser sets that: shifting every logit down changes no
  softmax). Its gradient raises every target logit, also where relu has cut z to 0 (z alone
  has no gradient there, so a loss on z cannot revive a caption word that does not fire), and
  lowers the other logits in proportion to their probability, i.e. the latent terms on top.
  (Measured first and dropped: a KL on z's own L1 shares, z/Σz. Where no target term fired it
  was lowest for an empty vector, and on the demo it emptied the image vectors and sparse
  retrieval with them.) KL = H(q, softmax) − H(q): 0 exactly when softmax(l) = q.

  Args:
    logits: (B, V) the head's logits l (float32).
    q: (B, V) target rows from `bow_targets` (rows summing to 1, or all zero = no target).
    allowed: (V,) bool, the terms the softmax runs over (q must be 0 elsewhere); None = all.
      Masked terms (`vocab_mask`) have constant logits and belong outside.

  Returns:
    () float, at least float32; 0 when no row has a target.
  """
  l = _at_least_f32(logits)
  q = _at_least_f32(q)
  if allowed is not None:
    l = jnp.where(jnp.asarray(allowed, bool)[None, :], l, -jnp.inf)
  logp = jax.nn.log_softmax(l, axis=-1)
  # 0 · log 0 terms (q = 0, masked logit -inf) must stay 0, not NaN.
  per_row = jnp.sum(jnp.where(q > 0, q * (jnp.log(jnp.where(q > 0, q, 1.0)) - logp), 0.0),
                    axis=-1)
  valid = jnp.sum(q, axis=-1) > 0
  return jnp.sum(jnp.where(valid, per_row, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def soft_document_frequency(z: jax.Array, scale: float) -> jax.Array:
  """df_v = mean_b tanh(z_bv / κ): the share of the batch in which term v fires, smoothed.

  tanh(z/κ) is 0 at z = 0 and near 1 once z ≫ κ, a differentiable stand-in for 1[z > 0].

  Args:
    z: (B, V) non-negative sparse vectors.
    scale: κ > 0.

  Returns:
    (V,) float in [0, 1).
  """
  return jnp.mean(jnp.tanh(_at_least_f32(z) / scale), axis=0)


def df_penalty(z: jax.Array, max_df: float, scale: float,
               allowance: jax.Array | None = None) -> jax.Array:
  """Σ_v relu(df_v − a_v − ρ): terms shared by more than a share ρ of the batch (beyond the
  allowance a_v, when given).

  Args:
    z: (B, V) non-negative sparse vectors.
    max_df: ρ in [0, 1).
    scale: κ of `soft_document_frequency`.
    allowance: (V,) a_v >= 0 added to ρ per term, e.g. `natural_df`: the share of the batch
      whose caption says the word, which a grounded vector may fire on; None = 0.

  Returns:
    () float, 0 when no term's smooth document frequency exceeds ρ (+ a_v).
  """
  excess = soft_document_frequency(z, scale) - max_df
  if allowance is not None:
    excess = excess - _at_least_f32(allowance)
  return jnp.sum(jax.nn.relu(excess))


def natural_df(token_ids: jax.Array, vocab_size: int, allowed: jax.Array | None = None
               ) -> jax.Array:
  """(V,) the share of a batch's captions holding each term (`allowed` terms only, 0 elsewhere):
  how often a vector grounded in its caption fires on the term (config `train.loss.df_natural`;
  "skin" and "tone" are in 16% of the corpus's captions, and a df penalty at ρ = 10% alone would
  push them below what the captions say).

  Args:
    token_ids: (B, L) caption token ids, -1 at padding; row k is vector k's caption.
    vocab_size: V.
    allowed: (V,) bool or None (every token).
  """
  return jnp.mean(_allowed_tokens(token_ids, allowed, vocab_size).astype(jnp.float32), axis=0)
