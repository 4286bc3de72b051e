"""The whole trained tail (two dense tails, one shared sparse head, τ) and its score functions.

`JSDSTail` maps cached pre-projection features h to a dense embedding e and a sparse vector z
per item (DESIGN.md §3). The score functions below turn a batch of those into the B×B matrices
the losses (`jsds_jax/losses.py`) and the evaluator read; they live here, beside the model that
defines what a score is, while losses.py only consumes score matrices.

Convention everywhere: rows are images, columns are captions.
"""

from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jsds_jax import pec
from jsds_jax.models.trunk import convert
from jsds_jax.models.tail import dense_tail as dense_tail_lib
from jsds_jax.models.tail import sparse_head as sparse_head_lib

TAU_INIT = 0.07
TAU_MIN = 0.001
TAU_MAX = 0.5


def clamp_tau(tau: jax.Array, tau_min: float = TAU_MIN, tau_max: float = TAU_MAX) -> jax.Array:
  """τ clipped to [tau_min, tau_max] in value, with the gradient of the unclipped τ.

  The official code clamps the τ parameter in place before every step, so an update that
  overshoots a bound is undone and τ can still move back. A plain `jnp.clip` would instead
  zero the gradient outside the range and leave τ stuck there (and weight decay would drag
  it further out); the straight-through form keeps it responsive without mutating params.

  Args:
    tau: () the raw parameter.

  Returns:
    () the temperature to divide scores by.
  """
  # tau - stop_gradient(tau) is exactly 0 in value and 1 in gradient.
  clipped = jax.lax.stop_gradient(jnp.clip(tau, tau_min, tau_max))
  return clipped + (tau - jax.lax.stop_gradient(tau))


def _dense_tail(cfg: "JSDSTail") -> dense_tail_lib.DenseTail:
  """The DenseTail a JSDSTail holds per modality (also used to init it part by part)."""
  return dense_tail_lib.DenseTail(cfg.embed_dim, cfg.use_bias, cfg.dtype)


def _sparse_head(cfg: "JSDSTail") -> sparse_head_lib.SparseHead:
  """The SparseHead a JSDSTail shares between modalities."""
  return sparse_head_lib.SparseHead(cfg.vocab_size, cfg.word_dim, cfg.use_vocab_bias, cfg.dtype)


