"""CMC quality study: CMC variants over seeds on one trained tail, mean ± std.

  .venv/bin/python bench/cmc_quality.py --tail runs/demo                 # the README's table
  .venv/bin/python bench/cmc_quality.py --tail runs/demo --diagnose      # gold ranks, teacher
  .venv/bin/python bench/cmc_quality.py --tail runs/demo --variants tau_ce_glr --seeds 0 1 2
  .venv/bin/python bench/cmc_quality.py --config configs/corpus.py --tail runs/corpus \
      --out runs/cmc_corpus --variants tau_T001_glr --epochs 1      # the corpus tail

Each variant is `train_cmc` (`--config`, configs/demo.py by default, with the paper's CMC fields
from config_base, then the variant's overrides, then the `--override`s) on the frozen tail
`--tail`, then the integrated first stage's top K (16, 64) on the test split reranked by its
best checkpoint. The first stage and its "dense" reference (the same top K reordered by the
dense score: what a CMC with shut gates does) do not depend on the seed. Runs go to
OUT/VARIANT-sSEED; a finished one is read back (so another --config, --override or --epochs
needs another --out). The mined candidates are cached under OUT/candidates. Results:
OUT/results.md (printed) and OUT/results.jsonl.

`--diagnose` prints, per split, the first stage's gold-rank recalls and how peaked its softmax
over the top 64 is (the KL teacher's entropy against the uniform log 64).
"""

