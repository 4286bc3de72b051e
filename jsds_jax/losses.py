"""Training losses: InfoNCE, self-KD, sparsity regularisers; pure functions of score matrices.

Notation follows DESIGN.md §3. Score matrices are (B_i, B_t) with rows = images and columns =
captions; they come from `jsds_jax.models.tail.jsds.{dense,sparse,integrated}_scores`. Every
function here is jit-able (no Python control flow on traced values; the only branches are on
static arguments such as `regularizer` or `reference_quirks`) and computes in at least float32,
so bf16 scores are safe and float64 inputs stay float64 (the tests compare in float64).

Fidelity notes, from reading the official code:

* holi-lab/mm-sparse-retrieval `loss.py` (`BICELoss.forward`, self-supervised, no hard
  negatives): it builds `sinter_i2t = sinter_t2i = w1 * sdense + w2 * slex` (both the
  image-row matrix), computes `p_sinter_t2i = softmax(sinter_t2i, dim=1)` without
  `torch.no_grad`, and distils `distill_loss(sdense.t(), p_sinter_t2i)`. So the caption
  direction is taught by the image-row teacher P_i2t, and gradients flow into the teacher.
  `kd_loss(..., reference_quirks=True)` reproduces exactly that. The same file also divides L
  and L' by `len(pooling)` (= 2 for dense + sparse), i.e. its total is ½(L/2 + L'/2) + ½R;
  DESIGN.md's total = ½(L + L') + ½R does not have that factor and neither does `jsds_loss`
  (only the balance between the loss and R differs). `jsds_loss(..., official_scale=True)`
  (config `train.loss.official_scale`, set by the paper configs) divides by it as well.
  Its regulariser weight is η·(t/T)² with t the number of steps already taken and
  T = int(0.2 · total steps), the L1 term is mean_b Σ_v |z_bv|, and the total adds ½(R_t + R_i).
* thongnt99/lsr-multimodal `train.py` and `model.py` (D2S and PEC): the teacher is
  softmax(S_dense / temp) of the cached (frozen) dense embeddings under `torch.no_grad`, with
  `temp` a parameter that never receives a gradient (default 1e-3); the loss is the soft-target
  cross entropy in both directions, halved, plus ½(R_t + R_i). PEC: `mask_ratio` starts at 1
  and drops by 1/(0.95 · epochs) after each epoch (clipped at 0); each training batch draws ONE
  Bernoulli(mask_ratio) coin, and when it comes up the captions' sparse vectors are multiplied
  by a 0/1 mask of their own token ids (padding excluded through the attention mask; special
  tokens such as [CLS]/[SEP] included). Our PEC is `jsds_jax/pec.py`.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp

from jsds_jax.models.tail import jsds

_REGULARIZERS = ("l1", "flops")
_MULTI_POSITIVE = ("uniform", "lse")


def _at_least_f32(x: Any) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def soft_cross_entropy(logits: jax.Array, target_probs: jax.Array) -> jax.Array:
  """H(P, softmax_row(S)) averaged over rows: mean_i −Σ_j P_ij log softmax(S_i)_j.

  Args:
    logits: (N, M) scores S.
    target_probs: (N, M) rows of a distribution P.

  Returns:
    () float.
  """
  logp = jax.nn.log_softmax(_at_least_f32(logits), axis=-1)
  return -jnp.mean(jnp.sum(_at_least_f32(target_probs) * logp, axis=-1))


def _directional_nce(s: jax.Array, positive_mask: Optional[jax.Array],
                     multi_positive: str) -> jax.Array:
  """One direction of InfoNCE: rows are queries. s (N, M); positive_mask (N, M) bool or None."""
  logp = jax.nn.log_softmax(s, axis=-1)
  if positive_mask is None:
    return -jnp.mean(jnp.diagonal(logp))
  pos = jnp.asarray(positive_mask, bool)
  valid = jnp.any(pos, axis=-1)
  # Rows without any positive (possible when B_i != B_t) drop out of the mean; giving them an
  # all-true mask first keeps their (discarded) value and gradient finite.
  pos = pos | ~valid[:, None]
  if multi_positive == "uniform":
    target = pos.astype(logp.dtype) / jnp.sum(pos, axis=-1, keepdims=True).astype(logp.dtype)
    per_row = -jnp.sum(target * logp, axis=-1)
  else:  # "lse"
    per_row = -jax.nn.logsumexp(jnp.where(pos, logp, -jnp.inf), axis=-1)
  per_row = jnp.where(valid, per_row, 0.0)
  return jnp.sum(per_row) / jnp.maximum(jnp.sum(valid), 1)


def info_nce(s: jax.Array, positive_mask: Optional[jax.Array] = None,
             multi_positive: str = "uniform") -> jax.Array:
  """InfoNCE(S) = ½[CE(S, I) + CE(Sᵀ, I)], optionally with several positives per row.

  Args:
    s: (B_i, B_t) scores, rows = images, columns = captions; square when no mask is given
      (pair k is image k with caption k).
    positive_mask: (B_i, B_t) bool, True where image i and caption j are a matching pair, so
      that two captions of the same image never act as each other's negatives. None means the
      identity, and then the loss is exactly the standard −mean_k log softmax(S_k)_k per
      direction. Rows (or columns) without any positive are left out of that direction's mean.
    multi_positive: how a row with several positives is scored:
      "uniform": cross entropy to the uniform distribution over the row's positives,
        −(1/|P_i|) Σ_{j∈P_i} log softmax(S_i)_j (the target BLIP/ALBEF's own ITC uses);
      "lse": −log Σ_{j∈P_i} softmax(S_i)_j, i.e. positives pooled by log-sum-exp, free to
        share the probability mass in any proportion.
      Both equal the standard loss when every row has a single positive.

  Returns:
    () float, at least float32.
  """
  if multi_positive not in _MULTI_POSITIVE:
    raise ValueError(f"multi_positive must be one of {_MULTI_POSITIVE}, got {multi_positive!r}")
  s = _at_least_f32(s)
  if positive_mask is None and s.shape[0] != s.shape[1]:
    raise ValueError(f"a non-square score matrix {s.shape} needs a positive_mask")
  mask_t = None if positive_mask is None else jnp.asarray(positive_mask).T
  return 0.5 * (_directional_nce(s, positive_mask, multi_positive)
                + _directional_nce(s.T, mask_t, multi_positive))


def kd_loss(s_student: jax.Array, s_teacher: jax.Array, stop_gradient: bool = True,
            reference_quirks: bool = False) -> jax.Array:
  """Self-KD: KD(S) = ½[H(P_i2t, softmax_row(S)) + H(P_t2i, softmax_row(Sᵀ))].

  The teacher distributions are P_i2t = softmax_row(S_teacher) (each image over captions) and
  P_t2i = softmax_row(S_teacherᵀ) (each caption over images). H(P, Q) = mean over rows of
  −Σ_j P_j log Q_j.

  Args:
    s_student: (B, B) student scores S (dense or sparse).
    s_teacher: (B, B) teacher scores (S_int in JSDS).
    stop_gradient: no gradient reaches the teacher (the default, DESIGN.md §3).
    reference_quirks: reproduce holi-lab/mm-sparse-retrieval `loss.py`: the teacher is not
      stopped (this overrides `stop_gradient`) and the caption direction is taught by the
      image-row teacher: H(P_i2t, softmax_row(Sᵀ)). Row k of softmax_row(Sᵀ) is caption k over
      images while row k of P_i2t is image k over captions, so this is a mismatched target;
      kept only for ablations.

  Returns:
    () float.
  """
  s_student = _at_least_f32(s_student)
  s_teacher = _at_least_f32(s_teacher)
  if stop_gradient and not reference_quirks:
    s_teacher = jax.lax.stop_gradient(s_teacher)
  p_i2t = jax.nn.softmax(s_teacher, axis=-1)
  p_t2i = p_i2t if reference_quirks else jax.nn.softmax(s_teacher.T, axis=-1)
  return 0.5 * (soft_cross_entropy(s_student, p_i2t) + soft_cross_entropy(s_student.T, p_t2i))


def l1_reg(z: jax.Array) -> jax.Array:
  """mean_b ‖z_b‖₁. Args: z (B, V). Returns: () float."""
  return jnp.mean(jnp.sum(jnp.abs(_at_least_f32(z)), axis=-1))


def flops_reg(z: jax.Array) -> jax.Array:
  """FLOPS regulariser Σ_v (mean_b |z_bv|)² (Paria et al. 2020). Args: z (B, V). Returns: ()."""
  return jnp.sum(jnp.square(jnp.mean(jnp.abs(_at_least_f32(z)), axis=0)))


def regularizer_fn(name: str):
  """The regulariser called `name` ("l1" or "flops"): a function (B, V) -> ()."""
  if name not in _REGULARIZERS:
    raise ValueError(f"regularizer must be one of {_REGULARIZERS}, got {name!r}")
  return l1_reg if name == "l1" else flops_reg


def reg_weight(step: Any, total_steps: Any, eta: Any, warmup_fraction: float = 0.2) -> jax.Array:
  """η(t) = η·min(1, t/T)² with T = warmup_fraction·total_steps.

  Args:
    step: t, the number of optimizer steps already taken (0 at the first step); int or array.
    total_steps: the run's total steps.
    eta: the final weight η.
    warmup_fraction: T as a fraction of the run; T = 0 means η from the start.

  Returns:
    () float (float32 unless x64 is enabled).
  """
  # `float` is JAX's default float: float32, or float64 where x64 is enabled.
  t = jnp.asarray(step, float)
  warm = jnp.asarray(warmup_fraction, float) * jnp.asarray(total_steps, float)
  frac = jnp.where(warm > 0, jnp.minimum(1.0, t / jnp.where(warm > 0, warm, 1.0)), 1.0)
  return jnp.asarray(eta, float) * jnp.square(frac)


def _regularization(z_i, z_t, eta_t, eta_i, step, total_steps, regularizer, warmup_fraction):
  """R = η_t(t)·reg(z_t) + η_i(t)·reg(z_i) and its parts."""
  reg = regularizer_fn(regularizer)
  reg_t, reg_i = reg(z_t), reg(z_i)
  eta_t_now = reg_weight(step, total_steps, eta_t, warmup_fraction)
  eta_i_now = reg_weight(step, total_steps, eta_i, warmup_fraction)
  r = eta_t_now * reg_t + eta_i_now * reg_i
  return r, dict(reg=r, reg_text=reg_t, reg_image=reg_i, eta_text=eta_t_now, eta_image=eta_i_now)


def jsds_loss(s_d: jax.Array, s_s: jax.Array, w1: Any, w2: Any, lam1: Any, lam2: Any,
              z_i: jax.Array, z_t: jax.Array, eta_t: Any, eta_i: Any, step: Any,
              total_steps: Any, regularizer: str = "l1", reference_quirks: bool = False,
              positive_mask: Optional[jax.Array] = None, multi_positive: str = "uniform",
              warmup_fraction: float = 0.2,
              official_scale: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The joint sparse-dense objective (DESIGN.md §3).

    S_int = w1·S_d + w2·S_s
    L     = λ1·InfoNCE(S_d) + λ2·InfoNCE(S_s) + InfoNCE(S_int)
    L'    = λ1·KD(S_d) + λ2·KD(S_s)            (teacher S_int)
    R     = η_t(t)·reg(z_t) + η_i(t)·reg(z_i)
    total = ½(L + L') + ½R, or ½(L/2 + L'/2) + ½R with `official_scale`

  Args:
    s_d: (B, B) dense scores e_i e_tᵀ / τ.
    s_s: (B, B) sparse scores z_i z_tᵀ.
    w1, w2: () integration weights.
    lam1, lam2: () weights of the dense and sparse terms.
    z_i: (B, V) image sparse vectors. z_t: (B, V) caption sparse vectors.
    eta_t, eta_i: () final regulariser weights for captions and images.
    step, total_steps: for the regulariser warm-up (`reg_weight`).
    regularizer: "l1" (DESIGN.md default) or "flops".
    reference_quirks: KD as the official code does it (see `kd_loss`).
    positive_mask: (B, B) bool for InfoNCE with several positives (see `info_nce`); KD is
      unaffected (its targets are soft already).
    multi_positive: see `info_nce`.
    warmup_fraction: T / total_steps of the regulariser warm-up.
    official_scale: divide L and L' by len(pooling) = 2 as holi-lab/mm-sparse-retrieval's
      `BICELoss` does with dense and sparse both on, so R weighs twice as much against them
      as without (and the clipped gradient is that of a loss half as large).

  Returns:
    (total () float, metrics) with metrics holding every part: infonce_dense, infonce_sparse,
    infonce_int, kd_dense, kd_sparse, loss_sup (L), loss_kd (L'; both after the official
    scale when it is on), reg (R), reg_text and
    reg_image (unweighted), eta_text and eta_image (current weights), total.
  """
  s_int = jsds.integrated_scores(_at_least_f32(s_d), _at_least_f32(s_s), w1, w2)
  nce = lambda s: info_nce(s, positive_mask, multi_positive)
  nce_d, nce_s, nce_int = nce(s_d), nce(s_s), nce(s_int)
  kd_d = kd_loss(s_d, s_int, reference_quirks=reference_quirks)
  kd_s = kd_loss(s_s, s_int, reference_quirks=reference_quirks)
  # The official code's len(pooling): 2 with dense and sparse both on.
  pooling = 2.0 if official_scale else 1.0
  loss_sup = (lam1 * nce_d + lam2 * nce_s + nce_int) / pooling
  loss_kd = (lam1 * kd_d + lam2 * kd_s) / pooling
  r, reg_metrics = _regularization(z_i, z_t, eta_t, eta_i, step, total_steps, regularizer,
                                   warmup_fraction)
  total = 0.5 * (loss_sup + loss_kd) + 0.5 * r
  metrics = dict(infonce_dense=nce_d, infonce_sparse=nce_s, infonce_int=nce_int, kd_dense=kd_d,
                 kd_sparse=kd_s, loss_sup=loss_sup, loss_kd=loss_kd, total=total, **reg_metrics)
  return total, metrics


def dense_only_loss(s_d: jax.Array, positive_mask: Optional[jax.Array] = None,
                    multi_positive: str = "uniform") -> tuple[jax.Array, dict[str, jax.Array]]:
  """The dense-only baseline: InfoNCE(S_d).

  Args:
    s_d: (B_i, B_t) dense scores e_i e_tᵀ / τ.
    positive_mask, multi_positive: see `info_nce`.

  Returns:
    (total (), {"infonce_dense", "total"}).
  """
  total = info_nce(s_d, positive_mask, multi_positive)
  return total, dict(infonce_dense=total, total=total)


def d2s_loss(s_s: jax.Array, s_d_teacher: jax.Array, tau_teacher: Any, z_i: jax.Array,
             z_t: jax.Array, eta_t: Any, eta_i: Any, step: Any, total_steps: Any,
             regularizer: str = "l1",
             warmup_fraction: float = 0.2) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The D2S baseline: the sparse head distilled from a frozen dense teacher, plus ½R.

    KD    = ½[H(softmax_row(T), softmax_row(S_s)) + H(softmax_row(Tᵀ), softmax_row(S_sᵀ))],
            T = S_d_teacher / τ_teacher, under stop-gradient
    total = KD + ½R

  Soft-target cross entropy, as in thongnt99/lsr-multimodal `train.py`: it equals
  KL(teacher ‖ student) plus the teacher's entropy, a constant, so the gradients are the KL's;
  metrics also report the KL itself.

  Args:
    s_s: (B, B) sparse scores z_i z_tᵀ (the student).
    s_d_teacher: (B, B) cosine scores of the frozen dense embeddings, NOT divided by τ.
    tau_teacher: () teacher temperature (1e-3 in lsr-multimodal's default).
    z_i, z_t: (B, V) sparse vectors for the regulariser.
    eta_t, eta_i, step, total_steps, regularizer, warmup_fraction: see `jsds_loss`.

  Returns:
    (total (), metrics: kd_sparse, kl_sparse, reg, reg_text, reg_image, eta_text, eta_image,
    total).
  """
  teacher = jax.lax.stop_gradient(_at_least_f32(s_d_teacher) / tau_teacher)
  kd = kd_loss(s_s, teacher)
  entropy = 0.5 * (soft_cross_entropy(teacher, jax.nn.softmax(teacher, axis=-1))
                   + soft_cross_entropy(teacher.T, jax.nn.softmax(teacher.T, axis=-1)))
  r, reg_metrics = _regularization(z_i, z_t, eta_t, eta_i, step, total_steps, regularizer,
                                   warmup_fraction)
  total = kd + 0.5 * r
  return total, dict(kd_sparse=kd, kl_sparse=kd - entropy, total=total, **reg_metrics)


def positives_from_ids(row_ids: jax.Array, col_ids: jax.Array) -> jax.Array:
  """Positive mask from image ids: True where row i and column j show the same image.

  Args:
    row_ids: (B_i,) int image id of each score row. col_ids: (B_t,) image id of each caption.

  Returns:
    (B_i, B_t) bool.
  """
  return jnp.asarray(row_ids)[:, None] == jnp.asarray(col_ids)[None, :]


def cmc_loss(scores: jax.Array, positive_mask: jax.Array, teacher_scores: Optional[jax.Array],
             valid_mask: Optional[jax.Array] = None, alpha: Any = 0.2, temperature: Any = 1.0,
             multi_positive: str = "lse") -> dict[str, jax.Array]:
  """CMC's loss over each query's candidates: α·CE(scores, gold) + (1 − α)·KL(teacher ‖ student).

  yc-song/cmc `retriever.py` `distillation_loss`: `KLDivLoss(reduction="batchmean")` of
  log_softmax(student / T) against softmax(teacher / T), plus `CrossEntropyLoss` to the gold,
  mixed by α (0.2 and T = 1 in the paper). The official CE has one gold per query; here a query
  may have several (an image's captions), pooled as `multi_positive` says (`info_nce`).

  Args:
    scores: (B, K) the student's (CMC's) scores of each query's K candidates.
    positive_mask: (B, K) bool, True at gold candidates; a query without any gold in its
      candidates drops out of the CE mean (the KL still teaches it).
    teacher_scores: (B, K) the teacher's scores of the same candidates (the first stage's,
      a cross-encoder's); no gradient flows into them. None: CE only (α is then ignored).
    valid_mask: (B, K) bool, False at padded candidates (they get no probability on either
      side); None = all valid.
    alpha: the CE's weight, in [0, 1].
    temperature: T, dividing both sides' scores before the KL's softmaxes (the KL is not
      rescaled by T², as in the official code).
    multi_positive: "lse" or "uniform" (see `info_nce`).

  Returns:
    {"loss", "ce", "kl"}: () floats; loss = α·ce + (1 − α)·kl.
  """
  if multi_positive not in _MULTI_POSITIVE:
    raise ValueError(f"multi_positive must be one of {_MULTI_POSITIVE}, got {multi_positive!r}")
  s = _at_least_f32(scores)
  valid = jnp.ones(s.shape, bool) if valid_mask is None else jnp.asarray(valid_mask, bool)
  # A large finite value rather than -inf: -inf · 0 in the KL's sum would be NaN.
  neg = jnp.asarray(-1e9, s.dtype)
  s = jnp.where(valid, s, neg)
  pos = jnp.asarray(positive_mask, bool) & valid
  ce = _directional_nce(s, pos, multi_positive)
  if teacher_scores is None:
    return {"loss": ce, "ce": ce, "kl": jnp.zeros((), s.dtype)}
  t = jax.lax.stop_gradient(_at_least_f32(teacher_scores))
  t = jnp.where(valid, t, neg)
  logp_s = jax.nn.log_softmax(s / temperature, axis=-1)
  logp_t = jax.nn.log_softmax(t / temperature, axis=-1)
  p_t = jnp.exp(logp_t)
  # batchmean: summed over candidates, averaged over queries; padded terms are exactly 0.
  kl = jnp.sum(jnp.where(valid, p_t * (logp_t - logp_s), 0.0)) / s.shape[0]
  return {"loss": alpha * ce + (1 - alpha) * kl, "ce": ce, "kl": kl}
