"""The sharded train step: a per-device function over the 'data' mesh axis (`jax.shard_map`).

Each device gathers its share of the step's batch from the on-device feature cache
(`input_pipeline.gather_batch`), encodes it with the tail, all-gathers the embeddings and sparse
vectors so that every device holds the global batch (negatives span all B pairs), computes the
B × B scores and the loss of the global batch, and takes gradients.

Gradients. Every device evaluates the same global loss L from the gathered arrays. Taking the
gradient with respect to a *device-varying* copy of the params (`jax.lax.pcast(..., to=
"varying")`), device d gets ∂L/∂τ for the direct path through τ plus n · (its local items'
contribution) for the paths through `all_gather`, whose transpose is a reduce-scatter that sums
the n identical cotangents. `pmean` over the n devices then gives exactly ∂L/∂θ: (1/n)·Σ_d n·c_d
= Σ_d c_d, and (1/n)·n·∂L/∂τ for τ. (Differentiating the replicated params directly instead
would let shard_map insert a psum itself, and the result would be n · ∂L/∂θ.) The test in
tests/test_train_step.py checks this against a one-device mesh.

Cost: the B × V sparse vectors are gathered (on one accelerator this is free); the per-item
work (tails, sparse head, its gradient) stays local, only the B × B loss is duplicated.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jsds_jax import input_pipeline
from jsds_jax import losses
from jsds_jax import optim
from jsds_jax import pec
from jsds_jax import sharding
from jsds_jax import term_losses
from jsds_jax.models.tail import jsds

P = jax.sharding.PartitionSpec
AXIS = input_pipeline.DATA_AXIS
MODES = ("jsds", "dense_only", "d2s")
_PEC_STREAM = 1  # fold_in of the step key for PEC's draw (dropout uses the step key itself)


@flax.struct.dataclass
class TrainState:
  """Everything a step changes.

  Attributes:
    step: () int32, optimizer steps taken.
    params: the `JSDSTail` params.
    opt_state: the optax state.
    rng: PRNG key; step t uses `fold_in(rng, t)`.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def create_train_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array,
                       mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """A fresh state at step 0, replicated over `mesh` when given.

  The state may share buffers with `params` (`device_put` does not copy what is already in
  place) and the step donates the state: do not read `params` after the first step.
  """
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=rng)
  if mesh is not None:
    # device_put cannot place typed PRNG keys or committed arrays on a mesh spanning processes.
    state = (sharding.replicate(state, mesh) if mesh.is_multi_process
             else jax.device_put(state, input_pipeline.replicated(mesh)))
  return state


# Which vectors the document-frequency penalty sees (`train.loss.df_sides`).
DF_SIDES = ("both", "image", "text")


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """The loss's static settings (`train.mode` and `train.loss` of the config)."""

  mode: str = "jsds"
  w1: float = 0.1
  w2: float = 0.1
  lam1: float = 0.9
  lam2: float = 0.3
  eta_text: float = 5e-4
  eta_image: float = 3e-5
  regularizer: str = "l1"
  reg_warmup_fraction: float = 0.2
  reference_quirks: bool = False
  tau_teacher: float = 1e-3
  official_scale: bool = False
  bow_image: float = 0.0
  bow_text: float = 0.0
  df_weight: float = 0.0
  df_max: float = 0.1
  df_scale: float = 1.0
  df_sides: str = "both"
  df_natural: bool = False
  total_steps: int = 1

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"train.mode must be one of {MODES}, got {self.mode!r}")
    if self.mode == "dense_only" and (self.bow_image or self.bow_text or self.df_weight):
      raise ValueError("train.loss.bow_image / bow_text / df_weight act on sparse vectors: they "
                       "need train.mode 'jsds' or 'd2s', not 'dense_only'")
    if self.df_sides not in DF_SIDES:
      raise ValueError(f"train.loss.df_sides must be one of {DF_SIDES}, got {self.df_sides!r}")

  @property
  def uses_bow(self) -> bool:
    """Whether the loss has a bag-of-words target (it needs the head's logits)."""
    return bool(self.bow_image or self.bow_text)

  @property
  def uses_token_ids(self) -> bool:
    """Whether the loss needs the captions' token ids (a bag-of-words target, or the df
    penalty's natural allowance)."""
    return self.uses_bow or bool(self.df_weight and self.df_natural)

  @classmethod
  def from_config(cls, train: ml_collections.ConfigDict, total_steps: int) -> "LossSettings":
    fields = {f.name for f in dataclasses.fields(cls)} - {"mode", "total_steps"}
    return cls(mode=train.mode, total_steps=int(total_steps),
               **{k: train.loss[k] for k in fields})


