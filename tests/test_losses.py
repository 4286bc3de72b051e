"""jsds_jax.losses against a plain float64 NumPy re-implementation, hand-made matrices, gradients.

The JAX side runs in float64 inside `jax.enable_x64(True)` (the `x64` fixture), a context
manager, so the setting does not leak into other test files.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsds_jax import losses
import testing_utils  # tests/testing_utils.py

TOL = 1e-6

# Jitted once at module level: one compile per shape instead of one per primitive, with LLVM's
# expensive passes off (these graphs are tiny), which keeps the file fast on 2 CPU cores.
# Tests reuse a few shapes so the caches hit.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                   "xla_llvm_disable_expensive_passes": True})
info_nce = jit(losses.info_nce, static_argnames=("multi_positive",))
kd_loss = jit(losses.kd_loss, static_argnames=("stop_gradient", "reference_quirks"))
jsds_loss = jit(losses.jsds_loss, static_argnames=("regularizer", "reference_quirks",
                                                   "multi_positive", "warmup_fraction",
                                                   "official_scale"))
d2s_loss = jit(losses.d2s_loss, static_argnames=("regularizer", "warmup_fraction"))


def grads(fns, *args):
  """jax.grad of each fn wrt its first argument, all in one jitted program (one compile)."""
  return [np.asarray(g) for g in jit(lambda *a: tuple(jax.grad(f)(*a) for f in fns))(*args)]


def max_abs(x):
  return float(np.max(np.abs(x)))


pytestmark = pytest.mark.usefixtures("x64")


# ---------------------------------------------------------------- NumPy reference (float64)


np_log_softmax = testing_utils.np_log_softmax


def np_softmax(s):
  return np.exp(np_log_softmax(s))


def np_nce_one_direction(s, pos, mode):
  logp = np_log_softmax(s)
  per_row = []
  for i in range(s.shape[0]):
    cols = np.nonzero(pos[i])[0]
    if len(cols) == 0:
      continue
    if mode == "uniform":
      per_row.append(-logp[i, cols].mean())
    else:
      per_row.append(-np.log(np.exp(logp[i, cols]).sum()))
  return float(np.mean(per_row))


def np_info_nce(s, pos=None, mode="uniform"):
  if pos is None:
    pos = np.eye(s.shape[0], dtype=bool)
  return 0.5 * (np_nce_one_direction(s, pos, mode) + np_nce_one_direction(s.T, pos.T, mode))


def np_soft_ce(s, p):
  return float(-(p * np_log_softmax(s)).sum(axis=1).mean())


def np_kd(s, teacher, quirks=False):
  p_i2t = np_softmax(teacher)
  p_t2i = p_i2t if quirks else np_softmax(teacher.T)
  return 0.5 * (np_soft_ce(s, p_i2t) + np_soft_ce(s.T, p_t2i))


def np_l1(z):
  return float(np.abs(z).sum(axis=1).mean())


def np_flops(z):
  return float((np.abs(z).mean(axis=0) ** 2).sum())


def np_reg_weight(step, total, eta, frac=0.2):
  big_t = frac * total
  return eta * min(1.0, step / big_t) ** 2


def np_jsds(s_d, s_s, w1, w2, lam1, lam2, z_i, z_t, eta_t, eta_i, step, total, reg, quirks,
            pos=None, mode="uniform"):
  s_int = w1 * s_d + w2 * s_s
  big_l = (lam1 * np_info_nce(s_d, pos, mode) + lam2 * np_info_nce(s_s, pos, mode)
           + np_info_nce(s_int, pos, mode))
  big_lp = lam1 * np_kd(s_d, s_int, quirks) + lam2 * np_kd(s_s, s_int, quirks)
  regf = np_l1 if reg == "l1" else np_flops
  big_r = (np_reg_weight(step, total, eta_t) * regf(z_t)
           + np_reg_weight(step, total, eta_i) * regf(z_i))
  return 0.5 * (big_l + big_lp) + 0.5 * big_r, big_l, big_lp, big_r


# ------------------------------------------------------------------------------ helpers


def rand_batch(seed, b=6, v=24, p=8):
  rng = np.random.default_rng(seed)
  e_i = rng.normal(size=(b, p))
  e_t = rng.normal(size=(b, p))
  e_i /= np.linalg.norm(e_i, axis=1, keepdims=True)
  e_t /= np.linalg.norm(e_t, axis=1, keepdims=True)
  s_d = e_i @ e_t.T / 0.07
  z_i = np.maximum(rng.normal(size=(b, v)), 0.0)
  z_t = np.maximum(rng.normal(size=(b, v)), 0.0)
  s_s = z_i @ z_t.T
  return s_d, s_s, z_i, z_t


def f64(x):
  return jnp.asarray(x, jnp.float64)


# -------------------------------------------------------------------------------- InfoNCE


@pytest.mark.parametrize("seed", [0, 1])
def test_info_nce_matches_numpy(seed):
  s = np.random.default_rng(seed).normal(scale=3.0, size=(6, 6))
  got = float(info_nce(f64(s)))
  assert abs(got - np_info_nce(s)) < TOL


def test_info_nce_known_values():
  b = 6
  assert float(info_nce(f64(50.0 * np.eye(b)))) < 1e-6   # perfect diagonal
  assert abs(float(info_nce(f64(np.zeros((b, b))))) - np.log(b)) < 1e-12  # uniform
  # Anti-diagonal-ish: every positive scores below all negatives -> loss above log B.
  assert float(info_nce(f64(-5.0 * np.eye(b)))) > np.log(b)


# Both multi-positive modes from one compiled program.
nce_modes = jit(lambda s, pos: (losses.info_nce(s, pos, "uniform"), losses.info_nce(s, pos, "lse")))


def test_identity_mask_is_the_standard_loss():
  s = np.random.default_rng(3).normal(size=(6, 6))
  std = float(info_nce(f64(s)))
  for masked in nce_modes(f64(s), np.eye(6, dtype=bool)):
    assert abs(std - float(masked)) < 1e-12


def test_multi_positive_matches_numpy():
  rng = np.random.default_rng(4)
  # Captions 0 and 1 show image 0 (rows 0 and 1 are that image twice); row 5 of a 6x5 matrix
  # has no caption in the batch and must drop out of the image->caption mean.
  img_of_row = np.array([0, 0, 1, 2, 3, 9])
  img_of_col = np.array([0, 0, 1, 2, 3])
  pos = img_of_row[:, None] == img_of_col[None, :]
  s = rng.normal(scale=2.0, size=(6, 5))
  uniform, lse = nce_modes(f64(s), pos)
  assert abs(float(uniform) - np_info_nce(s, pos, "uniform")) < TOL
  assert abs(float(lse) - np_info_nce(s, pos, "lse")) < TOL
  assert abs(float(uniform) - float(lse)) > 1e-3
  np.testing.assert_array_equal(losses.positives_from_ids(img_of_row, img_of_col), pos)


def test_multi_positive_hand_made():
  # Two captions of one image, both scored high; the other pair clean.
  s = np.array([[20.0, 20.0, 0.0],
                [0.0, 0.0, 20.0]])
  pos = np.array([[True, True, False],
                  [False, False, True]])
  uniform, lse = nce_modes(f64(s), pos)
  assert float(lse) < 1e-6                           # positives share the mass freely
  # Image 0 spreads its mass evenly over its 2 positives: the i2t half pays log 2 for row 0.
  assert abs(float(uniform) - 0.5 * (0.5 * np.log(2.0))) < 1e-6


def test_co_positive_is_not_pushed_down():
  s = np.random.default_rng(5).normal(size=(6, 6))
  pos = np.eye(6, dtype=bool)
  pos[0, 1] = pos[1, 0] = pos[1, 1] = pos[0, 0] = True  # captions 0, 1 of the same image
  g_std, g_lse = grads([losses.info_nce, lambda x: losses.info_nce(x, pos, "lse")], f64(s))
  assert g_std[0, 1] > 0       # standard InfoNCE treats caption 1 as image 0's negative
  assert g_lse[0, 1] <= 0      # with the mask it is a positive: never pushed down


def test_non_square_without_mask_fails():
  with pytest.raises(ValueError):
    info_nce(np.zeros((3, 4)))


# ------------------------------------------------------------------------------------- KD


@pytest.mark.parametrize("quirks", [False, True])
def test_kd_matches_numpy(quirks):
  rng = np.random.default_rng(6)
  s, t = rng.normal(scale=2.0, size=(2, 6, 6))
  got = float(kd_loss(f64(s), f64(t), reference_quirks=quirks))
  assert abs(got - np_kd(s, t, quirks)) < TOL


def test_kd_quirk_differs_and_identical_teacher_is_minimum():
  rng = np.random.default_rng(7)
  s, t = rng.normal(scale=2.0, size=(2, 6, 6))
  assert abs(float(kd_loss(f64(s), f64(t), reference_quirks=True))
             - float(kd_loss(f64(s), f64(t)))) > 1e-3
  # Student == teacher: KD equals the teacher's entropy, the minimum over students.
  at_teacher = float(kd_loss(f64(t), f64(t)))
  assert at_teacher <= float(kd_loss(f64(s), f64(t)))
  g, = grads([lambda x: losses.kd_loss(x, f64(t))], f64(t))
  assert max_abs(g) < 1e-12


def test_kd_teacher_gradient():
  rng = np.random.default_rng(8)
  s, t = rng.normal(size=(2, 6, 6))
  g, g_q, g_ns = grads([lambda x: losses.kd_loss(f64(s), x),
                        lambda x: losses.kd_loss(f64(s), x, reference_quirks=True),
                        lambda x: losses.kd_loss(f64(s), x, stop_gradient=False)], f64(t))
  assert max_abs(g) == 0.0
  assert max_abs(g_q) > 1e-4
  assert max_abs(g_ns) > 1e-4


@pytest.mark.parametrize("quirks", [False, True])
def test_integrated_teacher_gets_no_gradient_from_kd(quirks):
  s_d, s_s, _, _ = map(f64, rand_batch(9))

  def kd_part(w):  # L' with the teacher built from w1, w2 and the same inputs
    s_int = w[0] * s_d + w[1] * s_s
    return (0.9 * losses.kd_loss(s_d, s_int, reference_quirks=quirks)
            + 0.3 * losses.kd_loss(s_s, s_int, reference_quirks=quirks))

  def total(w):
    zeros = jnp.zeros((6, 3), jnp.float64)
    return losses.jsds_loss(s_d, s_s, w[0], w[1], 0.9, 0.3, zeros, zeros, 1e-3, 1e-3, 0, 100,
                            reference_quirks=quirks)[0]

  def nce_int(w):
    return 0.5 * losses.info_nce(w[0] * s_d + w[1] * s_s)

  g_kd, g_total, g_nce = grads([kd_part, total, nce_int], f64([0.1, 0.2]))
  # Through the full loss, w1, w2 get only the InfoNCE(S_int) gradient unless quirks are on.
  if quirks:
    assert max_abs(g_kd) > 1e-4
    assert max_abs(g_total - g_nce) > 1e-4
  else:
    assert max_abs(g_kd) == 0.0
    np.testing.assert_allclose(g_total, g_nce, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ regularisers


def test_regularisers_match_numpy():
  _, _, z_i, _ = rand_batch(10)
  assert abs(float(losses.l1_reg(f64(z_i))) - np_l1(z_i)) < TOL
  assert abs(float(losses.flops_reg(f64(z_i))) - np_flops(z_i)) < TOL
  z = np.array([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
  assert float(losses.l1_reg(f64(z))) == 3.0          # (3 + 3) / 2
  assert float(losses.flops_reg(f64(z))) == 5.0       # column means (2, 0, 1): 4 + 0 + 1


def test_reg_weight_warmup():
  total, eta = 1000, 5e-4
  big_t = 0.2 * total
  for step, want in [(0, 0.0), (big_t / 2, eta / 4), (big_t, eta), (2 * big_t, eta)]:
    assert abs(float(losses.reg_weight(step, total, eta)) - want) < 1e-15
  traced = jax.jit(lambda s: losses.reg_weight(s, total, eta))(jnp.asarray(100))
  assert abs(float(traced) - eta / 4) < 1e-15
  assert float(losses.reg_weight(0, total, eta, warmup_fraction=0.0)) == eta
  with pytest.raises(ValueError):
    losses.regularizer_fn("l2")


# ------------------------------------------------------------------------------- full losses


@pytest.mark.parametrize("reg,quirks", [("l1", False), ("l1", True), ("flops", False)])
def test_jsds_loss_matches_numpy(reg, quirks):
  s_d, s_s, z_i, z_t = rand_batch(11)
  args = (0.1, 0.2, 0.9, 0.3)
  step, total = 70, 1000
  want, big_l, big_lp, big_r = np_jsds(s_d, s_s, *args, z_i, z_t, 5e-4, 3e-5, step, total, reg,
                                       quirks)
  got, m = jsds_loss(f64(s_d), f64(s_s), *args, f64(z_i), f64(z_t), 5e-4, 3e-5, step,
                     total, regularizer=reg, reference_quirks=quirks)
  assert abs(float(got) - want) < TOL
  assert abs(float(m["total"]) - want) < TOL
  assert abs(float(m["loss_sup"]) - big_l) < TOL
  assert abs(float(m["loss_kd"]) - big_lp) < TOL
  assert abs(float(m["reg"]) - big_r) < TOL
  s_int = 0.1 * s_d + 0.2 * s_s
  assert abs(float(m["infonce_dense"]) - np_info_nce(s_d)) < TOL
  assert abs(float(m["infonce_sparse"]) - np_info_nce(s_s)) < TOL
  assert abs(float(m["infonce_int"]) - np_info_nce(s_int)) < TOL
  assert abs(float(m["kd_dense"]) - np_kd(s_d, s_int, quirks)) < TOL
  assert abs(float(m["kd_sparse"]) - np_kd(s_s, s_int, quirks)) < TOL
  regf = np_l1 if reg == "l1" else np_flops
  assert abs(float(m["reg_text"]) - regf(z_t)) < TOL
  assert abs(float(m["reg_image"]) - regf(z_i)) < TOL
  assert abs(float(m["eta_text"]) - np_reg_weight(step, total, 5e-4)) < 1e-15


def _official_bice_total(s_d, s_s, z_i, z_t, w1, w2, lam1, lam2, eta_t, eta_i, step, total):
  """holi-lab/mm-sparse-retrieval `BICELoss.forward` (self-supervised, no hard negatives,
  pooling = ["dense", "sparse"]) and its `L1` regularisers, transcribed line by line in torch:
  the returned `loss + reg` is what its training step minimises."""
  import torch  # pylint: disable=g-import-not-at-top
  t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float64)
  sdense, slex, zi, zt = t(s_d), t(s_s), t(z_i), t(z_t)
  b = sdense.shape[0]
  idxs = torch.arange(b)
  ce = torch.nn.CrossEntropyLoss()
  info_nce = lambda s: 0.5 * (ce(s, idxs) + ce(s.T, idxs))
  distill = lambda s, p: -(p * torch.log_softmax(s, dim=1)).sum(dim=1).mean()
  pooling = ["dense", "sparse"]
  l_dense, l_lex = info_nce(sdense), info_nce(slex)
  sinter_i2t = w1 * sdense + w2 * slex
  sinter_t2i = w1 * sdense + w2 * slex
  p_i2t, p_t2i = torch.softmax(sinter_i2t, dim=1), torch.softmax(sinter_t2i, dim=1)
  ld_dense = 0.5 * (distill(sdense, p_i2t) + distill(sdense.t(), p_t2i))
  ld_lex = 0.5 * (distill(slex, p_i2t) + distill(slex.t(), p_t2i))
  l_inter = 0.5 * (info_nce(sinter_t2i) + info_nce(sinter_i2t))
  big_l = (lam1 * l_dense + lam2 * l_lex + l_inter) / len(pooling)
  big_lp = (lam1 * ld_dense + lam2 * ld_lex) / len(pooling)
  loss = 0.5 * (big_l + big_lp)
  # L1.forward after `step` calls of Regularizer.step(): weight_t = weight_T·(t/T)², T = 20%.
  warm = int(0.2 * total)
  weight = lambda eta: eta * (min(step, warm) / warm) ** 2
  text_reg = torch.abs(zt * weight(eta_t)).sum(dim=1).mean()
  img_reg = torch.abs(zi * weight(eta_i)).sum(dim=1).mean()
  return float(loss + 0.5 * (text_reg + img_reg))


@pytest.mark.parametrize("step", [70, 400])
def test_official_scale_matches_the_official_loss(step):
  s_d, s_s, z_i, z_t = rand_batch(13)
  z_i, z_t = z_i * 20, z_t * 20  # a regulariser large enough that its weight matters
  args = (0.1, 0.2, 0.9, 0.3)
  total = 1000
  want = _official_bice_total(s_d, s_s, z_i, z_t, *args, 5e-4, 3e-5, step, total)
  got, m = jsds_loss(f64(s_d), f64(s_s), *args, f64(z_i), f64(z_t), 5e-4, 3e-5, step, total,
                     reference_quirks=True, official_scale=True)
  assert abs(float(got) - want) < TOL
  # Without the official scale L and L' count twice: the totals differ by ½(L + L')/2.
  plain, m_plain = jsds_loss(f64(s_d), f64(s_s), *args, f64(z_i), f64(z_t), 5e-4, 3e-5, step,
                             total, reference_quirks=True)
  assert abs(float(m_plain["reg"]) - float(m["reg"])) < 1e-15
  assert abs(float(m_plain["loss_sup"]) - 2 * float(m["loss_sup"])) < TOL
  assert abs((float(plain) - float(got)) - 0.5 * (float(m["loss_sup"]) + float(m["loss_kd"]))) \
      < TOL


def test_jsds_loss_multi_positive_and_jit():
  s_d, s_s, z_i, z_t = rand_batch(12)
  pos = losses.positives_from_ids(np.array([0, 0, 1, 2, 3, 4]), np.array([0, 0, 1, 2, 3, 4]))
  want = np_jsds(s_d, s_s, 0.2, 0.5, 0.9, 0.3, z_i, z_t, 1e-5, 3e-5, 500, 1000, "l1", False,
                 np.asarray(pos))[0]
  got, _ = jsds_loss(f64(s_d), f64(s_s), 0.2, 0.5, 0.9, 0.3, f64(z_i), f64(z_t), 1e-5, 3e-5,
                     jnp.asarray(500), 1000, positive_mask=pos)
  assert abs(float(got) - want) < TOL


def test_dense_only_loss():
  s_d, _, _, _ = rand_batch(13)
  total, m = losses.dense_only_loss(f64(s_d))
  assert abs(float(total) - np_info_nce(s_d)) < TOL
  assert set(m) == {"infonce_dense", "total"}


def test_d2s_loss_matches_numpy():
  s_d, s_s, z_i, z_t = rand_batch(14)
  cos = s_d * 0.07          # the teacher takes raw cosines and its own temperature
  tau_t = 0.05
  teacher = cos / tau_t
  kd = 0.5 * (np_soft_ce(s_s, np_softmax(teacher)) + np_soft_ce(s_s.T, np_softmax(teacher.T)))
  ent = 0.5 * (np_soft_ce(teacher, np_softmax(teacher)) + np_soft_ce(teacher.T,
                                                                     np_softmax(teacher.T)))
  step, total = 150, 1000
  big_r = np_reg_weight(step, total, 1e-3) * np_l1(z_t) + np_reg_weight(step, total, 2e-3) * np_l1(
      z_i)
  got, m = d2s_loss(f64(s_s), f64(cos), tau_t, f64(z_i), f64(z_t), 1e-3, 2e-3, step, total)
  assert abs(float(got) - (kd + 0.5 * big_r)) < TOL
  assert abs(float(m["kl_sparse"]) - (kd - ent)) < TOL
  assert float(m["kl_sparse"]) >= 0.0
  # The dense teacher is frozen: no gradient reaches its scores.
  g, = grads([lambda c: losses.d2s_loss(f64(s_s), c, tau_t, f64(z_i), f64(z_t), 1e-3, 2e-3,
                                        step, total)[0]], f64(cos))
  assert max_abs(g) == 0.0
