"""Checkpoints: round trip of the whole train state, the best checkpoint, `load_params`, a
corrupt latest checkpoint, mismatched runs. A small tail on the fake devices, no training."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsds_jax import checkpoint
from jsds_jax import config_base
from jsds_jax import optim
from jsds_jax import sharding
from jsds_jax import train_step
from jsds_jax.models.tail import jsds

D_IMG, D_TXT, P, V, DW = 12, 10, 8, 50, 6


@pytest.fixture(scope="module")
def setup():
  config = config_base.base_config()
  module = jsds.JSDSTail(embed_dim=P, vocab_size=V, word_dim=DW)
  params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, D_IMG)),
                                jnp.zeros((1, D_TXT)))["params"]
  tx = optim.make_optimizer(config.train, total_steps=10)
  mesh = sharding.local_data_mesh()
  cache_meta = {"backbone": "tiny", "weights_hash": "abc", "dataset": "synthetic"}
  meta = checkpoint.make_metadata(config, module, cache_meta, image_dim=D_IMG, text_dim=D_TXT,
                                  steps_per_epoch=4, total_steps=10)
  base = jax.jit(lambda p: train_step.create_train_state(p, tx, jax.random.key(1)))(params)

  @jax.jit
  def shifted(step, seed):
    """A state at `step` whose params and Adam moments differ from a fresh one."""
    shift = lambda x: x + step if jnp.issubdtype(x.dtype, jnp.floating) else x
    return base.replace(step=step, params=jax.tree.map(shift, base.params),
                        opt_state=jax.tree.map(shift, base.opt_state),
                        rng=jax.random.key(seed))

  return dict(config=config, module=module, meta=meta, mesh=mesh, shifted=shifted)


def _state(setup, step, seed=1):
  state = setup["shifted"](jnp.asarray(step, jnp.int32), seed)
  return jax.device_put(state, jax.sharding.NamedSharding(setup["mesh"],
                                                          jax.sharding.PartitionSpec()))


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_best_and_load_params(tmp_path, setup):
  ckpt = checkpoint.Checkpointer(tmp_path, every=2, keep=2)
  assert ckpt.restore_latest(_state(setup, 0)) is None
  for step in (2, 4, 6):
    ckpt.save(_state(setup, step), setup["meta"], checkpoint.Progress(epoch=step // 4,
                                                                      step_in_epoch=step % 4))
  ckpt.save_best(4, _state(setup, 4).params, setup["meta"], checkpoint.Progress(), score=50.0)
  ckpt.wait_until_finished()
  assert ckpt.manager.all_steps() == [4, 6]  # keep=2
  fresh = _state(setup, 0, seed=9)
  restored, progress = ckpt.restore_latest(fresh, setup["meta"])
  ckpt.close()
  want = _state(setup, 6)
  _assert_trees_equal(restored.params, want.params)
  _assert_trees_equal(restored.opt_state, want.opt_state)
  assert int(restored.step) == 6
  np.testing.assert_array_equal(jax.random.key_data(restored.rng),
                                jax.random.key_data(want.rng))
  assert (progress.epoch, progress.step_in_epoch) == (1, 2)
  assert restored.params["tau"].sharding == fresh.params["tau"].sharding

  # load_params: the workdir means its best checkpoint; a step dir means that one.
  params, meta = checkpoint.load_params(tmp_path)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
  _assert_trees_equal(params, _state(setup, 4).params)
  assert meta["weights_hash"] == "abc" and meta["vocab_size"] == V and meta["embed_dim"] == P
  assert meta["config"]["train"]["mode"] == "jsds"
  params6, _ = checkpoint.load_params(tmp_path / "checkpoints" / "6")
  _assert_trees_equal(params6, want.params)
  module = checkpoint.tail_module(meta, params)
  out = module.apply({"params": params}, np.zeros((2, D_IMG), np.float32),
                     np.zeros((3, D_TXT), np.float32))
  assert out["z_i"].shape == (2, V) and out["e_t"].shape == (3, P)
  assert not module.own_caption_terms
  own_meta = dict(meta, config=dict(meta["config"], model=dict(meta["config"]["model"],
                                                               own_caption_terms=True)))
  assert checkpoint.tail_module(own_meta, params).own_caption_terms  # the config's field
  with pytest.raises(checkpoint.CheckpointError, match=str(tmp_path / "nothing")):
    checkpoint.load_params(tmp_path / "nothing")


def test_corrupt_latest_falls_back_with_warning(tmp_path, setup, caplog):
  ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=3)
  for step in (1, 2):
    ckpt.save(_state(setup, step), setup["meta"], checkpoint.Progress())
  ckpt.wait_until_finished()
  bad = tmp_path / "checkpoints" / "2"
  for f in (bad / "params").rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
  with caplog.at_level(logging.WARNING):
    restored, _ = ckpt.restore_latest(_state(setup, 0), setup["meta"])
  assert int(restored.step) == 1
  _assert_trees_equal(restored.params, _state(setup, 1).params)
  assert str(bad) in caplog.text
  assert not bad.exists() and list((tmp_path / "corrupt_checkpoints").iterdir())
  # Step 2 may be saved again after the fall back.
  ckpt.save(_state(setup, 2), setup["meta"], checkpoint.Progress())
  ckpt.close()
  assert ckpt.manager.all_steps() == [1, 2]


def test_mismatched_run_is_refused(tmp_path, setup):
  ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=1)
  ckpt.save(_state(setup, 1), setup["meta"], checkpoint.Progress())
  ckpt.wait_until_finished()
  other = dict(setup["meta"], weights_hash="xyz", mode="d2s")
  with pytest.raises(checkpoint.CheckpointError, match="weights_hash.*mode"):
    ckpt.restore_latest(_state(setup, 0), other)
  ckpt.close()
  json.dumps(setup["meta"])  # the metadata is plain JSON


def test_last_block_checkpoint_round_trips(tmp_path):
  """A tail with trained last blocks saved and loaded back evaluates as it did, blocks and all;
  without the backbone that defines the blocks it is refused, never silently rebuilt without."""
  from jsds_jax import tail_outputs  # pylint: disable=g-import-not-at-top
  from jsds_jax.models.tail import last_block  # pylint: disable=g-import-not-at-top
  from jsds_jax.models.trunk import backbones  # pylint: disable=g-import-not-at-top
  config = config_base.base_config()
  config.backbone.name = "tiny"
  config.model.last_block = "both"
  backbone = backbones.load_backbone(config.backbone)
  blocks = last_block.blocks_for_backbone(backbone, "both")
  module = jsds.JSDSTail(embed_dim=16, vocab_size=backbone.vocab_size, word_dim=32,
                         image_block=blocks["image"][0], text_block=blocks["text"][0])
  params = jsds.init_jsds_tail(jax.random.key(0), module, 32, 32, backbone.image_proj,
                               backbone.text_proj, backbone.word_embeddings,
                               image_block_params=blocks["image"][1],
                               text_block_params=blocks["text"][1])
  # Move the blocks off the frozen tower's values, as training does.
  params = dict(params, image_block=jax.tree.map(lambda x: x * 1.1, params["image_block"]),
                text_block=jax.tree.map(lambda x: x * 0.9, params["text_block"]))
  rng = np.random.default_rng(0)
  tokens_i = rng.normal(size=(2, 17, 32)).astype(np.float32)
  tokens_t = rng.normal(size=(3, 6, 32)).astype(np.float32)
  ids = np.array([[101, 7, 8, 102, -1, -1], [101, 9, 102, -1, -1, -1],
                  [101, 5, 6, 7, 8, 102]], np.int32)
  want = module.apply({"params": params}, tokens_i, tokens_t, ids)

  meta = checkpoint.make_metadata(config, module, {"backbone": "tiny", "weights_hash": "h",
                                                   "dataset": "synthetic"},
                                  image_dim=32, text_dim=32, steps_per_epoch=1, total_steps=1)
  ckpt = checkpoint.Checkpointer(tmp_path, every=1, keep=1)
  ckpt.save_best(1, params, meta, checkpoint.Progress(), 1.0)
  ckpt.wait_until_finished()
  ckpt.close()
  loaded, loaded_meta = checkpoint.load_params(tmp_path)
  assert {"image_block", "text_block"} <= set(loaded)
  rebuilt = checkpoint.tail_module(loaded_meta, loaded, backbone)
  assert rebuilt.image_block is not None and rebuilt.text_block is not None
  got = rebuilt.apply({"params": loaded}, tokens_i, tokens_t, ids)
  for k in ("e_i", "z_i", "e_t", "z_t"):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
  with pytest.raises(ValueError, match="backbone"):
    checkpoint.tail_module(loaded_meta, loaded)
  with pytest.raises(ValueError, match="backbone"):
    tail_outputs.tail_module_for(loaded)
def test_resume_says_whether_it_starts_fresh_or_from_a_step(tmp_path, setup, caplog):
  ckpt = checkpoint.Checkpointer(tmp_path, every=0, keep=2)
  with caplog.at_level(logging.INFO):
    assert ckpt.restore_latest(_state(setup, 0)) is None
  assert f"no checkpoint in {tmp_path / 'checkpoints'}, starting fresh" in caplog.text
  ckpt.save(_state(setup, 3), setup["meta"], checkpoint.Progress())
  ckpt.wait_until_finished()
  caplog.clear()
  with caplog.at_level(logging.INFO):
    restored, _ = ckpt.restore_latest(_state(setup, 0), setup["meta"])
  ckpt.close()
  assert int(restored.step) == 3
  assert f"resuming from step 3: {tmp_path / 'checkpoints' / '3'}" in caplog.text


def test_time_interval_asks_for_a_save_between_step_intervals(tmp_path, setup, monkeypatch):
  now = [1000.0]
  monkeypatch.setattr(checkpoint.time, "monotonic", lambda: now[0])
  ckpt = checkpoint.Checkpointer(tmp_path, every=100, keep=2, every_seconds=30)
  assert not ckpt.should_save(1)
  now[0] += 31
  assert ckpt.should_save(2)
  ckpt.save(_state(setup, 2), setup["meta"], checkpoint.Progress())
  assert not ckpt.should_save(3)  # the clock restarts at each save
  now[0] += 29
  assert not ckpt.should_save(4)
  now[0] += 2
  assert ckpt.should_save(5)
  ckpt.close()
  off = checkpoint.Checkpointer(tmp_path / "off", every=100, keep=2, every_seconds=0)
  now[0] += 10_000
  assert not off.should_save(7)
  off.close()


def test_load_params_takes_a_relative_path(tmp_path, setup, monkeypatch):
  ckpt = checkpoint.Checkpointer(tmp_path / "run", every=1, keep=1)
  ckpt.save(_state(setup, 1), setup["meta"], checkpoint.Progress())
  ckpt.close()
  monkeypatch.chdir(tmp_path)
  params, meta = checkpoint.load_params("run")
  _assert_trees_equal(params, _state(setup, 1).params)
  assert meta["weights_hash"] == "abc"
