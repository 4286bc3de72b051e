"""Two real processes on 127.0.0.1 (JAX's distributed runtime, CPU, 2 fake devices each).

What runs: tests/multiprocess_driver.py, as subprocesses with their own XLA_FLAGS (this pytest
process's 4 fake devices are not theirs). Checked: 2 processes × 2 devices train to the same
params as 1 process × 4 devices on the same global batches (the sharded layout, each process
reading only its rows, against the replicated one); the collective Orbax checkpoint restores in
a single process; a SIGKILLed process makes its peer exit non-zero with the runtime's error
within a bounded time, and rerunning the same command resumes from the last checkpoint to the
same params as an uninterrupted run.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jsds_jax import distributed
from jsds_jax import input_pipeline
from jsds_jax import sharding
from jsds_jax.data import feature_cache

DRIVER = pathlib.Path(__file__).with_name("multiprocess_driver.py")
REPO = DRIVER.parent.parent
N_IMG, D_IMG, D_TXT = 37, 12, 10
HEARTBEAT_S = 10  # short, so the failure test is quick; CPU contention must not trip it
KILL_BOUND_S = 60


def _write_cache(directory: pathlib.Path) -> pathlib.Path:
  """A synthetic [CLS] cache: 37 images with 1 to 3 captions each (uneven shards)."""
  rng = np.random.default_rng(0)
  counts = rng.integers(1, 4, size=N_IMG)
  cap_img = rng.permutation(np.repeat(np.arange(N_IMG), counts))
  arrays = {"image_pooled": rng.normal(size=(N_IMG, D_IMG)).astype(np.float32),
            "text_pooled": rng.normal(size=(cap_img.size, D_TXT)).astype(np.float32),
            "caption_image_index": cap_img.astype(np.int64)}
  directory.mkdir(parents=True, exist_ok=True)
  for name, arr in arrays.items():
    feature_cache.atomic_save_npy(directory / f"{name}.npy", arr)
  feature_cache.atomic_write_json(directory / feature_cache.ITEMS, {})
  feature_cache.atomic_write_json(directory / feature_cache.META, {"arrays": {
      k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()}})
  return directory


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Set by the `cache` fixture: a persistent compilation cache shared by every subprocess of this
# file, so that reruns (the resumed run, the second test's processes) skip XLA compiles.
_JAX_CACHE: list[str] = []


def _env(devices: int, **extra) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JSDS_", "SLURM_", "XLA_FLAGS", "JAX_"))}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **extra)
  if _JAX_CACHE:
    env.update(JAX_COMPILATION_CACHE_DIR=_JAX_CACHE[0],
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _launch(workdir: pathlib.Path, cache: pathlib.Path, *args: str) -> list[subprocess.Popen]:
  """Starts the 2 processes of one run; their output goes to workdir/log.<id>."""
  port = _free_port()
  procs = []
  workdir.mkdir(parents=True, exist_ok=True)
  for pid in range(2):
    env = _env(2, JSDS_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JSDS_NUM_PROCESSES="2",
               JSDS_PROCESS_ID=str(pid), JSDS_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_S),
               JSDS_INIT_TIMEOUT_S="60")
    log = open(workdir / f"log.{pid}", "a")
    procs.append(subprocess.Popen(
        [sys.executable, str(DRIVER), "train", "--cache", str(cache), "--workdir", str(workdir),
         *args], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
    log.close()
  return procs


def _wait_all(procs, workdir, timeout=90):
  deadline = time.monotonic() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for pid, p in enumerate(procs):
    assert p.returncode == 0, _log(workdir, pid)


def _log(workdir, pid) -> str:
  text = (workdir / f"log.{pid}").read_text()
  return f"process {pid} log:\n{text[-3000:]}"


def _start_reference(cache, out, log_dir, *args: str) -> subprocess.Popen:
  """Starts the one-process, 4-device reference run; its output goes to log_dir/log.ref."""
  log_dir.mkdir(parents=True, exist_ok=True)
  with open(log_dir / "log.ref", "w") as log:
    return subprocess.Popen(
        [sys.executable, str(DRIVER), "reference", "--cache", str(cache), "--out", str(out),
         *args], env=_env(4), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _wait_reference(proc, out, log_dir, timeout=120):
  try:
    rc = proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert rc == 0, (log_dir / "log.ref").read_text()[-3000:]
  return dict(np.load(out))


def _assert_close(got: dict, ref: dict, prefix: str, tol=1e-5):
  ref = {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}
  assert set(got) == set(ref) and ref
  diffs = {k: float(np.max(np.abs(got[k] - ref[k])) / max(float(np.max(np.abs(ref[k]))), 1e-30))
           for k in ref}
  assert max(diffs.values()) <= tol, diffs


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


# ---------------------------------------------------------------------------------------------
# Real processes.


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  _JAX_CACHE[:] = [str(tmp_path_factory.mktemp("jax_cache"))]
  yield _write_cache(tmp_path_factory.mktemp("cache") / "train")
  _JAX_CACHE.clear()


@pytest.mark.slow
def test_two_processes_match_one_and_checkpoint_restores(cache, tmp_path):
  run = tmp_path / "run"
  # The reference trains meanwhile, then restores the run's checkpoint once it is finished.
  ref_proc = _start_reference(cache, tmp_path / "ref.npz", tmp_path, "--restore", str(run),
                              "--wait_for", str(run / "params.npz"))
  try:
    _wait_all(_launch(run, cache, "--stop_at", "3"), run)
  except BaseException:
    ref_proc.kill()
    ref_proc.wait()
    raise
  ref = _wait_reference(ref_proc, tmp_path / "ref.npz", tmp_path)
  result = json.loads((run / "result.json").read_text())
  assert result["process_count"] == 2 and result["devices"] == 4 and result["step"] == 3
  # Each device holds one shard: ceil(37 / 4) image rows, not all 37.
  assert result["features_per_device"] == 10 and result["images"] == N_IMG
  got = dict(np.load(run / "params.npz"))
  _assert_close(got, ref, "step3/")
  moved = {k: float(np.max(np.abs(got[k] - ref["step1/" + k]))) for k in got}
  assert min(moved.values()) > 0, moved  # steps 2 and 3 changed every param
  # The checkpoint written by two processes, restored in one: the very same numbers.
  restored = {k[len("restored/"):]: v for k, v in ref.items() if k.startswith("restored/")}
  for k, v in got.items():
    np.testing.assert_array_equal(restored[k], v, err_msg=k)
  assert int(ref["restored_step"]) == 3
  assert list(ref["restored_position"]) == [0, 3]


@pytest.mark.slow
def test_sigkill_fails_fast_and_rerun_resumes(cache, tmp_path):
  run = tmp_path / "run"
  # The reference meanwhile: it shares the 2 cores, but the kill window below is long.
  ref_out = tmp_path / "ref.npz"
  ref_proc = _start_reference(cache, ref_out, tmp_path)
  try:
    rc, took = _kill_one_mid_run(run, cache)
    log0 = (run / "log.0").read_text()
    assert rc != 0, log0[-2000:]
    assert took < KILL_BOUND_S, f"survivor took {took:.0f} s to exit"
    assert "another task died" in log0 or "unhealthy" in log0, log0[-2000:]
    assert "step 6 " not in log0
    # The same command again resumes from the last complete checkpoint and finishes.
    (run / "log.0").rename(run / "log.0.killed")
    (run / "log.1").rename(run / "log.1.killed")
    _wait_all(_launch(run, cache, "--stop_at", "6"), run)
    result = json.loads((run / "result.json").read_text())
    assert result["resumed_from"] is not None and result["resumed_from"] >= 2, result
    assert result["step"] == 6
    ref = _wait_reference(ref_proc, ref_out, tmp_path)
  finally:
    if ref_proc.poll() is None:
      ref_proc.kill()
      ref_proc.wait()
  _assert_close(dict(np.load(run / "params.npz")), ref, "step6/")
  print(f"survivor exited with {rc} {took:.1f} s after the kill; resumed from step "
        f"{result['resumed_from']}")


def _kill_one_mid_run(run, cache) -> tuple[int, float]:
  """Starts a 6-step run, SIGKILLs process 1 once step 2 is checkpointed; returns process 0's
  exit status and the seconds it took to exit after the kill."""
  procs = _launch(run, cache, "--stop_at", "6", "--step_sleep", "1")
  try:
    deadline = time.monotonic() + 90
    while not (run / "ckpt" / "2").is_dir():
      assert time.monotonic() < deadline, _log(run, 0)
      assert all(p.poll() is None for p in procs), _log(run, 0) + _log(run, 1)
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    rc = procs[0].wait(timeout=KILL_BOUND_S + 30)
    return rc, time.monotonic() - killed_at
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
