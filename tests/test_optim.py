"""The optimizer: group labels, schedules, freezing, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jsds_jax import config_base
from jsds_jax import optim
from jsds_jax.models.tail import jsds

D_IMG, D_TXT, P, V, DW = 6, 5, 4, 16, 3
# Tiny graphs: compile them once with XLA's slow CPU passes off instead of op by op.
_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _update(tx, grads, params):
  """One update from a fresh state: (updates, new state)."""
  return jax.jit(lambda g, p: tx.update(g, tx.init(p), p), compiler_options=_FAST)(grads, params)


@pytest.fixture(scope="module")
def params():
  module = jsds.JSDSTail(embed_dim=P, vocab_size=V, word_dim=DW)
  init = jax.jit(module.init, compiler_options=_FAST)
  return init(jax.random.key(0), jnp.zeros((1, D_IMG)), jnp.zeros((1, D_TXT)))["params"]


def _train(**overrides):
  train = config_base.base_config().train
  for k, v in overrides.items():
    train[k] = v
  return train


def _flat_labels(params, train):
  labels = optim.param_labels(params, train.pretrained.params, optim.freeze_patterns(train))
  return {optim.param_path(p): l for p, l in jax.tree_util.tree_leaves_with_path(labels)}


def test_labels_of_every_param(params):
  assert _flat_labels(params, _train()) == {
      "image_tail/proj/kernel": "projections", "image_tail/proj/bias": "projections",
      "text_tail/proj/kernel": "projections", "text_tail/proj/bias": "projections",
      "sparse_head/proj/kernel": "projections", "sparse_head/proj/bias": "projections",
      "sparse_head/layer_norm/scale": "pretrained", "sparse_head/layer_norm/bias": "pretrained",
      "sparse_head/word_embeddings": "pretrained", "sparse_head/vocab_bias": "pretrained",
      "tau": "projections",
  }


def test_freeze_overrides_groups_and_modes_add_their_own(params):
  labels = _flat_labels(params, _train(freeze=(r"word_embeddings", r"^text_tail/")))
  assert labels["sparse_head/word_embeddings"] == "frozen"
  assert labels["text_tail/proj/kernel"] == "frozen"
  assert labels["sparse_head/layer_norm/scale"] == "pretrained"
  d2s = _flat_labels(params, _train(mode="d2s"))
  assert {k for k, v in d2s.items() if v == "frozen"} == {
      "image_tail/proj/kernel", "image_tail/proj/bias", "text_tail/proj/kernel",
      "text_tail/proj/bias", "tau"}
  dense = _flat_labels(params, _train(mode="dense_only"))
  assert {k for k, v in dense.items() if v == "frozen"} == {
      k for k in dense if k.startswith("sparse_head/")}
  with pytest.raises(ValueError, match="train.mode"):
    optim.freeze_patterns(_train(mode="bogus"))


def test_schedule_matches_linear_warmup_then_decay():
  train = _train()
  total = 100  # warm-up over int(0.2 * 100) = 20 steps
  for step, want_embed, want_head in [(0, 0.0, 0.0), (10, 2.5e-5, 5e-4), (20, 5e-5, 1e-3),
                                      (60, 2.5e-5, 5e-4), (100, 0.0, 0.0)]:
    lrs = optim.schedules(train, total)
    np.testing.assert_allclose(float(lrs["pretrained"](step)), want_embed, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(float(lrs["projections"](step)), want_head, rtol=1e-6, atol=1e-12)
  no_warmup = optim.warmup_linear_decay(1.0, 10, warmup_fraction=0.0)
  np.testing.assert_allclose([float(no_warmup(s)) for s in (0, 5, 10)], [1.0, 0.5, 0.0])


def test_step_moves_groups_at_their_lr_and_leaves_frozen_alone(params):
  train = _train(freeze=(r"^text_tail/",), warmup_fraction=0.0)
  tx = optim.make_optimizer(train, total_steps=10)
  grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 1e-4), params)  # norm < 1: no clip
  updates, _ = _update(tx, grads, params)
  new = optax.apply_updates(params, updates)
  # Frozen: exactly unchanged, despite the head group's weight decay.
  for k in ("kernel", "bias"):
    np.testing.assert_array_equal(new["text_tail"]["proj"][k], params["text_tail"]["proj"][k])
  # Adam's first step moves each param by lr · (sign(g) + wd · p) (g >> eps here); compared in
  # units of lr, where float32 rounding is ~2e-4 and the wrong decay or group would be >= 2e-3.
  e = params["sparse_head"]["word_embeddings"]
  step_e = (e - new["sparse_head"]["word_embeddings"]) / 5e-5
  np.testing.assert_allclose(step_e, np.ones_like(e), rtol=0, atol=5e-4)
  k = params["image_tail"]["proj"]["kernel"]
  step_k = (k - new["image_tail"]["proj"]["kernel"]) / 1e-3
  np.testing.assert_allclose(step_k, 1 + 0.05 * k, rtol=0, atol=5e-4)
  assert float(jnp.max(jnp.abs(0.05 * k))) > 2e-3  # so the decay term is visible

def test_clip_over_trained_params_only(params):
  train = _train(freeze=(r"^tau$",), warmup_fraction=0.0)
  tx = optim.make_optimizer(train, total_steps=10)
  grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 3.0), params)
  grads["tau"] = jnp.asarray(1e6)  # frozen: must not count towards the norm
  _, state = _update(tx, grads, params)
  mus = [m for m in optax.tree_utils.tree_get_all_with_path(state, "mu")]
  assert len(mus) == 2  # one AdamW per group
  leaves = [x for _, mu in mus for x in jax.tree_util.tree_leaves(mu)
            if isinstance(x, jax.Array)]
  # mu = (1 - b1) · clipped grads, and the clipped grads have global norm 1.
  norm = np.sqrt(sum(float(jnp.sum(x ** 2)) for x in leaves))
  np.testing.assert_allclose(norm, 0.1, rtol=1e-5)