class JSDSTail(nn.Module):
  """Image and text dense tails, one sparse head shared by both, and a learnable τ.

  Attributes:
    embed_dim: P = d_e, the dense embedding width (256 for BLIP/ALBEF).
    vocab_size: |V| of the sparse head.
    word_dim: d_w of the sparse head (the text encoder's word-embedding width).
    use_bias: whether the dense projections have biases.
    use_vocab_bias: whether the sparse head has the (V,) bias c.
    tau_init, tau_min, tau_max: the temperature's start value and clamp range.
    dtype: computation dtype; params stay float32.
    image_block, text_block: the "last_block" variant (`last_block.block_for(tower)`): a
      trainable last transformer block that turns cached token states into h first; None
      (the default) reads cached pooled h directly.
    own_caption_terms: each caption's sparse vector z_t keeps only its own tokens' entries
      (config `model.own_caption_terms`, `caption_terms`); the text side then needs the
      captions' token ids. Training, validation, eval and search all go through here.
  """

  embed_dim: int
  vocab_size: int
  word_dim: int
  use_bias: bool = True
  use_vocab_bias: bool = True
  tau_init: float = TAU_INIT
  tau_min: float = TAU_MIN
  tau_max: float = TAU_MAX
  dtype: Any = jnp.float32
  image_block: Optional[nn.Module] = None
  text_block: Optional[nn.Module] = None
  own_caption_terms: bool = False

  @classmethod
  def from_params(cls, params: Mapping[str, Any], *, image_block: Optional[nn.Module] = None,
                  text_block: Optional[nn.Module] = None, dtype: Any = jnp.float32,
                  own_caption_terms: bool = False) -> "JSDSTail":
    """The tail that `params` belong to, its sizes read from their shapes.

    The one place a tail is rebuilt from trained params (checkpoints, the search bundle,
    `tail_outputs`), so that nothing trained is left out.

    Args:
      params: {"image_tail", "text_tail", "sparse_head", "tau"} as `init_jsds_tail` returns:
        image_tail/proj/kernel (D_img, P), sparse_head/word_embeddings (V, d_w), ... plus
        "image_block" / "text_block" in the last_block variant.
      image_block, text_block: the block modules (`last_block.block_for(tower)`); required
        exactly for the sides whose block `params` hold.
      dtype: computation dtype.
      own_caption_terms: the config's `model.own_caption_terms` (params do not record it).

    Raises:
      ValueError: `params` hold a trained block whose module is not given, or the reverse.
    """
    for side, block in (("image", image_block), ("text", text_block)):
      if (f"{side}_block" in params) != (block is not None):
        raise ValueError(
            f"these params hold a trained {side} last block: the backbone, whose tower defines "
            "that block, is needed to rebuild the tail" if block is None else
            f"a {side} block module was given but the params hold no {side}_block")
    head = params["sparse_head"]
    vocab_size, word_dim = np.shape(head["word_embeddings"])
    embed_dim = np.shape(params["image_tail"]["proj"]["kernel"])[1]
    return cls(embed_dim=int(embed_dim), vocab_size=int(vocab_size), word_dim=int(word_dim),
               use_bias="bias" in params["image_tail"]["proj"],
               use_vocab_bias="vocab_bias" in head, dtype=dtype, image_block=image_block,
               text_block=text_block, own_caption_terms=bool(own_caption_terms))

  def setup(self):
    self.image_tail = _dense_tail(self)
    self.text_tail = _dense_tail(self)
    self.sparse_head = _sparse_head(self)
    # τ itself (not log τ), as the official optimizer group trains it at lr 1e-3.
    self.tau = self.param("tau", nn.initializers.constant(self.tau_init), (), jnp.float32)

  def temperature(self) -> jax.Array:
    """() the clamped τ (see `clamp_tau`)."""
    return clamp_tau(self.tau, self.tau_min, self.tau_max)

  def pooled_image(self, h: jax.Array) -> jax.Array:
    """h (B, D_img) as cached, or (B, L_i, D_img) token states with `image_block` -> (B, D_img)."""
    return h if self.image_block is None else self.image_block(h)

  def pooled_text(self, h: jax.Array, token_ids: Optional[jax.Array] = None) -> jax.Array:
    """h (B, D_txt), or (B, L_t, D_txt) token states and (B, L_t) ids (-1 = padding) with
    `text_block` -> (B, D_txt)."""
    if self.text_block is None:
      return h
    if token_ids is None:
      raise ValueError("the last_block text tail needs the captions' token ids")
    return self.text_block(h, token_ids)

  def caption_terms(self, z_t: jax.Array,
                    token_ids: Optional[jax.Array] = None) -> jax.Array:
    """z_t (B, V) restricted to each caption's own tokens with `own_caption_terms`
    (`pec.own_terms`); z_t unchanged without.

    Args:
      z_t: (B, V) caption term weights. token_ids: (B, L) their token ids, -1 at padding.

    Raises:
      ValueError: `own_caption_terms` and no token ids.
    """
    if not self.own_caption_terms:
      return z_t
    if token_ids is None:
      raise ValueError("model.own_caption_terms keeps only each caption's own tokens: the tail "
                       "needs the captions' token ids")
    return pec.own_terms(z_t, token_ids)

  def encode_image(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Args: h (B, D_img) cached image features (token states with `image_block`).
    Returns: e (B, P) unit-norm, z (B, V) >= 0."""
    e = self.image_tail(self.pooled_image(h))
    return e, self.sparse_head(e)

  def encode_text(self, h: jax.Array,
                  token_ids: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Args: h (B, D_txt) cached caption features (token states with `text_block`);
    token_ids (B, L_t), -1 at padding, with `text_block` or `own_caption_terms`.
    Returns: e (B, P) unit-norm, z (B, V) >= 0 (`caption_terms`)."""
    e = self.text_tail(self.pooled_text(h, token_ids))
    return e, self.caption_terms(self.sparse_head(e), token_ids)

  def __call__(self, h_img: jax.Array, h_txt: jax.Array,
               token_ids: Optional[jax.Array] = None) -> dict[str, jax.Array]:
    """Encodes a batch of images and captions.

    Args:
      h_img: (B_i, D_img) image features ((B_i, L_i, D_img) token states with `image_block`).
      h_txt: (B_t, D_txt) caption features ((B_t, L_t, D_txt) with `text_block`).
      token_ids: (B_t, L_t) caption token ids, -1 at padding; with `text_block` or
        `own_caption_terms`.

    Returns:
      {"e_i": (B_i, P), "z_i": (B_i, V), "e_t": (B_t, P), "z_t": (B_t, V), "tau": () clamped}.
    """
    e_i = self.image_tail(self.pooled_image(h_img))
    e_t = self.text_tail(self.pooled_text(h_txt, token_ids))
    z_i, z_t = self.sparse_terms(e_i, e_t, token_ids)
    return dict(e_i=e_i, z_i=z_i, e_t=e_t, z_t=z_t, tau=self.temperature())

  def sparse_terms_and_logits(self, e_i: jax.Array, e_t: jax.Array,
                              token_ids: Optional[jax.Array] = None) -> dict[str, jax.Array]:
    """`sparse_terms` plus the head's logits (for a loss on them; see `SparseHead`); the
    logits are never restricted, z_t is as in `sparse_terms`.

    Returns:
      {"z_i": (B_i, V), "z_t": (B_t, V), "l_i": (B_i, V), "l_t": (B_t, V)}.
    """
    (z_i, l_i), (z_t, l_t) = self.sparse_head((e_i, e_t), with_logits=True)
    return dict(z_i=z_i, z_t=self.caption_terms(z_t, token_ids), l_i=l_i, l_t=l_t)

  def sparse_terms(self, e_i: jax.Array, e_t: jax.Array,
                   token_ids: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """The shared sparse head on both modalities at once.

    One call of the head on both batches: its gradient with respect to E (and c) is then one
    matmul over all B_i + B_t rows instead of one per modality, summed.

    Args:
      e_i: (B_i, P) image embeddings. e_t: (B_t, P) caption embeddings.
      token_ids: (B_t, L_t) the captions' token ids, -1 at padding; with `own_caption_terms`.

    Returns:
      z_i (B_i, V), z_t (B_t, V) (`caption_terms`).
    """
    z_i, z_t = self.sparse_head((e_i, e_t))
    return z_i, self.caption_terms(z_t, token_ids)


def init_jsds_tail(rng: jax.Array, module: JSDSTail, image_dim: int, text_dim: int,
                   vision_proj: Optional[Mapping[str, Any]] = None,
                   text_proj: Optional[Mapping[str, Any]] = None,
                   word_embeddings: Any = None,
                   image_block_params: Optional[Mapping[str, Any]] = None,
                   text_block_params: Optional[Mapping[str, Any]] = None) -> dict:
  """Params of a `JSDSTail`, starting from the backbone's pieces where it has them.

  Args:
    rng: PRNG key for everything freshly initialised.
    module: the `JSDSTail`.
    image_dim, text_dim: widths of the cached image / caption features.
    vision_proj, text_proj: {"kernel": (D, P), "bias": (P,)} from the backbone's converter, or
      None for a fresh init (a backbone without projections, e.g. `lit`).
    word_embeddings: (V, d_w) text-encoder word embeddings to tie E to, or None.
    image_block_params, text_block_params: the frozen towers' last blocks
      (`last_block.block_params`); required exactly when the module has that block.

  Returns:
    {"image_tail": ..., "text_tail": ..., "sparse_head": ..., "tau": ()} (+ "image_block",
    "text_block" in the last_block variant), float32.
  """
  k_img, k_txt, k_head = jax.random.split(rng, 3)
  # Part by part, so pieces that come from the backbone are never randomly initialised.
  params = {
      "image_tail": dense_tail_lib.init_dense_tail(k_img, _dense_tail(module), image_dim,
                                                   vision_proj),
      "text_tail": dense_tail_lib.init_dense_tail(k_txt, _dense_tail(module), text_dim,
                                                  text_proj),
      "sparse_head": sparse_head_lib.init_sparse_head(k_head, _sparse_head(module),
                                                      module.embed_dim, word_embeddings),
      "tau": jnp.asarray(module.tau_init, jnp.float32),
  }
  for name, block, block_params in (("image_block", module.image_block, image_block_params),
                                    ("text_block", module.text_block, text_block_params)):
    if (block is None) != (block_params is None):
      raise ValueError(f"{name}: the module {'has' if block is not None else 'has no'} such "
                       "block, so its params must be given exactly then")
    if block_params is not None:
      params[name] = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), dict(block_params))
  # Token inputs (length 2) where a block reads them, pooled vectors otherwise.
  h_img = jnp.zeros((1, 2, image_dim) if module.image_block else (1, image_dim), jnp.float32)
  h_txt = jnp.zeros((1, 2, text_dim) if module.text_block else (1, text_dim), jnp.float32)
  ids = (jnp.zeros((1, 2), jnp.int32) if module.text_block or module.own_caption_terms
         else None)
  reference = jax.eval_shape(module.init, rng, h_img, h_txt, ids)["params"]
  convert.assert_same_structure(params, reference, "JSDSTail params")
  return params


