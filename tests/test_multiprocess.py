"""Two real `python -m jsds_jax.train` processes on 127.0.0.1 (JAX's distributed runtime, CPU,
2 fake devices each), and the sharded feature layout they train with.

The real-process test runs the training binary as subprocesses with their own XLA_FLAGS (this
pytest process's 4 fake devices are not theirs). Checked: 2 processes × 2 devices end with the
params of 1 process × 4 devices running the same sharded layout
(`--config.train.features_layout=sharded`: the same global batches); their collective Orbax
checkpoint is read back in this single process (`checkpoint.load_params`); a SIGKILLed process
makes its peer exit non-zero with the runtime's error within a bounded time; rerunning the same
command resumes from the last checkpoint and ends with those same params.
"""

import json
import logging
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jsds_jax import checkpoint
from jsds_jax import distributed
from jsds_jax import input_pipeline
from jsds_jax import sharding
from jsds_jax.data import feature_cache
import testing_utils  # tests/testing_utils.py

REPO = pathlib.Path(__file__).resolve().parents[1]
N_IMG, D_IMG, D_TXT, EMBED, VOCAB, WORD_DIM = 37, 12, 10, 16, 64, 16
HEARTBEAT_S = 10  # short, so the failure test is quick; CPU contention must not trip it
KILL_BOUND_S = 45  # heartbeat timeout + the runtime's polling + a loaded 2-core machine
# 37 images over 4 devices: shards of 10, 9, 9, 9 images, batch 8 = 2 per shard, 4 steps an
# epoch. Checkpoints every 4 steps; validation only at the end (eval_every_epochs=0).
EPOCHS = 12
STEPS = EPOCHS * 4
TRAIN_FLAGS = dict(num_epochs=EPOCHS, batch_size=8, checkpoint_every=4, keep_checkpoints=2,
                   log_every=4, eval_every_epochs=0, patience=0, progress=False)


