"""jsds_jax.protocol: the dense_only stage first, then the configured mode from its best params."""

import pathlib

from jsds_jax import config_base
from jsds_jax import protocol
from jsds_jax import train_step


def _config(**train):
  c = config_base.base_config()
  c.train.num_epochs = 50
  c.train.pec = True
  c.train.pec_images = True
  for k, v in train.items():
    c.train[k] = v
  return c


def test_which_runs_get_a_dense_stage():
  assert not protocol.needs_dense_stage(_config())
  assert protocol.needs_dense_stage(_config(dense_first=True))
  assert protocol.needs_dense_stage(_config(dense_first=True, mode="d2s"))
  assert not protocol.needs_dense_stage(_config(dense_first=True, mode="dense_only"))
  assert not protocol.needs_dense_stage(_config(dense_first=True, init_from="/some/run"))


def test_stage_configs():
  c = _config(dense_first=True, dense_first_epochs=20)
  first = protocol.dense_stage_config(c)
  assert (first.train.mode, first.train.pec, first.train.pec_images, first.train.num_epochs) == (
      "dense_only", False, False, 20)
  assert not first.train.dense_first
  assert (c.train.mode, c.train.pec, c.train.num_epochs) == ("jsds", True, 50)  # untouched
  assert protocol.dense_stage_config(_config(dense_first=True)).train.num_epochs == 50
  # Term-level losses act on sparse vectors: off in the dense stage, kept for the second.
  c.train.loss.bow_image, c.train.loss.bow_text, c.train.loss.df_weight = 0.2, 0.3, 0.1
  first = protocol.dense_stage_config(c)
  assert (first.train.loss.bow_image, first.train.loss.bow_text,
          first.train.loss.df_weight) == (0.0, 0.0, 0.0)
  train_step.LossSettings.from_config(first.train, 10)  # a valid dense_only loss
  second = protocol.second_stage_config(c, "/w/dense_stage/best/90")
  assert (second.train.loss.bow_image, second.train.loss.df_weight) == (0.2, 0.1)
  assert second.train.init_from == "/w/dense_stage/best/90" and second.train.mode == "jsds"


def test_run_dense_first_trains_the_stage_in_its_folder(tmp_path):
  calls = []

  def fake_train(config, workdir, **kwargs):
    calls.append((config.train.mode, pathlib.Path(workdir), kwargs))
    return {"status": "completed", "best_dir": str(pathlib.Path(workdir) / "best/9")}

  c = _config(dense_first=True)
  second, summary = protocol.run_dense_first(c, tmp_path, fake_train, cache_dirs={"x": 1})
  assert calls == [("dense_only", tmp_path / "dense_stage", {"cache_dirs": {"x": 1}})]
  assert second.train.init_from == str(tmp_path / "dense_stage/best/9")
  assert summary["status"] == "completed"
  # Off: nothing is trained and the config comes back as it was.
  calls.clear()
  same, none = protocol.run_dense_first(_config(), tmp_path, fake_train)
  assert calls == [] and none is None and same.train.init_from == ""
  # A preempted stage: the config is unchanged, the caller stops.
  preempted = lambda *a, **k: {"status": "preempted", "best_dir": ""}
  same, summary = protocol.run_dense_first(c, tmp_path, preempted)
  assert same.train.init_from == "" and summary["status"] == "preempted"