import argparse
import json
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> overrides of the cmc section (on top of the paper's CMC fields, 3 epochs).
VARIANTS = {
    "official": {},
    "tau_T001": {"input_scale": "tau", "teacher_temperature": 0.01},
    "tau_T001_glr": {"input_scale": "tau", "teacher_temperature": 0.01, "gate_lr": 0.05},
    "T1_glr": {"gate_lr": 0.05},
    "tau_T001_fixed0": {"input_scale": "tau", "teacher_temperature": 0.01, "gate": "fixed",
                        "gate_init": 0.0},
    "tau_ce_glr": {"input_scale": "tau", "alpha": 1.0, "gate_lr": 0.05},
    "tau_T001_a05_glr": {"input_scale": "tau", "teacher_temperature": 0.01, "alpha": 0.5,
                         "gate_lr": 0.05},
    "tau_ce_glr_C16": {"input_scale": "tau", "alpha": 1.0, "gate_lr": 0.05,
                       "num_candidates": 16},
    # configs/demo.py's main-job CMC: tau_T001_glr at FFN 512, C = 32 (~4x cheaper per query).
    "main_small": {"input_scale": "tau", "teacher_temperature": 0.01, "gate_lr": 0.05,
                   "mlp_dim": 512, "num_candidates": 32},
}
KS = (16, 64)
METRICS = ("R@1", "R@5", "R@16", "R@64")


def load_config(path: str, overrides: list[str]):
  """`path`'s config with `key=value` overrides, parsed as the binaries parse `--config.key=value`
  (`DEFINE_config_file(..., lock_config=True)`: a misspelt field or a bad value fails here)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ["cmc_quality", f"--config={ROOT / path}"] + [f"--config.{o}" for o in overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  try:
    fv(argv)
    fv.config.copy_and_resolve_references()  # config_flags defers a failed load to first use
    return fv.config
  except (OSError, SyntaxError, ImportError) as e:  # the config file itself
    msg = f"cannot load --config {path}: {str(e).strip().splitlines()[-1].strip()}"
  except Exception as e:  # pylint: disable=broad-except
    from jsds_jax import cli  # pylint: disable=g-import-not-at-top
    msg = cli._config_override_message(e, argv).replace("--config.", "--override ")  # pylint: disable=protected-access
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def _get(c, key: str):
  for part in key.split("."):
    c = c[part]
  return c


def _set(c, key: str, value) -> None:
  *path, last = key.split(".")
  for part in path:
    c = c[part]
  c[last] = value


def _config(base, overrides: list[str], variant: str, seed: int, tail: str, epochs: int,
            cands_root: str):
  """`base` (the loaded `--config`) with the paper's CMC fields, the variant's, then the
  `--override`s again (they win), then this run's seed, tail, epochs and candidates root."""
  from jsds_jax import config_base  # pylint: disable=g-import-not-at-top
  c = base.copy_and_resolve_references()
  paper = config_base.base_config()
  for k in paper.cmc:  # the paper's CMC, not a config's small main-job one
    c.cmc[k] = paper.cmc[k]
  for k, v in VARIANTS[variant].items():
    c.cmc[k] = v
  for o in overrides:
    key = o.split("=", 1)[0]
    _set(c, key, _get(base, key))
  c.seed = seed
  c.cmc.init_from = tail
  c.cmc.candidates_root = cands_root
  c.cmc.num_epochs = epochs
  return c


def _test_scores(tail: str, config):
  from jsds_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from jsds_jax import tail_outputs  # pylint: disable=g-import-not-at-top
  from jsds_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  from jsds_jax.data import feature_cache  # pylint: disable=g-import-not-at-top
  from jsds_jax.evaluation import scores as scores_lib  # pylint: disable=g-import-not-at-top
  params, meta = checkpoint.load_params(tail)
  cache = feature_cache.load_split(train_lib.feature_dirs(config, ["test"])["test"])
  out = tail_outputs.apply_tail(params, cache,
                                own_caption_terms=checkpoint.own_caption_terms(meta))
  mats = scores_lib.score_matrices(out, float(config.train.loss.w1), float(config.train.loss.w2),
                                   str(config.eval.integrated))
  return params, cache, out, mats


def references(tail: str, config) -> dict:
  """The integrated first stage alone and its top K reordered by the dense score, test split."""
  from jsds_jax.evaluation import rerank  # pylint: disable=g-import-not-at-top
  _, cache, _, mats = _test_scores(tail, config)
  out = {}
  for d in ("t2i", "i2t"):
    view = rerank.direction_view(mats["integrated"], cache["caption_image_index"], d)
    dense = rerank.direction_view(mats["dense"], cache["caption_image_index"], d)
    first = rerank.first_stage_ranks(view)
    out[f"{d}/first"] = rerank.summarize(first)
    for k in KS:
      c = rerank.top_k(view.scores, k)
      s = np.take_along_axis(dense.scores, c, 1)
      out[f"{d}/dense{k}"] = rerank.summarize(rerank.reranked_ranks(view, c, s, first))
  return out


def premine(args, runs: list[tuple[str, int]]) -> None:
  """Mines the training candidates of every (variant, seed) in `runs` from one first-stage
  score matrix per first stage, into the cache train_cmc then reads back (on the corpus the
  33,579 x 19,705 matrix is most of a run's mining time; `cmc_candidates.mine` alone would
  compute it once per seed)."""
  from jsds_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from jsds_jax import cmc_candidates  # pylint: disable=g-import-not-at-top
  from jsds_jax import tail_outputs  # pylint: disable=g-import-not-at-top
  from jsds_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  from jsds_jax.data import feature_cache  # pylint: disable=g-import-not-at-top
  configs = [_config(args.base, args.override, v, s, args.tail, args.epochs,
                     str(args.out / "candidates")) for v, s in runs]
  params, meta = checkpoint.load_params(args.tail)
  own = checkpoint.own_caption_terms(meta)
  split = train_lib.feature_dirs(configs[0], ["train"])["train"]
  w1, w2 = float(configs[0].train.loss.w1), float(configs[0].train.loss.w2)
  out = tail_outputs.apply_tail(params, feature_cache.load_split(split), own_caption_terms=own)
  for stage in sorted({c.cmc.first_stage for c in configs}):
    scores = cmc_candidates.first_stage_scores(out, stage, w1, w2)
    for c in configs:
      if c.cmc.first_stage == stage:
        cmc_candidates.mine(params, split, first_stage=stage, directions=c.cmc.directions,
                            num_candidates=c.cmc.num_candidates, max_rank=c.cmc.max_rank,
                            seed=c.seed, w1=w1, w2=w2, inputs=c.cmc.inputs,
                            root=c.cmc.candidates_root, own_caption_terms=own, scores=scores)
    del scores


def run_one(args, variant: str, seed: int) -> dict:
  from jsds_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  from jsds_jax import train_cmc  # pylint: disable=g-import-not-at-top
  from jsds_jax import trained_cmc  # pylint: disable=g-import-not-at-top
  wd = args.out / f"{variant}-s{seed}"
  done = wd / "test_rerank.json"
  if done.exists():
    return json.loads(done.read_text())
  config = _config(args.base, args.override, variant, seed, args.tail, args.epochs,
                   str(args.out / "candidates"))
  res = train_cmc.train_and_evaluate(config, wd, cache_dirs=train_lib.feature_dirs(
      config, ["train", config.cmc.val_split]))
  params, cache, out, mats = _test_scores(args.tail, config)
  rep = trained_cmc.cmc_report(res["best_dir"] or str(wd), params, out.e_i, out.e_t, cache,
                               {"integrated": mats["integrated"]}, ks=KS)
  row = {"variant": variant, "seed": seed, "best_step": res["best_step"],
         "val_score": res["best_score"]}
  for d, r in rep["table"]["integrated"].items():
    for k, m in r["cmc"].items():
      row[f"{d}/cmc{k}"] = m
  done.write_text(json.dumps(row))
  return row


def table(refs: dict, rows: list[dict]) -> str:
  cols = [("t2i", "R@1", 16), ("t2i", "R@1", 64), ("t2i", "R@16", 64), ("t2i", "R@64", 64),
          ("i2t", "R@1", 16), ("i2t", "R@1", 64)]
  head = ("| run | seeds | " + " | ".join(f"{d} {m} K={k}" for d, m, k in cols) +
          " | val reranked R@1 |")
  lines = [head, "|---|---|" + "---|" * (len(cols) + 1)]
  lines.append("| integrated alone | – | " + " | ".join(
      f"{refs[f'{d}/first'][m]:.1f}" for d, m, _ in cols) + " | |")
  lines.append("| its top K by dense | – | " + " | ".join(
      f"{refs[f'{d}/dense{k}'][m]:.1f}" for d, m, k in cols) + " | |")
  by = {}
  for r in rows:
    by.setdefault(r["variant"], []).append(r)
  for v, rs in by.items():
    cells = []
    for d, m, k in cols:
      x = np.array([r[f"{d}/cmc{k}"][m] for r in rs])
      cells.append(f"{x.mean():.1f}" + (f" ± {x.std(ddof=1):.1f}" if len(x) > 1 else ""))
    val = np.mean([r["val_score"] for r in rs])
    lines.append(f"| {v} | {len(rs)} | " + " | ".join(cells) + f" | {val:.1f} |")
  return "\n".join(lines) + "\n"


def _teacher_sharpness(scores: np.ndarray, k: int = 64):
  """(mean max p, mean entropy) of softmax over each row's top k."""
  from jsds_jax.evaluation import rerank  # pylint: disable=g-import-not-at-top
  top = np.take_along_axis(scores, rerank.top_k(scores, k), 1)
  p = np.exp(top - top.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  return float(p.max(1).mean()), float(-(p * np.log(p + 1e-30)).sum(1).mean())


def diagnose(tail: str, config) -> None:
  from jsds_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from jsds_jax import tail_outputs  # pylint: disable=g-import-not-at-top
  from jsds_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  from jsds_jax.data import feature_cache  # pylint: disable=g-import-not-at-top
  from jsds_jax.evaluation import rerank  # pylint: disable=g-import-not-at-top
  from jsds_jax.evaluation import scores as scores_lib  # pylint: disable=g-import-not-at-top
  params, meta = checkpoint.load_params(tail)
  dirs = train_lib.feature_dirs(config, ["train", "val", "test"])
  w1, w2 = float(config.train.loss.w1), float(config.train.loss.w2)
  print("| split | first stage | direction | R@1 | R@5 | R@32 | teacher max p (top 64) | "
        f"teacher entropy (uniform {np.log(64):.2f}) |")
  print("|---|---|---|---|---|---|---|---|")
  for split, path in dirs.items():
    cache = feature_cache.load_split(path)
    out = tail_outputs.apply_tail(params, cache,
                                  own_caption_terms=checkpoint.own_caption_terms(meta))
    # The mining's first stages (cmc_candidates.first_stage_scores), computed once per split.
    mats = scores_lib.score_matrices(out, w1, w2)
    for kind in ("dense", "integrated"):
      for d in ("t2i", "i2t"):
        v = rerank.direction_view(mats[kind], cache["caption_image_index"], d)
        r = rerank.first_stage_ranks(v)
        pmax, ent = _teacher_sharpness(v.scores)
        print(f"| {split} | {kind} | {d} | {np.mean(r < 1) * 100:.1f} | "
              f"{np.mean(r < 5) * 100:.1f} | {np.mean(r < 32) * 100:.1f} | "
              f"{pmax:.3f} | {ent:.2f} |", flush=True)
    del mats, out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tail", required=True, help="a trained tail's workdir (of --config's data)")
  p.add_argument("--config", default="configs/demo.py",
                 help="the tail's config file (its data, feature cache and loss weights)")
  p.add_argument("--override", action="append", default=[],
                 help="config override without the --config. prefix, e.g. "
                      "cmc.batch_size=64 (repeatable; applied after the variant's)")
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/cmc_quality"))
  p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  p.add_argument("--seeds", type=int, nargs="+", default=[0])
  p.add_argument("--epochs", type=int, default=3)
  p.add_argument("--diagnose", action="store_true")
  args = p.parse_args(argv)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  args.base = load_config(args.config, args.override)
  config = _config(args.base, args.override, "official", 0, args.tail, args.epochs,
                   str(args.out / "candidates"))
  if args.diagnose:
    diagnose(args.tail, config)
    return
  args.out.mkdir(parents=True, exist_ok=True)
  runs = [(v, s) for v in args.variants for s in args.seeds]
  pending = [r for r in runs if not (args.out / f"{r[0]}-s{r[1]}" / "test_rerank.json").exists()]
  if len(pending) > 1:
    premine(args, pending)
  rows = [run_one(args, v, s) for v, s in runs]
  with open(args.out / "results.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  md = table(references(args.tail, config), rows)
  (args.out / "results.md").write_text(md)
  print(md)


if __name__ == "__main__":
  main()
