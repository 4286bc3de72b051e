"""Sparsity frontier on the demo: sparse t2i R@1 against FLOPs for JSDS and D2S over an η sweep.

  .venv/bin/python bench/sparsity_frontier.py                        # η × 0.25, 1, 4; seeds 0-2
  .venv/bin/python bench/sparsity_frontier.py --etas 1,4 --seeds 0,1,2
  .venv/bin/python bench/sparsity_frontier.py --aggregate_only       # re-read finished runs

The paper's claim under test: JSDS's sparse side is at least as good as D2S's at comparable
sparsity. Each point is one (mode, η factor) over the seeds: the demo config's main job
(`bench/demo_quality.py`'s runs, whose machinery this script imports), jsds and d2s both started
from the dense_only run of the same seed (`train.init_from`, the paper's protocol), with
`train.loss.eta_text` / `eta_image` set to the factor times the config's values. The dense_only
runs' dense t2i R@1 is the reference line. Everything else is the config as it is (its
vocabulary mask, E's learning rate, PEC, bag-of-words target and the checkpoint choice within
`train.select_max_nnz` non-zeros); a run that never gets within that budget keeps its last
checkpoint. CMC is off (`cmc.in_main_job=False`): it does not touch the first stage.

FLOPs is the eval report's: the mean over caption-image pairs of the terms both vectors weight
(Σ_v p_v^t p_v^i, with p_v the share of the split's vectors weighting v). Writes
OUT/frontier.md (the table), OUT/frontier.json and OUT/frontier.png (R@1 against FLOPs, log x,
one point per η with ± std bars, the dense line), and prints the table.
"""

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import demo_quality  # pylint: disable=g-import-not-at-top,wrong-import-position

DENSE_TAG = "dense"
# The dense_only runs as the main job's dense stage trains them (`protocol.dense_stage_config`):
# no PEC and no term-level losses, which act on sparse vectors.
DENSE_OVERRIDES = ["train.pec=False", "train.pec_images=False", "train.loss.bow_image=0.0",
                   "train.loss.bow_text=0.0", "train.loss.df_weight=0.0"]
MODES = ("jsds", "d2s")


def eta_tag(factor: float) -> str:
  return f"eta_x{factor:g}"


