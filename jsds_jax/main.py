"""The whole pipeline on one config: encode -> train -> a retrieval table on the test split.

  python -m jsds_jax.main --config configs/demo.py --workdir runs/demo
  jsds-run --config configs/demo.py --workdir runs/demo

Each stage is its own binary too (`jsds_jax.encode`, `jsds_jax.train`); this runner only calls
their library functions in order, so a stage that is already done is skipped: a complete
feature cache is reused, and a finished run in `workdir` is not trained again (an interrupted
one resumes). The table (t2i and i2t R@1/5/10 of the dense, sparse and integrated scores of the
best checkpoint) is printed as Markdown and saved as `test_results.md` / `.json` in `workdir`.
"""

from collections.abc import Mapping, Sequence
import os
import pathlib
import sys
from typing import Any

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from jsds_jax import checkpoint
from jsds_jax import distributed
from jsds_jax import encode
from jsds_jax import train
from jsds_jax.data import feature_cache

TABLE_FILE = "test_results.md"
RESULTS_FILE = "test_results.json"
_KS = (1, 5, 10)


def results_table(results: Mapping[str, Any], title: str = "") -> str:
  """A Markdown table of `train.evaluate_split`'s output: one row per score kind."""
  head = ["scores"] + [f"{d} R@{k}" for d in ("t2i", "i2t") for k in _KS]
  lines = ([f"**{title}**", ""] if title else []) + [
      "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for kind in train.SCORE_KINDS:
    cells = [f"{results[kind][d][f'R@{k}']:.1f}" for d in ("t2i", "i2t") for k in _KS]
    lines.append(f"| {kind} | " + " | ".join(cells) + " |")
  lines += ["", f"sparse vectors: {results['nnz_text']:.1f} non-zeros per caption, "
            f"{results['nnz_image']:.1f} per image; FLOPs {results['flops']:.2f}"]
  return "\n".join(lines)


def run_pipeline(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                 split: str = "test") -> dict[str, Any]:
  """Encodes, trains, and evaluates the best checkpoint on `split`.

  Returns:
    {"train": train_and_evaluate's summary, "test": evaluate_split's metrics (absent when
    training was preempted), "table": the Markdown table}.
  """
  workdir = pathlib.Path(workdir).expanduser().absolute()
  dirs = encode.encode(config, progress=config.train.progress)
  print("Feature cache:\n" + encode.describe(dirs), flush=True)
  summary = train.train_and_evaluate(config, workdir, cache_dirs=dirs)
  print(train.describe(summary), flush=True)
  if summary["status"] == "preempted":
    return {"train": summary}
  if split not in dirs:
    raise ValueError(f"split '{split}' is not in data.splits={tuple(config.data.splits)}")
  params, meta = checkpoint.load_params(workdir)
  results = train.evaluate_split(params, checkpoint.tail_module(meta), dirs[split],
                                 meta["w1"], meta["w2"])
  n = feature_cache.load_split(dirs[split])["meta"]
  title = (f"{meta['backbone']} / {meta['dataset']} {split} ({n['num_images']} images, "
           f"{n['num_captions']} captions), {meta['mode']}, best checkpoint "
           f"{checkpoint.resolve_step_dir(workdir)}")
  table = results_table(results, title)
  (workdir / TABLE_FILE).write_text(table + "\n")
  feature_cache.atomic_write_json(workdir / RESULTS_FILE, {"split": split, **results})
  print(table, flush=True)
  return {"train": summary, "test": results, "table": table}


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
  app.run(main)


if __name__ == "__main__":
  run()
