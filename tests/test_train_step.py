"""The sharded train step: 4 fake CPU devices against one, every mode, no retracing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsds_jax import config_base
from jsds_jax import input_pipeline
from jsds_jax import optim
from jsds_jax import train_step
from jsds_jax.models.tail import jsds

N_IMG, CAPS, D_IMG, D_TXT, P, V, DW, B = 24, 2, 32, 32, 16, 200, 24, 8
STEPS = 3
# XLA's expensive CPU passes off: these graphs are tiny, compiling dominates the file's time.
_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _train(mode="jsds"):
  train = config_base.base_config().train
  train.mode = mode
  train.batch_size = B
  train.warmup_fraction = 0.0  # every step moves the params
  train.loss.eta_text = 1e-2   # a regulariser large enough to matter in a few steps
  train.loss.eta_image = 1e-2
  train.loss.reg_warmup_fraction = 0.0
  return train


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  return dict(image=rng.normal(size=(N_IMG, D_IMG)).astype(np.float32),
              text=rng.normal(size=(N_IMG * CAPS, D_TXT)).astype(np.float32),
              cap_img=np.repeat(np.arange(N_IMG), CAPS))


@pytest.fixture(scope="module")
def module_and_params():
  module = jsds.JSDSTail(embed_dim=P, vocab_size=V, word_dim=DW)
  # One fast-compiled init (init_jsds_tail compiles three, at full optimisation).
  init = jax.jit(module.init, compiler_options=_FAST)
  params = init(jax.random.key(1), jnp.zeros((1, D_IMG)), jnp.zeros((1, D_TXT)))["params"]
  return module, params


def _mesh(n):
  assert len(jax.devices()) >= n, "tests/conftest.py sets 4 fake CPU devices"
  return jax.sharding.Mesh(np.asarray(jax.devices()[:n]), ("data",))


def _run(n_devices, mode, data, module_and_params, steps=STEPS):
  module, params = module_and_params
  mesh = _mesh(n_devices)
  train = _train(mode)
  tx = optim.make_optimizer(train, total_steps=steps)
  features = input_pipeline.device_features(data["image"], data["text"], data["cap_img"], mesh)
  order = input_pipeline.device_order(
      input_pipeline.epoch_order(0, 0, data["cap_img"], B), mesh)
  # A copy: the step donates the state, which may alias the fixture's arrays.
  params = jax.tree_util.tree_map(jnp.copy, params)
  state = train_step.create_train_state(params, tx, jax.random.key(2), mesh)
  step = train_step.make_train_step(module, tx, train, steps, mesh, compiler_options=_FAST)
  history = []
  for k in range(steps):
    state, metrics = step(state, features, order, k)
    history.append(jax.tree_util.tree_map(np.asarray, metrics))
  return state, history, step


def _rel_diffs(a, b):
  """max |a - b| / max |b| per leaf, by param path."""
  flat_a = dict(jax.tree_util.tree_leaves_with_path(a))
  return {optim.param_path(p): float(np.max(np.abs(np.asarray(flat_a[p]) - np.asarray(y)))
                                     / max(float(np.max(np.abs(np.asarray(y)))), 1e-30))
          for p, y in jax.tree_util.tree_leaves_with_path(b)}


def test_four_devices_match_one(data, module_and_params, monkeypatch):
  traces = []
  loss = train_step.loss_from_outputs
  monkeypatch.setattr(train_step, "loss_from_outputs",
                      lambda *a, **k: traces.append(1) or loss(*a, **k))
  sharded, hist4, _ = _run(4, "jsds", data, module_and_params)
  assert len(traces) == 1, "the step retraced"  # three calls, one trace
  single, hist1, _ = _run(1, "jsds", data, module_and_params)
  assert int(sharded.step) == int(single.step) == STEPS
  diffs = _rel_diffs(sharded.params, single.params)
  print("max relative difference, 4 devices vs 1:", max(diffs.values()))
  assert max(diffs.values()) <= 1e-5, diffs
  # ... and the params did move, by far more than that tolerance.
  moved = _rel_diffs(single.params, module_and_params[1])
  assert min(moved.values()) > 5e-5, moved  # LayerNorm scale: 3 steps at lr <= 5e-5
  for m4, m1 in zip(hist4, hist1):
    for k in ("loss", "grad_norm", "infonce_dense", "kd_sparse", "reg", "nnz_text"):
      np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, err_msg=k)
  _check_metrics(hist1)


def _check_metrics(hist):
  m = hist[0]
  for k in ("loss", "tau", "nnz_image", "nnz_text", "grad_norm", "param_norm", "lr_pretrained",
            "lr_projections", "infonce_int", "kd_dense", "reg_text", "eta_image"):
    assert m[k].shape == () and np.isfinite(m[k]), k
  np.testing.assert_allclose(m["tau"], 0.07, rtol=1e-6)
  np.testing.assert_allclose([m["lr_pretrained"], m["lr_projections"]], [5e-5, 1e-3], rtol=1e-6)
  np.testing.assert_allclose(hist[1]["lr_projections"], 1e-3 * 2 / 3, rtol=1e-6)  # linear decay
  assert 0 < m["nnz_text"] <= V
  np.testing.assert_allclose(m["total"], m["loss"])


@pytest.mark.parametrize("mode,frozen,trained", [
    ("d2s", ("image_tail", "text_tail", "tau"), ("sparse_head",)),
    ("dense_only", ("sparse_head",), ("image_tail", "text_tail", "tau")),
])
def test_baselines_train_only_their_part(mode, frozen, trained, data, module_and_params):
  state, hist, _ = _run(4, mode, data, module_and_params, steps=2)
  init = module_and_params[1]
  for name in frozen:
    for a, b in zip(jax.tree_util.tree_leaves(state.params[name]),
                    jax.tree_util.tree_leaves(init[name])):
      np.testing.assert_array_equal(a, b, err_msg=name)
  for name in trained:
    assert any(np.any(np.asarray(a) != np.asarray(b))
               for a, b in zip(jax.tree_util.tree_leaves(state.params[name]),
                               jax.tree_util.tree_leaves(init[name]))), name
  assert all(np.isfinite(h["loss"]) for h in hist)