def base_etas(config_path: str) -> tuple[float, float]:
  """(eta_text, eta_image) of the config, the values the factors multiply."""
  spec = importlib.util.spec_from_file_location("frontier_config", ROOT / config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  return float(config.train.loss.eta_text), float(config.train.loss.eta_image)


def _args(out: pathlib.Path, config: str, tag: str, overrides: list[str]):
  """The namespace `demo_quality.run_one` reads."""
  return types.SimpleNamespace(out=out, config=config, tag=tag, override=overrides,
                               init_tag=DENSE_TAG, jsds_init=True)


def run_all(out: pathlib.Path, config: str, factors, seeds, modes,
            extra: list[str] = ()) -> None:
  common = ["cmc.in_main_job=False"]
  for seed in seeds:  # dense_only first: every other run starts from it
    demo_quality.run_one(_args(out, config, DENSE_TAG, common + DENSE_OVERRIDES), "dense_only",
                         seed)
  eta_t, eta_i = base_etas(config)
  for factor in factors:
    over = common + list(extra) + [f"train.loss.eta_text={eta_t * factor:g}",
                                   f"train.loss.eta_image={eta_i * factor:g}"]
    for mode in modes:
      for seed in seeds:
        demo_quality.run_one(_args(out, config, eta_tag(factor), over), mode, seed)


def _results(out: pathlib.Path, tag: str, mode: str, seeds) -> list[dict]:
  res = []
  for seed in seeds:
    f = demo_quality.run_dir(out, tag, mode, seed) / "test_results.json"
    if f.exists():
      res.append(json.loads(f.read_text()))
  return res


def _mean_std(vals) -> tuple[float, float]:
  return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def collect(out: pathlib.Path, factors, seeds, modes) -> dict:
  """{"dense_only": {"t2i_r1": (m, s), "seeds": n}, "points": [{mode, factor, seeds, t2i_r1,
  i2t_r1, flops, nnz_text, nnz_image: (mean, std)}]}."""
  dense = _results(out, DENSE_TAG, "dense_only", seeds)
  data = {"dense_only": ({"t2i_r1": _mean_std([r["dense"]["t2i"]["R@1"] for r in dense]),
                          "seeds": len(dense)} if dense else None), "points": []}
  for mode in modes:
    for factor in factors:
      res = _results(out, eta_tag(factor), mode, seeds)
      if not res:
        continue
      data["points"].append({
          "mode": mode, "factor": factor, "seeds": len(res),
          "t2i_r1": _mean_std([r["sparse"]["t2i"]["R@1"] for r in res]),
          "i2t_r1": _mean_std([r["sparse"]["i2t"]["R@1"] for r in res]),
          "flops": _mean_std([r["flops"] for r in res]),
          "nnz_text": _mean_std([r["nnz_text"] for r in res]),
          "nnz_image": _mean_std([r["nnz_image"] for r in res])})
  return data


def table(data: dict) -> str:
  f = lambda ms, d=1: f"{ms[0]:.{d}f} ± {ms[1]:.{d}f}"
  rows = ["| mode | η factor | sparse t2i R@1 | sparse i2t R@1 | FLOPs | nnz image / caption "
          "| seeds |", "|---|---|---|---|---|---|---|"]
  for p in data["points"]:
    rows.append(f"| {p['mode']} | ×{p['factor']:g} | {f(p['t2i_r1'])} | {f(p['i2t_r1'])} | "
                f"{f(p['flops'], 2)} | {f(p['nnz_image'], 0)} / {f(p['nnz_text'], 0)} | "
                f"{p['seeds']} |")
  if data["dense_only"]:
    d = data["dense_only"]
    rows.append(f"| dense_only (dense) | – | {f(d['t2i_r1'])} | – | – | – | {d['seeds']} |")
  return "\n".join(rows)


def plot(data: dict, path: pathlib.Path) -> bool:
  """R@1 against FLOPs (log x); False when matplotlib is missing."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  fig, ax = plt.subplots(figsize=(6, 4))
  for mode, marker in zip(MODES, ("o", "s")):
    pts = sorted((p for p in data["points"] if p["mode"] == mode), key=lambda p: p["flops"][0])
    if not pts:
      continue
    ax.errorbar([p["flops"][0] for p in pts], [p["t2i_r1"][0] for p in pts],
                xerr=[p["flops"][1] for p in pts], yerr=[p["t2i_r1"][1] for p in pts],
                marker=marker, capsize=3, label=f"{mode} sparse")
    for p in pts:
      ax.annotate(f"η×{p['factor']:g}", (p["flops"][0], p["t2i_r1"][0]),
                  textcoords="offset points", xytext=(4, 4), fontsize=7)
  if data["dense_only"]:
    m, s = data["dense_only"]["t2i_r1"]
    ax.axhline(m, color="gray", linestyle="--", label=f"dense_only dense ({m:.1f})")
    ax.axhspan(m - s, m + s, color="gray", alpha=0.15)
  ax.set_xscale("log")
  ax.set_xlabel("FLOPs (mean shared terms per caption-image pair, test split)")
  ax.set_ylabel("t2i R@1 (test, 79 images)")
  ax.set_title("Demo: sparse R@1 vs FLOPs over η (mean ± std over seeds)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/demo.py")
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/frontier"))
  p.add_argument("--etas", default="0.25,1,4", help="η factors (× the config's eta_text and "
                 "eta_image)")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--override", action="append", default=[],
                 help="extra config override of the jsds / d2s runs (not dense_only), without "
                      "the --config. prefix (repeatable); keep --out apart per set")
  p.add_argument("--aggregate_only", action="store_true")
  args = p.parse_args()
  out = args.out.expanduser().absolute()
  factors = [float(x) for x in args.etas.split(",") if x]
  seeds = [int(s) for s in args.seeds.split(",") if s]
  modes = [m for m in args.modes.split(",") if m]
  if not factors or not seeds or any(m not in MODES for m in modes):
    raise SystemExit(f"--etas and --seeds need values and --modes is a subset of {MODES}")
  if not args.aggregate_only:
    run_all(out, args.config, factors, seeds, modes, args.override)
  data = collect(out, factors, seeds, modes)
  out.mkdir(parents=True, exist_ok=True)
  md = table(data)
  (out / "frontier.md").write_text(md + "\n")
  (out / "frontier.json").write_text(json.dumps(data, indent=1))
  if plot(data, out / "frontier.png"):
    print(f"plot: {out / 'frontier.png'}")
  else:
    print("matplotlib is not installed: no plot")
  print(md)


if __name__ == "__main__":
  os.environ.setdefault("PYTHONUNBUFFERED", "1")
  main()