def dense_scores(e_i: jax.Array, e_t: jax.Array, tau: jax.Array) -> jax.Array:
  """S_d = e_i e_tᵀ / τ.

  Args:
    e_i: (B_i, P) image embeddings. e_t: (B_t, P) caption embeddings. tau: () temperature.

  Returns:
    (B_i, B_t), in the promoted dtype of the inputs and at least float32.
  """
  dt = jnp.promote_types(jnp.result_type(e_i, e_t), jnp.float32)
  s = jnp.einsum("id,td->it", e_i, e_t, preferred_element_type=dt)
  return s / jnp.asarray(tau, dt)


@jax.custom_vjp
def sparse_scores(z_i: jax.Array, z_t: jax.Array) -> jax.Array:
  """S_s = z_i z_tᵀ.

  Args:
    z_i: (B_i, V) image term weights. z_t: (B_t, V) caption term weights.

  Returns:
    (B_i, B_t), at least float32 (bf16 inputs accumulate in float32).
  """
  dt = jnp.promote_types(jnp.result_type(z_i, z_t), jnp.float32)
  return jnp.einsum("iv,tv->it", z_i, z_t, preferred_element_type=dt)


def _sparse_scores_fwd(z_i, z_t):
  return sparse_scores(z_i, z_t), (z_i, z_t)


