"""The whole pipeline on one config: encode -> train -> eval of the best checkpoint on test.

  python -m jsds_jax.main --config configs/demo.py --workdir runs/demo
  jsds-run --config configs/demo.py --workdir runs/demo

Each stage is its own binary too (`jsds_jax.encode`, `jsds_jax.train`, `jsds_jax.eval`); this
runner only calls their library functions in order, so a stage that is already done is skipped:
a complete feature cache is reused, and a finished run in `workdir` is not trained again (an
interrupted one resumes). The eval table (dense, sparse and integrated retrieval both ways,
sparsity, the pruning curve) is printed and written with the HTML report to `workdir/eval/`.
With `cmc.in_main_job` a CMC reranker is trained on the tail in `workdir/cmc/`
(`jsds_jax.train_cmc`) before the eval, and the report ends with the rerank table: each first
stage alone vs + CMC over its top K.
"""

from collections.abc import Sequence
import os
import pathlib
import sys
from typing import Any

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from jsds_jax import checkpoint
from jsds_jax import cli
from jsds_jax import distributed
from jsds_jax import encode
from jsds_jax import eval as eval_lib
from jsds_jax import protocol
from jsds_jax import train
from jsds_jax.evaluation import report as report_lib
from jsds_jax.models.trunk import backbones

EVAL_DIR = "eval"
CMC_DIR = "cmc"


def run_pipeline(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                 split: str = "test") -> dict[str, Any]:
  """Encodes, trains, and evaluates the best checkpoint on `split` with the eval binary's code.

  With `train.dense_first` (jsds / d2s without init_from) a dense_only stage trains first in
  `workdir/dense_stage` and the run starts from its best params (`jsds_jax.protocol`).

  With `cmc.in_main_job` a CMC is trained on the finished tail in `workdir/cmc` and the eval
  reranks with it (`--rerank cmc`).

  Returns:
    {"train": train_and_evaluate's summary, and unless training was preempted "report":
    `eval.evaluate_checkpoint`'s report, "eval_dir": where report.{json,md,html} went; with
    `cmc.in_main_job` also "cmc": `train_cmc.train_and_evaluate`'s summary}.
  """
  workdir = pathlib.Path(workdir).expanduser().absolute()
  # Loaded once for the three stages (each would load it otherwise).
  backbone = backbones.load_backbone(config.backbone)
  dirs = encode.encode(config, progress=config.train.progress, backbone=backbone)
  print("Feature cache:\n" + encode.describe(dirs), flush=True)
  # train.dense_first: a dense_only stage first, the configured mode then starts from it.
  config, dense_stage = protocol.run_dense_first(config, workdir, train.train_and_evaluate,
                                                 cache_dirs=dirs, backbone=backbone)
  if dense_stage is not None:
    print("Dense stage (train.dense_first): " + train.describe(dense_stage), flush=True)
    if dense_stage["status"] == "preempted":
      return {"train": dense_stage}
  summary = train.train_and_evaluate(config, workdir, cache_dirs=dirs, backbone=backbone)
  print(train.describe(summary), flush=True)
  if summary["status"] == "preempted":
    return {"train": summary}
  if split not in dirs:
    raise ValueError(f"split '{split}' is not in data.splits={tuple(config.data.splits)}")
  result = {"train": summary}
  rerank = ""
  if config.cmc.get("in_main_job", False):
    config, result["cmc"] = _train_cmc(config, workdir, dirs)
    if result["cmc"]["status"] == "preempted":
      return result
    rerank = "cmc"
  eval_dir = workdir / EVAL_DIR
  report = eval_lib.evaluate_checkpoint(config, workdir, eval_dir, split, backbone=backbone,
                                        rerank=rerank)
  print(report_lib.render_markdown(report), flush=True)
  print(f"Best checkpoint: {checkpoint.resolve_step_dir(workdir)}")
  print(f"Report: {eval_dir / 'report.md'} (and report.json, pruning.png)")
  print(f"HTML report: {eval_dir / 'report.html'}", flush=True)
  if rerank:
    print(f"CMC rerank table: {eval_dir / 'report.md'} (and rerank.html)", flush=True)
  return {**result, "report": report, "eval_dir": eval_dir}


def _train_cmc(config: ml_collections.ConfigDict, workdir: pathlib.Path,
               dirs: dict[str, pathlib.Path]) -> tuple[ml_collections.ConfigDict, dict]:
  """Trains (or resumes, or skips if finished) the CMC for the tail in `workdir`.

  Returns:
    (config with cmc.init_from / cmc.checkpoint pointing at the tail and the CMC run, its
    summary).
  """
  from jsds_jax import train_cmc  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()  # the caller's config stays as it was
  config.cmc.init_from = str(workdir)
  config.cmc.checkpoint = str(workdir / CMC_DIR)
  summary = train_cmc.train_and_evaluate(config, workdir / CMC_DIR, cache_dirs=dirs)
  print(f"CMC reranker: training {summary['status']} at step {summary['step']} of "
        f"{summary['total_steps']}; best val reranked R@1 {summary['best_score']:.2f}: "
        f"{summary['best_dir']}", flush=True)
  return config, summary


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.maybe_initialize()
  train.quiet_library_logs()
  try:
    run_pipeline(flags.FLAGS.config, flags.FLAGS.workdir)
  except train.TrainingDivergedError as e:
    print(f"error: training diverged: {e}", file=sys.stderr)
    sys.exit(train.EXIT_DIVERGED)


def run() -> None:
  """Console-script entry point `jsds-run`."""
  # Flags are defined here, not at import, so the binaries' modules can import each other.
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("workdir", "runs/default", "Where checkpoints and reports go.")
  flags.mark_flag_as_required("config")
  cli.run(main, cli.Command(
      "jsds-run", "the whole pipeline on one config: encode -> train -> eval of the best "
      "checkpoint on the test split (a finished stage is skipped, an interrupted run resumes).",
      "--config FILE [--workdir DIR] [--config.SECTION.FIELD=VALUE ...]", ["config", "workdir"],
      ["jsds-run --config configs/demo.py --workdir runs/demo",
       "jsds-run --config configs/demo.py --workdir runs/demo-small "
       "--config.train.num_epochs=10"]))


if __name__ == "__main__":
  run()
