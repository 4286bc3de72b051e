"""Two real `python -m jsds_jax.encode` processes on 127.0.0.1 (JAX's distributed runtime, CPU,
2 fake devices each) write the very cache one process with 2 devices writes.

Each process encodes only its share of every chunk and gets the others' rows by an all-gather;
checked: a pair with private caches (`encode.cache_root` per process), SIGKILLed mid-split and
rerun, ends with the same arrays, items and meta (timing aside) in both caches as the one-process
run, with unreadable images skipped (`data.skip_bad`) in the shares of both processes, the token
states (`encode.last_block`, bf16) gathered too, a last chunk too short to reach process 1, and
a progress bar only from process 0. A second pair shares one cache root
(`encode.shared_cache`): process 0 alone writes it, the same cache again.
"""

import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jsds_jax.data import feature_cache
from jsds_jax.data import registry
import testing_utils  # tests/testing_utils.py

REPO = pathlib.Path(__file__).resolve().parents[1]
# 50 synthetic images: 40 train images (3 chunks of 16, 16, 8 at batch 8: the last one is all
# process 0's) and 80 captions (5 chunks of 2 batches, one per process).
OVERRIDES = ["--config.data.num_images=50", "--config.data.splits=('train',)",
             "--config.data.skip_bad=True", "--config.encode.chunk_size=16",
             "--config.encode.batch_size=8", "--config.encode.last_block=True"]
BAD = (5, 27)  # image 5 is process 0's (chunk 0), image 27 process 1's (chunk 1)


def _tiny_config(data_dir: pathlib.Path):
  config = testing_utils.load_config("tiny")
  config.data.cache_dir = str(data_dir)
  config.data.num_images = 50
  return config


def _start(data_dir, cache_root, log, env, *extra) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "jsds_jax.encode", "--config", str(REPO / "configs" / "tiny.py"),
         f"--config.data.cache_dir={data_dir}", f"--config.encode.cache_root={cache_root}",
         *OVERRIDES, *extra]
  with open(log, "w") as f:
    return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)


def _cache(root: pathlib.Path):
  (meta_path,) = root.rglob(feature_cache.META)
  out = feature_cache.load_split(meta_path.parent, mmap=False)
  meta = dict(out.pop("meta"))
  meta.pop("encode_seconds")
  (tail,) = root.rglob(feature_cache.TAIL_INIT)
  leftovers = [p.name for p in meta_path.parent.iterdir()
               if ".part-" in p.name or ".tmp-" in p.name]
  return out, meta, tail.read_bytes(), leftovers


_wait = testing_utils.wait_all


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """The generated data (with unreadable images) and the one-process reference run, started
  here and waited for by `_reference` (so it runs alongside the first pair)."""
  tmp = tmp_path_factory.mktemp("mp_encode")
  data_dir = tmp / "data"
  split = registry.load_split(_tiny_config(data_dir).data, "train")  # generates the data
  assert split.num_images == 40
  for i in BAD:
    pathlib.Path(split.image_sources[i]).write_bytes(b"not an image")
  ref = _start(data_dir, tmp / "ref", tmp / "log.ref",
               testing_utils.jax_subprocess_env(2, tmp / "jax_cache", JSDS_DISTRIBUTED="off"))
  yield tmp, ref
  if ref.poll() is None:
    ref.kill()
    ref.wait()


def _pair(tmp: pathlib.Path, name: str, shared: bool) -> tuple[list, list]:
  """Starts two processes (2 devices each) of one run; cache roots tmp/<name><id>, or one
  tmp/<name> when `shared`."""
  port = testing_utils.free_port()
  procs, logs = [], []
  for pid in range(2):
    logs.append(tmp / f"log.{name}{pid}")
    env = testing_utils.jax_subprocess_env(
        2, tmp / "jax_cache", JSDS_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JSDS_NUM_PROCESSES="2", JSDS_PROCESS_ID=str(pid), JSDS_INIT_TIMEOUT_S="60",
        JSDS_SHUTDOWN_TIMEOUT_S="60")
    procs.append(_start(tmp / "data", tmp / (name if shared else f"{name}{pid}"), logs[-1], env,
                        f"--config.encode.shared_cache={shared}"))
  return procs, logs


def _check_same_as_reference(tmp: pathlib.Path, ref_proc, roots) -> dict:
  _wait([ref_proc], [tmp / "log.ref"], timeout=120)
  ref, ref_meta, ref_tail, _ = _cache(tmp / "ref")
  assert ref_meta["skipped_images"] == len(BAD) and ref_meta["num_images"] == 40 - len(BAD)
  assert "image_last_block_input" in ref
  arrays = [k for k, v in ref.items() if isinstance(v, np.ndarray)]
  for root in roots:
    got, meta, tail, leftovers = _cache(tmp / root)
    assert not leftovers, leftovers
    assert meta == ref_meta, root
    assert got["items"] == ref["items"], root
    assert tail == ref_tail, root
    assert set(arrays) == {k for k, v in got.items() if isinstance(v, np.ndarray)}
    for name in arrays:
      assert got[name].dtype == ref[name].dtype, name
      np.testing.assert_array_equal(got[name].view(np.uint8), ref[name].view(np.uint8),
                                    err_msg=f"{root}: {name}")
  return ref_meta


def test_two_processes_with_a_shared_cache_write_it_once(run_dir):
  tmp, ref_proc = run_dir
  procs, logs = _pair(tmp, "shared", shared=True)
  _wait(procs, logs, timeout=150)
  _check_same_as_reference(tmp, ref_proc, ["shared"])


def test_two_processes_killed_then_rerun_resume_to_the_same_cache(run_dir):
  """Two processes with private caches, both SIGKILLed mid-split (their caches may hold
  different chunks), then the same command again: they agree on what is done and each ends
  with the reference cache; only process 0 showed progress bars."""
  tmp, ref_proc = run_dir
  procs, logs = _pair(tmp, "res", shared=False)
  deadline = time.monotonic() + 120
  try:
    while not list((tmp / "res0").rglob("text_pooled.part-00001.npy")):
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs), (
          logs[0].read_text()[-3000:])
      time.sleep(0.005)
  finally:
    for p in procs:
      p.send_signal(signal.SIGKILL)
      p.wait()
  assert not list(tmp.glob("res*/**/meta.json")), "the kill came too late to test anything"
  for log in logs:
    log.rename(log.with_suffix(".killed"))
  procs, logs = _pair(tmp, "res", shared=False)
  _wait(procs, logs, timeout=150)
  # Progress bars (tqdm, "<dataset>/<split> images") from process 0 only.
  assert "train images" in logs[0].read_text(), logs[0].read_text()[-2000:]
  assert "train images" not in logs[1].read_text(), logs[1].read_text()[-2000:]
  meta = _check_same_as_reference(tmp, ref_proc, ["res0", "res1"])
  print(json.dumps({k: meta[k] for k in ("num_images", "num_captions", "skipped_images")}))