def _write_cache(directory: pathlib.Path, n_img: int = N_IMG, seed: int = 0) -> pathlib.Path:
  """A synthetic finished [CLS] cache, as `encode` writes it: n_img images with 1 to 3
  captions each (uneven shards); captions are noisy linear images of their pictures."""
  rng = np.random.default_rng(seed)
  counts = rng.integers(1, 4, size=n_img)
  cap_img = rng.permutation(np.repeat(np.arange(n_img), counts))
  image = rng.normal(size=(n_img, D_IMG)).astype(np.float32)
  mix = np.random.default_rng(99).normal(size=(D_IMG, D_TXT)).astype(np.float32)
  text = (image[cap_img] @ mix / np.sqrt(D_IMG)
          + 0.5 * rng.normal(size=(cap_img.size, D_TXT))).astype(np.float32)
  arrays = {"image_pooled": image, "text_pooled": text,
            "caption_image_index": cap_img.astype(np.int64)}
  directory.mkdir(parents=True, exist_ok=True)
  for name, arr in arrays.items():
    feature_cache.atomic_save_npy(directory / f"{name}.npy", arr)
  feature_cache.atomic_write_json(directory / feature_cache.ITEMS, {
      "image_ids": list(range(n_img)), "image_sources": [""] * n_img,
      "captions": [f"caption {i}" for i in range(cap_img.size)]})
  feature_cache.atomic_write_json(directory / feature_cache.META, {
      "backbone": "fake", "weights_hash": "f" * 64, "dataset": "fake", "split": directory.name,
      "num_images": n_img, "num_captions": int(cap_img.size),
      "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()}})
  return directory


def _write_features(root: pathlib.Path) -> pathlib.Path:
  """A `train.features` folder: train (37 images) and val (8) caches, tail_init beside them
  (a 64-word vocabulary keeps steps and checkpoints small)."""
  _write_cache(root / "train")
  _write_cache(root / "val", n_img=8, seed=1)
  rng = np.random.default_rng(2)
  proj = lambda d: (rng.normal(size=(d, EMBED)) / np.sqrt(d)).astype(np.float32)
  feature_cache.save_tail_init(root.parent / feature_cache.TAIL_INIT, {
      "word_embeddings": (rng.normal(size=(VOCAB, WORD_DIM)) * 0.1).astype(np.float32),
      "image_proj.kernel": proj(D_IMG), "image_proj.bias": np.zeros(EMBED, np.float32),
      "text_proj.kernel": proj(D_TXT), "text_proj.bias": np.zeros(EMBED, np.float32)})
  return root


# ---------------------------------------------------------------------------------------------
# In this process (4 fake devices): the sharded layout and the start-up plan.


def test_shard_layout_partitions_images_with_their_captions(tmp_path):
  cap_img = np.load(_write_cache(tmp_path / "c") / "caption_image_index.npy")
  layout = input_pipeline.shard_layout(cap_img, 4)
  assert layout.num_images.tolist() == [10, 9, 9, 9]
  real = layout.images[layout.images >= 0]
  assert sorted(real.tolist()) == list(range(N_IMG))
  assert sorted(layout.captions[layout.captions >= 0].tolist()) == list(range(cap_img.size))
  for d in range(4):
    caps = layout.captions[d, :layout.num_captions[d]]
    # Each caption sits with its image, and its local image row points at that image.
    np.testing.assert_array_equal(layout.images[d][layout.caption_image[d, :caps.size]],
                                  cap_img[caps])
  again = input_pipeline.shard_layout(cap_img, 4)
  np.testing.assert_array_equal(again.images, layout.images)


def test_sharded_epoch_order_is_local_distinct_and_pure(tmp_path):
  cap_img = np.load(_write_cache(tmp_path / "c") / "caption_image_index.npy")
  layout = input_pipeline.shard_layout(cap_img, 4)
  order = input_pipeline.epoch_order(3, 1, cap_img, 8, layout=layout)
  assert order.shape == (layout.steps_per_epoch(8), 8) == (4, 8)
  glob = layout.global_captions(order)
  images = cap_img[glob]
  for row in images:
    assert len(set(row.tolist())) == 8, "two captions of one image in a batch"
  assert len(set(images.ravel().tolist())) == images.size, "an image twice in an epoch"
  for d in range(4):  # device d's columns come from its own shard
    assert set(glob[:, 2 * d:2 * d + 2].ravel()) <= set(layout.captions[d].tolist())
  np.testing.assert_array_equal(order, input_pipeline.epoch_order(3, 1, cap_img, 8,
                                                                  layout=layout))
  assert not np.array_equal(order, input_pipeline.epoch_order(3, 2, cap_img, 8, layout=layout))
  with pytest.raises(ValueError, match="multiple"):
    input_pipeline.epoch_order(3, 1, cap_img, 6, layout=layout)


def test_sharded_features_gather_the_right_rows(tmp_path):
  cache = _write_cache(tmp_path / "c")
  split = feature_cache.load_split(cache)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
  features, layout = input_pipeline.load_sharded_features(cache, mesh)
  assert features.layout == "sharded" and features.image_pooled.shape == (40, D_IMG)
  assert features.image_pooled.addressable_shards[1].data.shape == (10, D_IMG)
  order = input_pipeline.epoch_order(0, 0, split["caption_image_index"], 8, layout=layout)
  spec = input_pipeline.features_spec(features)
  gather = jax.jit(jax.shard_map(
      input_pipeline.gather_batch, mesh=mesh, in_specs=(spec, jax.P("data")),
      out_specs=jax.P("data")))
  h_img, h_txt, image_idx = gather(features, input_pipeline.device_order(order, mesh)[1])
  glob = layout.global_captions(order)[1]
  np.testing.assert_array_equal(np.asarray(h_txt), split["text_pooled"][glob])
  np.testing.assert_array_equal(np.asarray(h_img),
                                split["image_pooled"][split["caption_image_index"][glob]])
  assert len(set(np.asarray(image_idx).tolist())) == 8  # ids unique across devices


def test_replicate_and_local_replica():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
  tree = {"w": np.arange(6.0).reshape(2, 3), "key": jax.random.key(7)}
  out = sharding.replicate(tree, mesh)
  assert out["w"].sharding.is_fully_replicated and len(out["w"].sharding.device_set) == 4
  assert jax.dtypes.issubdtype(out["key"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(out["key"]), jax.random.key_data(tree["key"]))
  assert sharding.local_replica(out, mesh)["w"] is out["w"]  # already there: no copy
  two = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",))
  w2 = sharding.local_replica({"w": out["w"]}, two)["w"]
  assert w2.sharding.mesh == two and w2.sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(w2), tree["w"])


@pytest.mark.parametrize("env,how", [
    ({}, "off"),
    ({"JSDS_DISTRIBUTED": "off", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "off"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, "slurm"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, "off"),  # an salloc shell / 1-task srun
    ({"JSDS_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JSDS_NUM_PROCESSES": "1",
      "JSDS_PROCESS_ID": "0"}, "off"),
    ({"JSDS_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JSDS_NUM_PROCESSES": "16",
      "JSDS_PROCESS_ID": "3", "JSDS_HEARTBEAT_TIMEOUT_S": "30"}, "env"),
])
def test_plan_from_env(env, how):
  plan = distributed.plan_from_env(env)
  assert plan.how == how
  if how == "env":
    assert (plan.coordinator_address, plan.num_processes, plan.process_id,
            plan.heartbeat_timeout_s) == ("10.0.0.1:1234", 16, 3, 30)
  assert distributed.maybe_initialize({}).how == "off"  # a no-op here


@pytest.mark.parametrize("env,match", [
    ({"JSDS_COORDINATOR_ADDRESS": "h:1"}, "JSDS_NUM_PROCESSES, JSDS_PROCESS_ID not set"),
    ({"JSDS_COORDINATOR_ADDRESS": "h:1", "JSDS_NUM_PROCESSES": "2", "JSDS_PROCESS_ID": "2"},
     "must lie in"),
    ({"JSDS_DISTRIBUTED": "yes"}, "auto' or 'off"),
])
def test_plan_from_env_errors(env, match):
  with pytest.raises(ValueError, match=match):
    distributed.plan_from_env(env)


def test_features_layout_setting():
  from jsds_jax import train  # pylint: disable=g-import-not-at-top
  assert train.features_layout("auto") == "replicated"  # one process here
  assert train.features_layout("sharded") == "sharded"
  with pytest.raises(ValueError, match="features_layout"):
    train.features_layout("striped")


def _tiny_config(features, **overrides):
  config = testing_utils.load_config("tiny")
  for k, v in {"features": str(features), **TRAIN_FLAGS, **overrides}.items():
    config.train[k] = v
  return config


# ---------------------------------------------------------------------------------------------
# Real processes: the training binary.


def _train_cmd(features: pathlib.Path, workdir: pathlib.Path, **overrides) -> list[str]:
  flags = {"features": features, **TRAIN_FLAGS, **overrides}
  return [sys.executable, "-m", "jsds_jax.train", "--config", str(REPO / "configs/tiny.py"),
          "--workdir", str(workdir), *(f"--config.train.{k}={v}" for k, v in flags.items())]


def _launch(features, workdir, jax_cache) -> list[subprocess.Popen]:
  """Starts the 2 processes of one run (2 devices each); output goes to workdir/log.<id>."""
  port = testing_utils.free_port()
  workdir.mkdir(parents=True, exist_ok=True)
  procs = []
  for pid in range(2):
    env = testing_utils.jax_subprocess_env(
        2, jax_cache, JSDS_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JSDS_NUM_PROCESSES="2",
        JSDS_PROCESS_ID=str(pid), JSDS_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S),
        JSDS_INIT_TIMEOUT_S="60", JSDS_SHUTDOWN_TIMEOUT_S="60")
    with open(workdir / f"log.{pid}", "a") as log:
      procs.append(subprocess.Popen(_train_cmd(features, workdir), env=env, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=REPO))
  return procs


_log = testing_utils.log_tail
_wait = testing_utils.wait_all


def _latest_checkpoint(workdir: pathlib.Path) -> int:
  d = workdir / "checkpoints"
  return max((int(p.name) for p in d.iterdir() if p.name.isdigit()), default=0) if d.is_dir() else 0


def _assert_close(got, ref, tol=1e-5):
  flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref))
  flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
  assert set(flat_got) == set(flat_ref) and flat_ref
  diffs = {jax.tree_util.keystr(k): float(np.max(np.abs(flat_got[k] - v))
                                          / max(float(np.max(np.abs(v))), 1e-30))
           for k, v in flat_ref.items()}
  assert max(diffs.values()) <= tol, diffs
  return max(diffs.values())