# Each encoder: (module, h_img, h_txt, caption token ids or None) -> outputs. h is the cached
# pooled state, or token states in the last_block variant (the ids are then the text block's);
# the module restricts z_t to the captions' own tokens itself (`JSDSTail.own_caption_terms`).


def _dense(m: jsds.JSDSTail, h_img, h_txt, token_ids):
  return m.image_tail(m.pooled_image(h_img)), m.text_tail(m.pooled_text(h_txt, token_ids))


def _encode_dense(m: jsds.JSDSTail, h_img, h_txt, token_ids=None):
  e_i, e_t = _dense(m, h_img, h_txt, token_ids)
  return dict(e_i=e_i, e_t=e_t, tau=m.temperature())


def _encode_d2s(m: jsds.JSDSTail, h_img, h_txt, token_ids=None):
  # The dense side is the frozen teacher: no gradient flows back into it through z.
  e_i, e_t = jax.lax.stop_gradient(_dense(m, h_img, h_txt, token_ids))
  z_i, z_t = m.sparse_terms(e_i, e_t, token_ids)
  return dict(e_i=e_i, e_t=e_t, z_i=z_i, z_t=z_t, tau=m.temperature())


def _encode_all(m: jsds.JSDSTail, h_img, h_txt, token_ids=None):
  return m(h_img, h_txt, token_ids)


def _encode_with_logits(m: jsds.JSDSTail, h_img, h_txt, token_ids=None, *,
                        frozen_dense: bool = False):
  # jsds, or with `frozen_dense` d2s (as `_encode_d2s`), plus the sparse head's logits.
  e_i, e_t = _dense(m, h_img, h_txt, token_ids)
  if frozen_dense:
    e_i, e_t = jax.lax.stop_gradient((e_i, e_t))
  return dict(e_i=e_i, e_t=e_t, tau=m.temperature(),
              **m.sparse_terms_and_logits(e_i, e_t, token_ids))


_ENCODERS = {"jsds": _encode_all, "dense_only": _encode_dense, "d2s": _encode_d2s}
# With a bag-of-words loss: the head's logits too ("l_i", "l_t"; `term_losses.bow_loss`).
_ENCODERS_WITH_LOGITS = {"jsds": _encode_with_logits,
                         "d2s": functools.partial(_encode_with_logits, frozen_dense=True)}


