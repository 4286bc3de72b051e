"""The paper's two-stage protocol for backbones without pretrained projections (config
`train.dense_first`).

JSDS and D2S fine-tune a *trained* dense model: the paper starts them from BLIP's / ALBEF's
pretrained projections. A backbone without projections (`lit`, the offline demo's) would start
its dense tails at random, and the first part of a JSDS run would then distil from a
near-uniform teacher. With `train.dense_first` the main job first trains the dense tails alone
(`train.mode = "dense_only"`, the stand-in for the pretrained model) in `<workdir>/dense_stage`,
then runs the configured mode from that stage's best checkpoint (`train.init_from`).
"""

import os
import pathlib
from typing import Any, Callable

import ml_collections

DENSE_STAGE_DIR = "dense_stage"


def needs_dense_stage(config: ml_collections.ConfigDict) -> bool:
  """Whether the main job runs a dense_only stage first: `train.dense_first` is on, the mode
  fine-tunes a dense model (jsds or d2s), and no `train.init_from` was given (an explicit
  starting point wins)."""
  tc = config.train
  return bool(tc.dense_first) and tc.mode in ("jsds", "d2s") and not tc.init_from


def dense_stage_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The first stage's config: the same run in dense_only mode, no PEC, no term-level losses
  (they act on sparse vectors), no init_from, and `train.dense_first_epochs` epochs when that is
  set (> 0)."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.train.mode = "dense_only"
  c.train.pec = False
  c.train.pec_images = False
  c.train.loss.bow_image = c.train.loss.bow_text = c.train.loss.df_weight = 0.0
  c.train.init_from = ""
  c.train.dense_first = False
  if c.train.dense_first_epochs > 0:
    c.train.num_epochs = int(c.train.dense_first_epochs)
  return c


def second_stage_config(config: ml_collections.ConfigDict,
                        dense_best_dir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The configured run, starting from the dense stage's best params."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.train.init_from = str(dense_best_dir)
  return c


def run_dense_first(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                    train_fn: Callable[..., dict[str, Any]], **train_kwargs
                    ) -> tuple[ml_collections.ConfigDict, dict[str, Any] | None]:
  """Runs the dense stage if the config asks for it.

  Args:
    config: the experiment config.
    workdir: the main run's workdir; the stage trains in `<workdir>/dense_stage` (resumed or
      skipped like any run there).
    train_fn: `train.train_and_evaluate` (passed in to keep this module free of the binary).
    **train_kwargs: passed to it (e.g. `cache_dirs`).

  Returns:
    (the config of the main stage, the dense stage's summary or None when there is none). A
    preempted dense stage returns the config unchanged and its summary: the caller stops.
  """
  if not needs_dense_stage(config):
    return config, None
  stage_dir = pathlib.Path(workdir) / DENSE_STAGE_DIR
  summary = train_fn(dense_stage_config(config), stage_dir, **train_kwargs)
  if summary["status"] == "preempted" or not summary["best_dir"]:
    return config, summary
  return second_stage_config(config, summary["best_dir"]), summary
