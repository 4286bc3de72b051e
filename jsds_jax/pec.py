"""PEC, probabilistic expansion control: captions' sparse vectors masked to their own tokens.

DESIGN.md §3 (a baseline option from the D2S paper, thongnt99/lsr-multimodal): early in
training a caption's sparse vector z_t may only weight the vocabulary entries of the caption's
own tokens (no expansion to other terms); the chance of that falls linearly from 1 at step 0 to
0 at `fraction` of the run, after which the head expands freely. As in the reference code, one
Bernoulli draw per step decides for the whole batch (the reference draws once per batch, lowers
the probability once per epoch, and masks to every attended token, [CLS] and [SEP] included,
as `token_mask` does with the cache's token ids). Images are never masked, and evaluation never
masks (the reference evaluates its test split at probability 0).

All functions are pure and jit-friendly.
"""

import jax
import jax.numpy as jnp


def probability(step: jax.Array, total_steps: int, fraction: float) -> jax.Array:
  """() float32 p(t) = max(0, 1 - t / (fraction · total_steps)).

  Args:
    step: () optimizer steps taken.
    total_steps: the run's steps.
    fraction: share of the run over which p falls from 1 to 0 (0.95 in the reference).
  """
  span = max(1.0, float(fraction) * float(total_steps))
  return jnp.clip(1.0 - jnp.asarray(step, jnp.float32) / span, 0.0, 1.0)


def token_mask(token_ids: jax.Array, vocab_size: int) -> jax.Array:
  """(B, V) bool: True at the vocabulary entries of each caption's tokens.

  Args:
    token_ids: (B, L) int token ids, -1 at padding.
    vocab_size: V.
  """
  b = token_ids.shape[0]
  rows = jnp.arange(b)[:, None]
  cols = jnp.where(token_ids >= 0, token_ids, vocab_size)  # padding -> out of range, dropped
  return jnp.zeros((b, vocab_size), bool).at[rows, cols].set(True, mode="drop")


def own_terms(z_t: jax.Array, token_ids: jax.Array) -> jax.Array:
  """Each caption's vector restricted to its own tokens' vocabulary entries, always (config
  `model.own_caption_terms`: "inference-free" captions, no expansion at train or eval time).

  Learned sparse retrieval's inference-free query encoders weight only the query's own tokens;
  here the caption (the query of t2i, a document of i2t) may then only weight words it
  contains, so any content word it weights is one of its own.

  Args:
    z_t: (B, V) caption term weights.
    token_ids: (B, L) the captions' token ids, -1 at padding.

  Returns:
    (B, V) z_t with every entry outside the caption's tokens set to 0.
  """
  keep = token_mask(token_ids, z_t.shape[-1])
  return jnp.where(keep, z_t, jnp.zeros((), z_t.dtype))


def mask_captions(z_t: jax.Array, token_ids: jax.Array, rng: jax.Array,
                  prob: jax.Array) -> tuple[jax.Array, jax.Array]:
  """With probability `prob`, z_t restricted to each caption's own tokens; else z_t.

  Args:
    z_t: (B, V) caption term weights.
    token_ids: (B, L) the captions' token ids, -1 at padding.
    rng: the step's PEC key (the same on every device, so all shards agree).
    prob: () probability of masking this step (`probability`).

  Returns:
    (z_t masked or not (B, V), whether it was masked: () bool).
  """
  on = jax.random.bernoulli(rng, prob)
  keep = token_mask(token_ids, z_t.shape[-1]) | jnp.logical_not(on)
  return jnp.where(keep, z_t, jnp.zeros((), z_t.dtype)), on


def mask_pairs(z_i: jax.Array, z_t: jax.Array, token_ids: jax.Array, rng: jax.Array,
               prob: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`mask_captions` that also masks each image to its paired caption's tokens (config
  `train.pec_images`).

  A STAIR-like grounding phase (Chen et al., ICML 2023, "Learning Sparse Text and Image
  Representation in Grounded Tokens", whose first stage restricts both sides to the caption's
  tokens before releasing them): on the steps where PEC masks the captions, image k may only
  weight the tokens of caption k, its positive in the batch, so the head learns to put an
  image's weight on the words that describe it; as p(t) falls to 0 the mask is released.

  Args:
    z_i: (B, V) image term weights, row k the image of caption k.
    z_t: (B, V) caption term weights. token_ids: (B, L), -1 at padding.
    rng: the step's PEC key. prob: () p(t).

  Returns:
    (z_i, z_t masked or not, whether they were masked: () bool).
  """
  on = jax.random.bernoulli(rng, prob)
  keep = token_mask(token_ids, z_t.shape[-1]) | jnp.logical_not(on)
  zero = jnp.zeros((), z_t.dtype)
  return jnp.where(keep, z_i, zero), jnp.where(keep, z_t, zero), on