@pytest.mark.slow
def test_two_train_processes_match_one_survive_a_kill_and_resume(tmp_path, caplog):
  features = _write_features(tmp_path / "features" / "fake-0123" / "fake")
  jax_cache = tmp_path / "jax_cache"
  run, ref_dir = tmp_path / "run", tmp_path / "ref"
  # The reference: one process × 4 devices, the same sharded layout (the same batches); it
  # trains while the two processes run.
  ref_dir.mkdir()
  with open(ref_dir / "log", "w") as log:
    ref_proc = subprocess.Popen(
        _train_cmd(features, ref_dir, features_layout="sharded"),
        env=testing_utils.jax_subprocess_env(4, jax_cache),
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
  procs = _launch(features, run, jax_cache)
  try:
    # 1. SIGKILL process 1 once a checkpoint is on disk; process 0 must exit, non-zero, soon.
    deadline = time.monotonic() + 120
    while _latest_checkpoint(run) < 8:
      assert time.monotonic() < deadline, _log(run / "log.0")
      assert all(p.poll() is None for p in procs), _log(run / "log.0") + _log(run / "log.1")
      time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    rc = procs[0].wait(timeout=KILL_BOUND_S + 30)
    took = time.monotonic() - killed_at
    procs[1].wait()
    log0 = (run / "log.0").read_text()
    assert rc != 0, log0[-3000:]
    assert took < KILL_BOUND_S, f"survivor took {took:.0f} s to exit"
    # Either the runtime's heartbeat check aborts it, or its next collective fails first.
    assert any(m in log0 for m in ("another task died", "unhealthy", "heartbeat timeout",
                                   "Connection reset by peer")), log0[-3000:]
    killed_ckpt = _latest_checkpoint(run)
    assert 8 <= killed_ckpt < STEPS and not (run / "result.json").exists()
    start, _ = checkpoint.load_params(run / "checkpoints" / str(killed_ckpt))

    # 2. The same command again resumes from the last complete checkpoint and completes.
    for pid in range(2):
      (run / f"log.{pid}").rename(run / f"log.{pid}.killed")
    procs = _launch(features, run, jax_cache)
    _wait(procs, [run / "log.0", run / "log.1"], timeout=120)
    _wait([ref_proc], [ref_dir / "log"], timeout=60)
  finally:
    for p in [*procs, ref_proc]:
      if p.poll() is None:
        p.kill()
        p.wait()
  resumed = f"resuming from step {killed_ckpt}: {run / 'checkpoints' / str(killed_ckpt)}"
  assert resumed in (run / "log.0").read_text(), _log(run / "log.0")
  result = json.loads((run / "result.json").read_text())
  assert (result["status"], result["step"]) == ("completed", STEPS), result

  # 3. The checkpoints of both runs, read back in this single process: the same params.
  got, meta = checkpoint.load_params(run / "checkpoints" / str(STEPS))
  ref, ref_meta = checkpoint.load_params(ref_dir / "checkpoints" / str(STEPS))
  assert meta["features_layout"] == ref_meta["features_layout"] == "sharded/4"
  assert meta["steps_per_epoch"] == ref_meta["steps_per_epoch"] == 4
  diff = _assert_close(got, ref)
  moved = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(got),
                                                          jax.tree.leaves(start))]
  assert min(moved) > 0, moved  # the resumed steps changed every param

  # 4. The whole train state, restored in this single process (4 devices, the same layout): a
  # finished run, so nothing is trained again. Another layout means other batches: refused.
  from jsds_jax import train  # pylint: disable=g-import-not-at-top
  config = _tiny_config(features, features_layout="sharded")
  with caplog.at_level(logging.INFO):
    again = train.train_and_evaluate(config, run)
  assert f"resuming from step {STEPS}: {run / 'checkpoints' / str(STEPS)}" in caplog.text
  assert (again["status"], again["step"]) == ("completed", STEPS)
  config.train.features_layout = "replicated"
  with pytest.raises(checkpoint.CheckpointError, match="features_layout: 'sharded/4'"):
    train.train_and_evaluate(config, run)
  print(f"survivor exited with {rc} {took:.1f} s after the kill; resumed from step "
        f"{killed_ckpt}; max relative param difference to 1 process x 4 devices {diff:.1e}")