def term_loss(out: dict[str, jax.Array], token_ids: jax.Array | None,
              bow_terms: jax.Array | None, step: jax.Array,
              settings: LossSettings, bow_weights: jax.Array | None = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The term-level losses (`jsds_jax.term_losses`), weighted, with R's factor ½:

    ½·(bow_image·KL(q ‖ softmax(l_i)) + bow_text·KL(q ‖ softmax(l_t)))
      + ½·df_weight(t)·½(DF(z_i) + DF(z_t))

  (with `df_sides` "image" or "text" the penalty is DF of that side alone, not halved; with
  `df_natural` each term's allowance is the share of the batch's captions that hold it).
  q is each caption's bag of content words (weighted by `bow_weights` when given, e.g. idf);
  image k's target is caption k's. df_weight(t)
  warms up as η(t) does (`losses.reg_weight`, `reg_warmup_fraction`): at the start of a run
  from a dense model thousands of terms fire in every vector, and the full penalty then
  emptied the image vectors (measured on the demo, README "Lexical levers").

  Args:
    out: {"z_i", "z_t": (B, V), and with a bow weight the logits "l_i", "l_t": (B, V)}; row
      k of the image side is the image of caption k.
    token_ids: (B, L) caption token ids, -1 at padding; needed when a bow weight or
      df_natural is on.
    bow_terms: (V,) bool, the terms a bag-of-words target may hold, or None (every token).
    step: () optimizer steps taken (the penalty's warm-up).
    settings: the loss settings.
    bow_weights: (V,) float, each term's weight in a target (`term_losses.idf_weights`), or
      None (uniform over the caption's terms).

  Returns:
    (() float, metrics: bow_image_kl / bow_text_kl / df_penalty (unweighted) and df_weight
    (the current weight) for the parts that are on).
  """
  s = settings
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  z_i, z_t = out["z_i"], out["z_t"]
  if s.uses_bow:
    q = term_losses.bow_targets(token_ids, bow_terms, z_t.shape[-1], bow_weights)
    for name, weight, key in (("image", s.bow_image, "l_i"), ("text", s.bow_text, "l_t")):
      if weight:
        kl = term_losses.bow_loss(out[key], q, bow_terms)
        metrics[f"bow_{name}_kl"] = kl
        total = total + 0.5 * weight * kl
  if s.df_weight:
    sides = {"both": (z_i, z_t), "image": (z_i,), "text": (z_t,)}[s.df_sides]
    allowance = (term_losses.natural_df(token_ids, z_t.shape[-1], bow_terms) if s.df_natural
                 else None)
    df = sum(term_losses.df_penalty(z, s.df_max, s.df_scale, allowance)
             for z in sides) / len(sides)
    weight = losses.reg_weight(step, s.total_steps, s.df_weight, s.reg_warmup_fraction)
    metrics.update(df_penalty=df, df_weight=weight)
    total = total + 0.5 * weight * df
  return total, metrics


def loss_from_outputs(out: dict[str, jax.Array], image_idx: jax.Array, step: jax.Array,
                      settings: LossSettings, token_ids: jax.Array | None = None,
                      bow_terms: jax.Array | None = None, bow_weights: jax.Array | None = None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The mode's loss of a (global) batch, plus the term-level losses that are on
  (`term_loss`).

  Args:
    out: {"e_i", "e_t": (B, P), "tau": (), and for jsds/d2s "z_i", "z_t": (B, V); with a
      bow weight also the logits "l_i", "l_t": (B, V)}.
    image_idx: (B,) image row of each pair; captions of one image are each other's positives
      (with `input_pipeline.epoch_order` batches they never share an image).
    step: () optimizer steps taken (the regulariser's warm-up).
    settings: the loss settings.
    token_ids: (B, L) the captions' token ids (-1 at padding), for a bag-of-words target.
    bow_terms: (V,) bool, the terms such a target may hold (None: every token).
    bow_weights: (V,) float, the terms' weights in a target (None: uniform; `term_loss`).

  Returns:
    (loss (), metrics); metrics["total"] includes the term-level losses.
  """
  loss, metrics = _mode_loss(out, image_idx, step, settings)
  if settings.mode == "dense_only" or not (settings.uses_bow or settings.df_weight):
    return loss, metrics
  if settings.uses_token_ids and token_ids is None:
    raise ValueError("train.loss.bow_image / bow_text / df_natural need the captions' token "
                     "ids")
  extra, extra_metrics = term_loss(out, token_ids, bow_terms, step, settings, bow_weights)
  loss = loss + extra
  return loss, dict(metrics, **extra_metrics, total=loss)


def _mode_loss(out, image_idx, step, settings):
  """`loss_from_outputs` without the term-level losses."""
  s = settings
  positives = losses.positives_from_ids(image_idx, image_idx)
  reg_args = dict(eta_t=s.eta_text, eta_i=s.eta_image, step=step, total_steps=s.total_steps,
                  regularizer=s.regularizer, warmup_fraction=s.reg_warmup_fraction)
  if s.mode == "dense_only":
    return losses.dense_only_loss(jsds.dense_scores(out["e_i"], out["e_t"], out["tau"]),
                                  positives)
  s_s = jsds.sparse_scores(out["z_i"], out["z_t"])
  if s.mode == "d2s":
    teacher = jsds.dense_scores(out["e_i"], out["e_t"], 1.0)
    return losses.d2s_loss(s_s, teacher, s.tau_teacher, out["z_i"], out["z_t"], **reg_args)
  s_d = jsds.dense_scores(out["e_i"], out["e_t"], out["tau"])
  return losses.jsds_loss(s_d, s_s, s.w1, s.w2, s.lam1, s.lam2, out["z_i"], out["z_t"],
                          reference_quirks=s.reference_quirks, positive_mask=positives,
                          official_scale=s.official_scale, **reg_args)


def clamp_tau_param(params: Any, module: jsds.JSDSTail) -> Any:
  """params with τ clipped to [tau_min, tau_max]: the official code's in-place
  `temp.clamp_(0.001, 0.5)` before every step, so the stored τ never drifts outside the range
  (the forward pass's straight-through clamp alone lets it; `jsds.clamp_tau`)."""
  return {**params, "tau": jnp.clip(params["tau"], module.tau_min, module.tau_max)}


def _mean_nnz(z: jax.Array) -> jax.Array:
  return jnp.mean(jnp.sum(z > 0, axis=-1).astype(jnp.float32))


def _check_caption_masks(train: ml_collections.ConfigDict, mode: str,
                         own_caption_terms: bool) -> None:
  """PEC and own-caption-terms act on sparse vectors; PEC on images needs PEC.

  Raises:
    ValueError: naming the field and what it needs.
  """
  if train.pec_images and not train.pec:
    raise ValueError("train.pec_images masks images on the steps PEC masks captions: it needs "
                     "train.pec=True")
  if train.pec and mode == "dense_only":
    raise ValueError("train.pec masks sparse vectors: it needs train.mode 'jsds' or 'd2s', "
                     "not 'dense_only'")
  if own_caption_terms and mode == "dense_only":
    raise ValueError("model.own_caption_terms restricts sparse vectors: it needs train.mode "
                     "'jsds' or 'd2s', not 'dense_only'")


def _collectives(mesh: jax.sharding.Mesh) -> tuple[bool, Callable, Callable, Callable]:
  """(single_device, gather, to_varying, mean) for the step's shard_map over 'data'.

  On a one-device mesh every collective is an identity, yet XLA still runs each as a copy (on
  a 2-core CPU the two (B, V) all-gathers, their reduce-scatters and the gradient all-reduce
  took ~50 of ~650 ms per step): there the step calls none of them, and shard_map's
  replication check, which needs them to type the outputs, is off.
  """
  if mesh.shape[AXIS] == 1:
    identity = lambda x: x
    return True, identity, identity, identity
  return (False, lambda x: jax.lax.all_gather(x, AXIS, tiled=True),
          lambda x: jax.lax.pcast(x, AXIS, to="varying"),
          lambda x: jax.lax.pmean(x, AXIS))


def _mask_captions(out: dict[str, jax.Array], token_ids: jax.Array | None,
                   step_rng: jax.Array, pec_prob: jax.Array | None,
                   train: ml_collections.ConfigDict
                   ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """PEC's masking of this device's captions (`train.pec`, with probability `pec_prob`; with
  `train.pec_images` the images too, to their caption's tokens, STAIR-like).

  Returns:
    (the outputs with z_t (and z_i) masked, PEC's metrics pec_prob / pec_masked or {}).
  """
  if not train.pec:
    return out, {}
  pec_rng = jax.random.fold_in(step_rng, _PEC_STREAM)
  if train.pec_images:
    out["z_i"], out["z_t"], masked = pec.mask_pairs(out["z_i"], out["z_t"], token_ids, pec_rng,
                                                    pec_prob)
  else:
    out["z_t"], masked = pec.mask_captions(out["z_t"], token_ids, pec_rng, pec_prob)
  return out, dict(pec_prob=pec_prob, pec_masked=masked)


def make_train_step(module: jsds.JSDSTail, tx: optax.GradientTransformation,
                    train: ml_collections.ConfigDict, total_steps: int,
                    mesh: jax.sharding.Mesh,
                    compiler_options: dict[str, Any] | None = None,
                    bow_terms: Any = None, bow_weights: Any = None,
                    ) -> Callable[..., tuple[TrainState, dict]]:
  """The jitted, sharded train step.

  Args:
    module: the `JSDSTail`; with `own_caption_terms` every caption's vector is restricted to
      its own tokens at every step (jsds / d2s), inside the module.
    tx: the optimizer (`optim.make_optimizer(train, total_steps)`).
    train: the config's `train` section (mode, loss weights, lr schedules for the metrics).
    total_steps: the run's optimizer steps.
    mesh: a mesh with a 'data' axis; the global batch must divide by its size.
    compiler_options: passed to `jax.jit` (tests turn XLA's slow CPU passes off with them).
    bow_terms: (V,) bool, the terms a bag-of-words target may hold (the vocabulary's content
      wordpieces, `lexical.term_classes(vocab)["content"]`); None = every token. Only used
      with `train.loss.bow_image` / `bow_text`.
    bow_weights: (V,) float, the terms' weights in a bag-of-words target
      (`term_losses.idf_weights` of the training captions with `train.loss.bow_idf`); None =
      uniform.

  Returns:
    step(state, features, order, step_in_epoch) -> (state, metrics), where `state` is a
    replicated `TrainState` (donated: do not reuse the argument), `features` the replicated
    `input_pipeline.DeviceFeatures`, `order` the epoch's (steps, B) int32 caption indices from
    `input_pipeline.device_order` (batch axis over 'data'), and `step_in_epoch` the row to
    train on (a Python int or an int32 scalar: it is traced, changing it does not recompile).
    In the last_block variant (the module has `image_block` / `text_block`) a fifth argument
    `streamed` holds the step's token states, batch axis over 'data', in the order of the
    step's row of `order`: {"image_tokens": (B, L_i, D_img), "text_tokens": (B, L_t, D_txt)}
    for the modalities with a block; the features must then carry the caption token ids.
    metrics: () float32 each: the loss's parts (see `jsds_jax.losses`), "loss", "tau",
    "nnz_image" / "nnz_text" (mean nonzeros per sparse vector; jsds and d2s), "grad_norm"
    (after pmean, before clipping), "param_norm", "lr_pretrained", "lr_projections"; with
    `train.pec` also "pec_prob" (p(t)) and "pec_masked" (1 if this step's captions were masked).
    With `train.pec`, a bag-of-words loss or the module's `own_caption_terms` the features must
    carry the caption token ids.
  """
  settings = LossSettings.from_config(train, total_steps)
  encode = (_ENCODERS_WITH_LOGITS if settings.uses_bow else _ENCODERS)[settings.mode]
  scheds = optim.schedules(train, total_steps)
  use_pec = bool(train.pec)
  _check_caption_masks(train, settings.mode, module.own_caption_terms)
  needs_ids = (use_pec or module.text_block is not None or settings.uses_token_ids
               or module.own_caption_terms)
  bow_terms = None if bow_terms is None else jnp.asarray(bow_terms, bool)
  bow_weights = None if bow_weights is None else jnp.asarray(bow_weights, jnp.float32)
  single_device, gather, to_varying, mean = _collectives(mesh)

  def per_device(state: TrainState, features: input_pipeline.DeviceFeatures,
                 order: jax.Array, step_in_epoch: jax.Array, streamed):
    caption_idx = jax.lax.dynamic_index_in_dim(order, step_in_epoch, 0, keepdims=False)
    h_img, h_txt, image_idx = input_pipeline.gather_batch(features, caption_idx)
    if module.image_block is not None:  # last_block: this step's token states, streamed in
      h_img = streamed["image_tokens"]
    if module.text_block is not None:
      h_txt = streamed["text_tokens"]
    image_idx = gather(image_idx)
    step_rng = jax.random.fold_in(state.rng, state.step)
    token_ids = None
    if needs_ids:
      token_ids = input_pipeline.gather_token_ids(features, caption_idx)
    pec_prob = (pec.probability(state.step, total_steps, train.pec_fraction) if use_pec
                else None)

    def loss_fn(params):
      out = module.apply({"params": params}, h_img, h_txt, token_ids, method=encode,
                         rngs={"dropout": step_rng})
      # Before the all-gather: each device masks its own captions.
      out, extra = _mask_captions(out, token_ids, step_rng, pec_prob, train)
      out = {k: (v if k == "tau" else gather(v)) for k, v in out.items()}
      all_ids = gather(token_ids) if settings.uses_token_ids else None
      loss, metrics = loss_from_outputs(out, image_idx, state.step, settings, all_ids,
                                        bow_terms, bow_weights)
      metrics = dict(metrics, loss=loss, tau=out["tau"], **extra)
      if "z_i" in out:
        metrics.update(nnz_image=_mean_nnz(out["z_i"]), nnz_text=_mean_nnz(out["z_t"]))
      return loss, metrics

    # τ clamped in the params first, as the official code does in place before each step.
    params = clamp_tau_param(state.params, module)
    # Per-device gradients of the global loss, then their mean (see the module docstring).
    local_params = to_varying(params)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(local_params)
    grads = mean(grads)
    metrics = mean(metrics)  # identical on every device; makes them invariant
    updates, opt_state = tx.update(grads, state.opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics.update(grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                   **{f"lr_{g}": s(state.step) for g, s in scheds.items()})
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  def sharded(state, features, order, step_in_epoch, streamed=None):
    # The features' spec follows their layout (static): replicated P(), or one shard per
    # device P('data') in multi-process runs (input_pipeline's "sharded" layout).
    if (module.image_block is not None or module.text_block is not None) and streamed is None:
      raise ValueError("the last_block variant needs this step's streamed token states")
    specs = (P(), input_pipeline.features_spec(features), P(None, AXIS), P(), P(AXIS))
    return jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=(P(), P()),
                         check_vma=not single_device)(
        state, features, order, step_in_epoch, streamed)

  return jax.jit(sharded, donate_argnums=(0,), compiler_options=compiler_options)
