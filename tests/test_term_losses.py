"""Term-level losses (jsds_jax/term_losses.py) on hand-made vectors, and the train step with them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsds_jax import config_base
from jsds_jax import term_losses
from jsds_jax import train_step
from jsds_jax.models.tail import jsds
import testing_utils  # tests/testing_utils.py

_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def test_bow_targets_are_uniform_over_each_captions_distinct_allowed_terms():
  ids = jnp.asarray([[3, 5, 5, 1, -1],    # 5 twice, 1 not allowed, padding
                     [1, 1, -1, -1, -1],  # nothing allowed: no target
                     [0, 7, 2, 9, 4]])    # token 0 is a real token here
  allowed = np.ones(10, bool)
  allowed[1] = False
  q = np.asarray(term_losses.bow_targets(ids, allowed, 10))
  want = np.zeros((3, 10), np.float32)
  want[0, [3, 5]] = 0.5
  want[2, [0, 7, 2, 9, 4]] = 0.2
  np.testing.assert_allclose(q, want)
  # No allowed mask: every real token, padding still excluded.
  q_all = np.asarray(term_losses.bow_targets(ids, None, 10))
  np.testing.assert_allclose(q_all[0, [1, 3, 5]], 1 / 3)
  assert q_all[0].sum() == pytest.approx(1.0) and q_all[1, 1] == 1.0


def test_bow_targets_follow_term_weights_and_idf_weighs_common_words_less():
  ids = jnp.asarray([[3, 5, 1, -1],
                     [3, 6, -1, -1],
                     [3, 3, 2, -1]])
  idf = np.asarray(term_losses.idf_weights(ids, 8))
  # df: 3 in all three captions, 5/6/1/2 in one, the rest in none; idf = log((1+N)/(1+df)).
  np.testing.assert_allclose(idf[[3, 5, 0]], np.log([4 / 4, 4 / 2, 4 / 1]), rtol=1e-6)
  allowed = np.ones(8, bool)
  allowed[1] = False
  q = np.asarray(term_losses.bow_targets(ids, allowed, 8, idf))
  # Row 0: 3 weighs 0 (in every caption), 5 takes the whole target; row 2 likewise for 2.
  np.testing.assert_allclose(q[0], np.eye(8)[5], atol=1e-7)
  np.testing.assert_allclose(q[2], np.eye(8)[2], atol=1e-7)
  w = np.arange(8, dtype=np.float32)
  q_w = np.asarray(term_losses.bow_targets(ids, allowed, 8, w))
  np.testing.assert_allclose(q_w[1, [3, 6]], [3 / 9, 6 / 9], rtol=1e-6)
  # A caption whose terms all weigh 0 has no target (all zero, no NaN).
  q_0 = np.asarray(term_losses.bow_targets(ids[2:], allowed, 8, np.zeros(8)))
  assert np.all(q_0 == 0)


def _logits_for(p):
  """Logits whose softmax is p (p > 0 where finite, -inf where p = 0)."""
  p = np.asarray(p, np.float64)
  return np.where(p > 0, np.log(np.where(p > 0, p, 1.0)) + 3.0, -np.inf).astype(np.float32)


def test_bow_loss_is_the_kl_from_the_target_to_the_softmax():
  q = np.zeros((2, 6), np.float32)
  q[0, [1, 2]] = 0.5
  q[1, [4]] = 1.0
  # Softmax equal to q on each row (other terms at -inf): KL 0.
  assert float(term_losses.bow_loss(_logits_for(q), q)) == pytest.approx(0.0, abs=1e-6)
  # Row 0 at p = (.., 0.25, 0.75, ..), row 1 at p_4 = 0.5: the mean of the two KLs.
  p = np.zeros((2, 6))
  p[0, [1, 2]] = 0.25, 0.75
  p[1, [4, 5]] = 0.5
  want = 0.5 * ((0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)) + np.log(2.0))
  assert float(term_losses.bow_loss(_logits_for(p), q)) == pytest.approx(want, rel=1e-5)


def test_bow_loss_ignores_the_logits_level_masked_terms_and_rows_without_a_target():
  rng = np.random.default_rng(0)
  l = rng.normal(size=(3, 8)).astype(np.float32)
  q = np.zeros((3, 8), np.float32)
  q[0, [0, 3]] = 0.5
  q[2, 6] = 1.0
  loss = float(term_losses.bow_loss(l, q))
  assert loss > 0.1
  # A shift of every logit (the level the L1 regulariser sets) changes nothing.
  assert float(term_losses.bow_loss(l - 4.0, q)) == pytest.approx(loss, rel=1e-5)
  # Row 1 has no target: changing it changes nothing; the mean is over rows 0 and 2.
  l2 = l.copy()
  l2[1] = 100.0
  assert float(term_losses.bow_loss(l2, q)) == pytest.approx(loss, rel=1e-6)
  row0 = float(term_losses.bow_loss(l[:1], q[:1]))
  row2 = float(term_losses.bow_loss(l[2:], q[2:]))
  assert loss == pytest.approx((row0 + row2) / 2, rel=1e-5)
  assert float(term_losses.bow_loss(l, np.zeros_like(q))) == 0.0
  # Masked terms are out of the softmax: a huge logit there no longer costs anything.
  allowed = np.ones(8, bool)
  allowed[7] = False
  l3 = l.copy()
  l3[:, 7] = 50.0
  assert float(term_losses.bow_loss(l3, q)) > loss + 10
  assert float(term_losses.bow_loss(l3, q, allowed)) == pytest.approx(
      float(term_losses.bow_loss(l[:, :7], q[:, :7])), rel=1e-5)
  g = jax.grad(lambda x: term_losses.bow_loss(x, q, allowed))(jnp.asarray(l3))
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[:, 7] == 0)


def test_bow_loss_gradient_raises_the_target_even_below_zero_and_lowers_the_top_other():
  # The target (term 0) is negative, i.e. z = 0 there: it still gets a gradient.
  l = jnp.asarray([[-1.0, 2.0, 0.5, -3.0]])
  q = jnp.asarray([[1.0, 0.0, 0.0, 0.0]])
  g = np.asarray(jax.grad(lambda x: term_losses.bow_loss(x, q))(l))[0]
  assert g[0] < 0                      # raise the caption's word
  assert g[1] > g[2] > g[3] > 0        # lower the others, the highest most


def test_df_penalty_hits_only_terms_shared_by_more_than_the_share():
  b, v = 20, 5
  z = np.zeros((b, v), np.float32)
  z[:, 0] = 3.0     # fires everywhere
  z[:4, 1] = 3.0    # 20% of the batch
  z[:2, 2] = 3.0    # 10%: at the threshold
  z[0, 3] = 30.0    # one vector, large
  df = np.asarray(term_losses.soft_document_frequency(z, 1.0))
  t = np.tanh(3.0)
  np.testing.assert_allclose(df, [t, 0.2 * t, 0.1 * t, np.tanh(30.0) / b, 0.0], rtol=1e-6)
  pen = float(term_losses.df_penalty(z, 0.1, 1.0))
  assert pen == pytest.approx((t - 0.1) + (0.2 * t - 0.1), rel=1e-5)
  g = np.asarray(jax.grad(lambda x: term_losses.df_penalty(x, 0.1, 1.0))(jnp.asarray(z)))
  assert np.all(g[:, 0] > 0) and np.all(g[:4, 1] > 0)
  assert np.all(g[:, 2:] == 0)  # rare terms, however large, are left alone
  # A larger scale κ makes the same weights count as rarer.
  assert float(term_losses.df_penalty(z, 0.1, 10.0)) < pen
  # An allowance per term (the share of captions that say it) lifts that term's threshold.
  allowance = np.array([0.0, 0.2, 0.0, 0.0, 0.0], np.float32)
  assert float(term_losses.df_penalty(z, 0.1, 1.0, allowance)) == pytest.approx(t - 0.1,
                                                                                rel=1e-5)


def test_natural_df_is_the_share_of_captions_holding_each_allowed_term():
  ids = jnp.asarray([[1, 2, 2, -1], [2, 3, -1, -1], [4, -1, -1, -1], [-1, -1, -1, -1]])
  np.testing.assert_allclose(term_losses.natural_df(ids, 6), [0, 0.25, 0.5, 0.25, 0.25, 0])
  allowed = jnp.asarray([True, True, False, True, True, True])
  np.testing.assert_allclose(term_losses.natural_df(ids, 6, allowed),
                             [0, 0.25, 0, 0.25, 0.25, 0])


# ----------------------------------------------------------------------------------------------
# In the train step.

N_IMG, D_IMG, D_TXT, P, V, DW, B, L = 16, 12, 12, 8, 60, 16, 8, 5


def _train_config(mode="jsds", lr=None, **loss):
  tc = config_base.base_config().train
  tc.mode, tc.batch_size, tc.warmup_fraction = mode, B, 0.0
  if lr:
    tc.pretrained.lr = tc.projections.lr = lr
  tc.loss.reg_warmup_fraction = 0.0
  for k, v in loss.items():
    tc.loss[k] = v
  return tc


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, V, size=(N_IMG, L)).astype(np.int32)
  ids[:, -1] = -1
  data = dict(image=rng.normal(size=(N_IMG, D_IMG)).astype(np.float32),
              text=rng.normal(size=(N_IMG, D_TXT)).astype(np.float32),
              cap_img=np.arange(N_IMG), ids=ids)
  module = jsds.JSDSTail(embed_dim=P, vocab_size=V, word_dim=DW)
  init = jax.jit(module.init, compiler_options=_FAST)
  params = init(jax.random.key(1), jnp.zeros((1, D_IMG)), jnp.zeros((1, D_TXT)))["params"]
  allowed = np.ones(V, bool)
  allowed[:10] = False  # "junk" terms a target may not hold
  return data, module, params, allowed


def _run(setup, n_devices, steps, **loss):
  data, module, params, allowed = setup
  return testing_utils.run_train_steps(data, module, params, _train_config(**loss),
                                       n_devices, steps, B, _FAST, bow_terms=allowed)


@pytest.mark.parametrize("mode", ["jsds", "d2s"])
def test_step_loss_adds_the_weighted_term_losses(setup, mode):
  data, module, params, allowed = setup
  loss = dict(bow_image=0.7, bow_text=0.3, df_weight=2.0, df_max=0.05)
  _, history, order = _run(setup, 1, 1, mode=mode, **loss)
  caps = order[0]
  out = module.apply({"params": params}, data["image"][caps], data["text"][caps])
  plain = train_step.LossSettings.from_config(_train_config(mode), 1)
  base, _ = train_step.loss_from_outputs(out, jnp.asarray(caps), jnp.int32(0), plain)
  q = term_losses.bow_targets(jnp.asarray(data["ids"][caps]), allowed, V)
  e_i, e_t = out["e_i"], out["e_t"]
  logits = module.apply({"params": params}, e_i, e_t, method=module.sparse_terms_and_logits)
  np.testing.assert_allclose(logits["z_i"], out["z_i"], rtol=1e-6, atol=1e-6)
  kl_i = term_losses.bow_loss(logits["l_i"], q, allowed)
  kl_t = term_losses.bow_loss(logits["l_t"], q, allowed)
  df = 0.5 * (term_losses.df_penalty(out["z_i"], 0.05, 1.0)
              + term_losses.df_penalty(out["z_t"], 0.05, 1.0))
  assert float(kl_i) > 0.1 and float(df) > 0.01  # the hand-made batch exercises every part
  want = base + 0.5 * (0.7 * kl_i + 0.3 * kl_t) + 0.5 * 2.0 * df
  np.testing.assert_allclose(history[0]["loss"], want, rtol=1e-5)
  np.testing.assert_allclose(history[0]["total"], want, rtol=1e-5)
  np.testing.assert_allclose(history[0]["bow_image_kl"], kl_i, rtol=1e-5)
  np.testing.assert_allclose(history[0]["df_penalty"], df, rtol=1e-5)


@pytest.mark.parametrize("side", ["image", "text"])
def test_df_penalty_on_one_side_only(setup, side):
  data, module, params, allowed = setup
  _, history, order = _run(setup, 1, 1, df_weight=2.0, df_max=0.05, df_sides=side)
  caps = order[0]
  out = module.apply({"params": params}, data["image"][caps], data["text"][caps])
  df = term_losses.df_penalty(out["z_i" if side == "image" else "z_t"], 0.05, 1.0)
  np.testing.assert_allclose(history[0]["df_penalty"], df, rtol=1e-5)
  both = 0.5 * (term_losses.df_penalty(out["z_i"], 0.05, 1.0)
                + term_losses.df_penalty(out["z_t"], 0.05, 1.0))
  assert abs(float(df) - float(both)) > 1e-3  # the batch tells the sides apart
  with pytest.raises(ValueError, match="df_sides must be one of"):
    train_step.LossSettings.from_config(_train_config(df_sides="images"), 1)


def test_df_penalty_with_the_natural_allowance(setup):
  data, module, params, allowed = setup
  _, history, order = _run(setup, 1, 1, df_weight=2.0, df_max=0.05, df_sides="image",
                           df_natural=True)
  caps = order[0]
  out = module.apply({"params": params}, data["image"][caps], data["text"][caps])
  natural = term_losses.natural_df(jnp.asarray(data["ids"][caps]), V, allowed)
  df = term_losses.df_penalty(out["z_i"], 0.05, 1.0, natural)
  np.testing.assert_allclose(history[0]["df_penalty"], df, rtol=1e-5)
  plain = term_losses.df_penalty(out["z_i"], 0.05, 1.0)
  assert float(plain) - float(df) > 1e-3  # the batch's captions hold terms that fire


def test_step_uses_the_given_bow_weights(setup):
  data, module, params, allowed = setup
  weights = np.linspace(0.0, 2.0, V).astype(np.float32)
  _, history, order = testing_utils.run_train_steps(
      data, module, params, _train_config(bow_image=1.0), 1, 1, B, _FAST, bow_terms=allowed,
      bow_weights=weights)
  caps = order[0]
  out = module.apply({"params": params}, data["image"][caps], data["text"][caps])
  logits = module.apply({"params": params}, out["e_i"], out["e_t"],
                        method=module.sparse_terms_and_logits)
  ids = jnp.asarray(data["ids"][caps])
  kl_w = term_losses.bow_loss(logits["l_i"], term_losses.bow_targets(ids, allowed, V, weights),
                              allowed)
  kl_u = term_losses.bow_loss(logits["l_i"], term_losses.bow_targets(ids, allowed, V), allowed)
  np.testing.assert_allclose(history[0]["bow_image_kl"], kl_w, rtol=1e-5)
  assert abs(float(kl_w) - float(kl_u)) > 1e-3


def test_four_devices_train_like_one_with_term_losses(setup):
  loss = dict(bow_image=1.0, bow_text=1.0, df_weight=1.0, df_max=0.05)
  one, h1, _ = _run(setup, 1, 2, **loss)
  four, h4, _ = _run(setup, 4, 2, **loss)
  np.testing.assert_allclose(h4[-1]["loss"], h1[-1]["loss"], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(four.params), jax.tree_util.tree_leaves(one.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bow_training_moves_image_mass_onto_caption_words(setup):
  """The same steps with and without the image bag-of-words: with it, the images' KL to their
  captions' words falls, and ends lower than without."""
  data, module, _, allowed = setup

  def final_kl(state, order):
    caps = order[0]
    params = jax.device_get(state.params)
    out = module.apply({"params": params}, data["image"][caps], data["text"][caps])
    logits = module.apply({"params": params}, out["e_i"], out["e_t"],
                          method=module.sparse_terms_and_logits)
    q = term_losses.bow_targets(jnp.asarray(data["ids"][caps]), allowed, V)
    return float(term_losses.bow_loss(logits["l_i"], q, allowed))

  no_reg = dict(eta_text=0.0, eta_image=0.0, lr=1e-2)
  with_bow, h, order = _run(setup, 1, 6, bow_image=5.0, **no_reg)
  without, _, _ = _run(setup, 1, 6, **no_reg)
  # Steps 1-5 all train on the order's last row (16 images, batches of 8): one batch.
  assert float(h[-1]["bow_image_kl"]) < float(h[1]["bow_image_kl"]) - 0.05
  assert final_kl(with_bow, order) < final_kl(without, order) - 0.05


def test_term_losses_need_a_sparse_mode():
  with pytest.raises(ValueError, match="bow_image .*dense_only"):
    train_step.LossSettings.from_config(_train_config("dense_only", bow_image=1.0), 1)
