"""The training binary on the tiny backbone and generated data, 4 fake devices: what a run
writes, SIGKILL / SIGTERM and resume to the same params, a corrupt latest checkpoint, a
diverging run, early stopping."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jsds_jax import checkpoint
from jsds_jax import train
from jsds_jax.evaluation import validation
import testing_utils  # tests/testing_utils.py

_ROOT = pathlib.Path(__file__).resolve().parents[1]
EPOCHS = 15  # x 4 steps: long enough to kill a run in the middle
STEPS = EPOCHS * 4
D_IMG, D_TXT, EMBED, VOCAB, WORD_DIM = 24, 20, 16, 1000, 16


def _tiny_config():
  return testing_utils.load_config("tiny")


# The run every test compares with; checkpoints at multiples of log_every keep the metric
# windows of a resumed run aligned with an uninterrupted one's.
_OVERRIDES = dict(num_epochs=EPOCHS, checkpoint_every=8, log_every=4, keep_checkpoints=2,
                  patience=0)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
  """A `train.features` folder with train / val caches and tail_init.safetensors, made
  directly (no backbone to load): captions are noisy linear images of their pictures' features,
  so retrieval is learnable; a 1000-word vocabulary keeps steps and checkpoints small."""
  root = testing_utils.write_fake_features(
      tmp_path_factory.mktemp("features") / "fake-0123" / "fake", {"train": 32, "val": 8},
      d_img=D_IMG, d_txt=D_TXT, embed=EMBED, vocab=VOCAB, word_dim=WORD_DIM)
  return root


def _config(features, **train_overrides):
  config = _tiny_config()
  config.train.features = str(features)
  for k, v in {**_OVERRIDES, **train_overrides}.items():
    config.train[k] = v
  return config


def _flags(features, **train_overrides):
  return [f"--config.train.{k}={v}" for k, v in
          {"features": features, **_OVERRIDES, **train_overrides}.items()]


@pytest.fixture(scope="module")
def reference(features, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  result = train.train_and_evaluate(_config(features), workdir)
  return workdir, result


def _params(path):
  return checkpoint.load_params(path)[0]


def _assert_same_params(a, b, atol=0.0):
  flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
  for path, x in jax.tree_util.tree_leaves_with_path(a):
    np.testing.assert_allclose(x, flat_b[path], rtol=0, atol=atol, err_msg=str(path))


def _val_records(workdir):
  return [{k: v for k, v in r.items() if k not in ("time", "seconds")}
          for r in train.read_jsonl(workdir / train.METRICS_FILE) if r["kind"] == "val"]


def test_run_writes_checkpoints_logs_and_best(reference):
  workdir, result = reference
  assert result["status"] == "completed" and result["step"] == STEPS
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
  assert steps == [STEPS - 4, STEPS]  # every 8 steps and at the end, the last 2 kept
  best = list((workdir / "best").iterdir())
  assert len(best) == 1 and int(best[0].name) == result["best_step"]
  records = train.read_jsonl(workdir / train.METRICS_FILE)
  assert [r["step"] for r in records if r["kind"] == "train"] == list(range(4, STEPS + 1, 4))
  vals = [r for r in records if r["kind"] == "val"]
  assert [r["step"] for r in vals] == list(range(4, STEPS + 1, 4))  # every epoch
  for key in ("sparse/t2i/R@1", "dense/i2t/R@10", "integrated/t2i/R@5", "sparsity/caption_nnz",
              "sparsity/flops"):
    assert np.isfinite(vals[-1][key]), key
  assert max(r["score"] for r in vals) == result["best_score"]
  assert records[0]["loss"] > 0 and "lr_projections" in records[0]
  assert list((workdir / train.TENSORBOARD_DIR).glob("events.out.tfevents.*"))
  assert json.loads((workdir / train.RESULT_FILE).read_text())["step"] == STEPS

  params, meta = checkpoint.load_params(workdir)  # the best one
  assert pathlib.Path(result["best_dir"]) == checkpoint.resolve_step_dir(workdir)
  assert set(params) == {"image_tail", "text_tail", "sparse_head", "tau"}
  assert params["sparse_head"]["word_embeddings"].shape == (VOCAB, WORD_DIM)
  assert params["image_tail"]["proj"]["kernel"].shape == (D_IMG, EMBED)
  assert (meta["backbone"], meta["vocab_size"], meta["embed_dim"], meta["mode"]) == (
      "fake", VOCAB, EMBED, "jsds")
  assert (meta["image_dim"], meta["text_dim"], meta["word_dim"]) == (D_IMG, D_TXT, WORD_DIM)
  assert meta["weights_hash"] and meta["config"]["train"]["num_epochs"] == EPOCHS
  # The params evaluate to the logged validation metrics.
  val = validation.evaluate_split(params, checkpoint.tail_module(meta, params),
                             pathlib.Path(result["feature_dirs"]["val"]), meta["w1"],
                             meta["w2"])
  assert val["sparse"]["t2i"]["R@1"] == result["best_score"]


def _wait_for(predicate, proc, timeout=120):
  start = time.time()
  while not predicate():
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert time.time() - start < timeout, "timed out"
    time.sleep(0.01)


def _spawn(features, workdir):
  env = dict(os.environ, XLA_FLAGS=testing_utils.xla_flags(4),
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "jsds_jax.train", "--config", str(_ROOT / "configs/tiny.py"),
         "--workdir", str(workdir), *_flags(features)]
  return subprocess.Popen(cmd, cwd=_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _latest_checkpoint(workdir):
  return max((int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()),
             default=0)


def test_sigkill_then_sigterm_then_resume_matches_uninterrupted(features, reference,
                                                                tmp_path):
  ref_dir, ref = reference
  workdir = tmp_path / "run"
  # 1. SIGKILL once the first checkpoint is on disk.
  proc = _spawn(features, workdir)
  _wait_for(lambda: (workdir / "checkpoints" / "8").is_dir(), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = _latest_checkpoint(workdir)
  assert killed_at < STEPS and not (workdir / train.RESULT_FILE).exists()

  # 2. Resume in a new process; SIGTERM it once it has saved a checkpoint of its own.
  proc = _spawn(features, workdir)
  _wait_for(lambda: _latest_checkpoint(workdir) > killed_at, proc)
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, output[-3000:]
  result = json.loads((workdir / train.RESULT_FILE).read_text())
  assert result["status"] == "preempted", output[-3000:]
  assert killed_at < result["step"] < STEPS
  assert checkpoint.resolve_step_dir(workdir / "checkpoints").name == str(result["step"])

  # 3. Resume to the end: the same params, best checkpoint and validation log as one run.
  result = train.train_and_evaluate(_config(features), workdir)
  assert result["status"] == "completed" and result["step"] == STEPS
  _assert_same_params(_params(workdir / "checkpoints" / str(STEPS)),
                      _params(ref_dir / "checkpoints" / str(STEPS)), atol=1e-6)
  assert result["best_step"] == ref["best_step"]
  _assert_same_params(_params(workdir / "best"), _params(ref_dir / "best"), atol=1e-6)
  assert _val_records(workdir) == _val_records(ref_dir)
  train_steps = [r["step"] for r in train.read_jsonl(workdir / train.METRICS_FILE)
                 if r["kind"] == "train"]
  assert train_steps == sorted(set(train_steps))  # no step logged twice


def test_corrupt_latest_checkpoint_falls_back(features, reference, tmp_path, caplog):
  ref_dir, _ = reference
  workdir = tmp_path / "run"
  shutil.copytree(ref_dir, workdir)
  bad = workdir / "checkpoints" / str(STEPS)
  for f in (bad / "train_state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"")
  result = train.train_and_evaluate(_config(features), workdir)
  assert str(bad) in caplog.text and "unreadable" in caplog.text
  # Resumed from the one before, and retrained its way to the same end.
  assert result["status"] == "completed"
  _assert_same_params(_params(bad), _params(ref_dir / "checkpoints" / str(STEPS)), atol=1e-6)


def test_diverging_run_stops_without_saving_nan(features, tmp_path):
  # lr(0) = 0 with warm-up, then an absurd rate: the first checkpoint is finite, the next not.
  config = _config(features, num_epochs=2, warmup_fraction=0.5, checkpoint_every=1,
                   keep_checkpoints=10)
  config.train.projections.lr = 1e38
  config.train.pretrained.lr = 1e38
  with pytest.raises(train.TrainingDivergedError, match=r"non-finite .* at step (\d+)") as e:
    train.train_and_evaluate(config, tmp_path)
  bad_step = int(e.value.args[0].split("at step ")[1].split(";")[0])
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
  assert steps and max(steps) < bad_step, (steps, bad_step)
  for step in steps:
    for x in jax.tree.leaves(_params(tmp_path / "checkpoints" / str(step))):
      assert np.all(np.isfinite(x)), step


def test_early_stopping(features, tmp_path):
  config = _config(features, num_epochs=10, patience=2)
  config.train.projections.lr = 0.0  # nothing moves, so the first validation stays the best
  config.train.pretrained.lr = 0.0
  result = train.train_and_evaluate(config, tmp_path)
  assert result["status"] == "early_stopping"
  assert (result["step"], result["best_step"]) == (12, 4)  # 3 validations, one per epoch
  assert checkpoint.resolve_step_dir(tmp_path / "checkpoints").name == "12"
  again = train.train_and_evaluate(config, tmp_path)  # a finished run is not trained again
  assert (again["status"], again["step"]) == ("early_stopping", 12)


def test_d2s_starts_from_another_runs_params(features, reference, tmp_path):
  ref_dir, _ = reference
  result = train.train_and_evaluate(
      _config(features, mode="d2s", num_epochs=1, init_from=str(ref_dir)), tmp_path)
  assert result["status"] == "completed"
  start, trained = _params(ref_dir), _params(tmp_path / "checkpoints" / "4")
  # d2s keeps the dense side it starts from (here the reference's best) and trains the head.
  _assert_same_params({k: trained[k] for k in ("image_tail", "text_tail", "tau")},
                      {k: start[k] for k in ("image_tail", "text_tail", "tau")})
  assert not np.array_equal(trained["sparse_head"]["proj"]["kernel"],
                            start["sparse_head"]["proj"]["kernel"])