def _sparse_scores_bwd(res, ds):
  # Written out because autodiff would multiply the float32 cotangent with z converted UP to
  # float32: with bfloat16 z the two (B, B) x (B, V) products then cost a float32 matmul each.
  # Here they run in z's dtype (accumulating in float32), as mixed-precision backward passes do;
  # with float32 z this is exactly the automatic gradient.
  z_i, z_t = res
  acc = jnp.promote_types(jnp.result_type(z_i, z_t), jnp.float32)
  dz_i = jnp.einsum("it,tv->iv", ds.astype(z_t.dtype), z_t, preferred_element_type=acc)
  dz_t = jnp.einsum("it,iv->tv", ds.astype(z_i.dtype), z_i, preferred_element_type=acc)
  return dz_i.astype(z_i.dtype), dz_t.astype(z_t.dtype)


sparse_scores.defvjp(_sparse_scores_fwd, _sparse_scores_bwd)


def integrated_scores(s_d: jax.Array, s_s: jax.Array, w1: Any, w2: Any) -> jax.Array:
  """S_int = w1·S_d + w2·S_s.

  Args:
    s_d: (B_i, B_t) dense scores (already divided by τ). s_s: (B_i, B_t) sparse scores.
    w1, w2: () weights (floats or arrays).

  Returns:
    (B_i, B_t).
  """
  return w1 * s_d + w2 * s_s
