"""`losses.cmc_loss` on hand-made scores: the official formula, several golds, padding, gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsds_jax import losses as losses_lib
import testing_utils  # tests/testing_utils.py


class losses:  # pylint: disable=invalid-name
  """`losses_lib.cmc_loss` jitted once per shape, LLVM's expensive passes off (tiny graphs)."""
  jit = staticmethod(functools.partial(
      jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                 "xla_llvm_disable_expensive_passes": True}))
  cmc_loss = staticmethod(jit(losses_lib.cmc_loss, static_argnames=("multi_positive",)))

S = np.array([[2.0, 0.5, -1.0, 0.0],
              [0.1, 0.2, 3.0, -0.5]])
T = np.array([[1.0, 1.5, -0.5, 0.0],
              [0.0, 0.0, 2.0, 1.0]])
GOLD = np.array([[True, False, False, False],
                 [False, False, True, False]])


pytestmark = pytest.mark.usefixtures("x64")


np_log_softmax = testing_utils.np_log_softmax


def test_matches_the_official_distillation_loss():
  """yc-song/cmc `distillation_loss`: alpha·CrossEntropy + (1−alpha)·KLDiv(batchmean), T = 1."""
  torch = pytest.importorskip("torch")
  s, t = torch.tensor(S), torch.tensor(T)
  labels = torch.tensor([0, 2])
  kl = torch.nn.KLDivLoss(reduction="batchmean")(torch.log_softmax(s, 1), torch.softmax(t, 1))
  ce = torch.nn.CrossEntropyLoss()(s, labels)
  want = 0.2 * ce + 0.8 * kl
  got = losses.cmc_loss(S, GOLD, T, alpha=0.2, temperature=1.0)
  np.testing.assert_allclose(float(got["loss"]), float(want), rtol=1e-12)
  np.testing.assert_allclose(float(got["ce"]), float(ce), rtol=1e-12)
  np.testing.assert_allclose(float(got["kl"]), float(kl), rtol=1e-12)
  # A temperature divides both sides before the softmaxes.
  kl2 = torch.nn.KLDivLoss(reduction="batchmean")(torch.log_softmax(s / 2, 1),
                                                  torch.softmax(t / 2, 1))
  got2 = losses.cmc_loss(S, GOLD, T, alpha=0.2, temperature=2.0)
  np.testing.assert_allclose(float(got2["kl"]), float(kl2), rtol=1e-12)


def test_hand_computed_values():
  # Student equal to the teacher: KL = 0, only the CE is left.
  out = losses.cmc_loss(T, GOLD, T, alpha=0.5)
  assert abs(float(out["kl"])) < 1e-12
  ce = -np.mean([np_log_softmax(T)[0, 0], np_log_softmax(T)[1, 2]])
  np.testing.assert_allclose(float(out["loss"]), 0.5 * ce, rtol=1e-12)
  # Two golds in row 0, pooled by log-sum-exp: −log(p_0 + p_1).
  gold2 = GOLD.copy()
  gold2[0, 1] = True
  p = np.exp(np_log_softmax(S))
  want = np.mean([-np.log(p[0, 0] + p[0, 1]), -np.log(p[1, 2])])
  np.testing.assert_allclose(float(losses.cmc_loss(S, gold2, None)["ce"]), want, rtol=1e-12)
  uniform = losses.cmc_loss(S, gold2, None, multi_positive="uniform")["ce"]
  want_u = np.mean([-(np.log(p[0, 0]) + np.log(p[0, 1])) / 2, -np.log(p[1, 2])])
  np.testing.assert_allclose(float(uniform), want_u, rtol=1e-12)
  # No gold among a query's candidates: that row leaves the CE mean.
  nogold = GOLD.copy()
  nogold[1] = False
  np.testing.assert_allclose(float(losses.cmc_loss(S, nogold, None)["ce"]),
                             -np_log_softmax(S)[0, 0], rtol=1e-12)


def test_padding_is_ignored_and_gradients_are_finite():
  valid = np.ones_like(GOLD)
  valid[0, 3] = False
  s_pad, t_pad = S.copy(), T.copy()
  s_pad[0, 3], t_pad[0, 3] = -np.inf, 123.0  # CMC returns -inf at padding
  got = losses.cmc_loss(s_pad, GOLD, t_pad, valid)
  # Row 0 over its 3 real candidates, row 1 over 4: the same as two separate calls.
  r0 = losses.cmc_loss(S[:1, :3], GOLD[:1, :3], T[:1, :3])
  r1 = losses.cmc_loss(S[1:], GOLD[1:], T[1:])
  np.testing.assert_allclose(float(got["ce"]), (float(r0["ce"]) + float(r1["ce"])) / 2,
                             rtol=1e-12)
  np.testing.assert_allclose(float(got["kl"]), (float(r0["kl"]) + float(r1["kl"])) / 2,
                             rtol=1e-12)
  g = losses.jit(jax.grad(lambda s: losses_lib.cmc_loss(jnp.where(valid, s, -jnp.inf), GOLD, T,
                                                        valid)["loss"]))(jnp.asarray(S))
  g = np.asarray(g)
  assert np.all(np.isfinite(g)) and g[0, 3] == 0.0
  # The teacher gets no gradient.
  gt = losses.jit(jax.grad(lambda t: losses_lib.cmc_loss(S, GOLD, t)["loss"]))(jnp.asarray(T))
  assert np.all(np.asarray(gt) == 0.0)
  with pytest.raises(ValueError, match="multi_positive"):
    losses.cmc_loss(S, GOLD, T, multi_positive="max")
