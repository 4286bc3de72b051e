"""Demo quality study: dense_only, d2s and jsds over several seeds, as mean ± std.

  .venv/bin/python bench/demo_quality.py                       # the README's table
  .venv/bin/python bench/demo_quality.py --aggregate_only      # re-read finished runs
  .venv/bin/python bench/demo_quality.py --tag lam2_0 --modes jsds \
      --override=train.loss.lam2=0                             # a diagnostic variant

Each run is the main job (`python -m jsds_jax.main --config CONFIG --workdir OUT/TAG/MODE-sSEED
--config.seed=SEED`): encode (the demo cache is reused), train, and `jsds_jax.eval` of the best
checkpoint on the test split (`eval/report.json`), which this script condenses into the run's
`test_results.json`. d2s seed s starts from the dense_only run of seed s
(`--config.train.init_from`), as the paper's D2S starts from a trained dense model (`lit` has
no projections, so a d2s run from scratch would distil random tails); with `--jsds_init` jsds
does too (instead of the config's own dense_first stage), so that variants share one dense_only
run per seed. A run whose report exists is not run again.

The table: text→image and image→text R@1/5/10 on the test split for each (mode, score kind),
mean ± sample standard deviation over the seeds, plus the mean non-zeros per caption / image
of the sparse vectors and the best step. Written to OUT/TAG/results.md (and printed) and
OUT/TAG/results.json. When the reports hold lexical metrics (`evaluation/lexical.py`), a second
table has them for the sparse modes (`lexical_table`).
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = ("dense_only", "d2s", "jsds")
KINDS = {"dense_only": ("dense",), "d2s": ("sparse",), "jsds": ("dense", "sparse", "integrated")}
KS = (1, 5, 10)


def run_dir(out: pathlib.Path, tag: str, mode: str, seed: int) -> pathlib.Path:
  return out / tag / f"{mode}-s{seed}"


def _from_report(wd: pathlib.Path) -> bool:
  """Condenses eval/report.json into test_results.json; whether the run is done."""
  rep = wd / "eval" / "report.json"
  if (wd / "test_results.json").exists() or not rep.exists():
    return (wd / "test_results.json").exists()
  r = json.loads(rep.read_text())
  res = {"split": r["split"]["name"] if isinstance(r["split"], dict) else r["split"]}
  for kind in ("dense", "sparse", "integrated"):
    res[kind] = {d: r[d][kind] for d in ("t2i", "i2t")}
  res.update(nnz_text=r["sparsity"]["caption_nnz"], nnz_image=r["sparsity"]["image_nnz"],
             flops=r["sparsity"]["flops"])
  if r.get("lexical"):
    res["lexical"] = r["lexical"]
  if r.get("pruning"):
    res["pruning"] = r["pruning"]
  (wd / "test_results.json").write_text(json.dumps(res, indent=1))
  return True


def run_one(args, mode: str, seed: int) -> pathlib.Path:
  wd = run_dir(args.out, args.tag, mode, seed)
  if _from_report(wd):
    print(f"[skip] {wd} is done", flush=True)
    return wd
  cmd = [sys.executable, "-m", "jsds_jax.main", "--config", args.config, "--workdir", str(wd),
         f"--config.seed={seed}", f"--config.train.mode={mode}",
         "--config.train.progress=False"]
  if mode == "d2s" or (mode == "jsds" and getattr(args, "jsds_init", False)):
    init = run_dir(args.out, args.init_tag or args.tag, "dense_only", seed)
    if not _from_report(init):
      raise SystemExit(f"{mode} seed {seed} needs the dense_only run {init} first")
    cmd.append(f"--config.train.init_from={init}")
  cmd += [f"--config.{o}" for o in args.override]
  wd.mkdir(parents=True, exist_ok=True)
  print("[run]", " ".join(cmd), flush=True)
  t0 = time.time()
  with open(wd / "log.txt", "w") as log:
    rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  print(f"[done] {wd} rc={rc} in {time.time() - t0:.0f} s", flush=True)
  if rc != 0 or not _from_report(wd):
    raise SystemExit(f"run failed (rc={rc}) or left no test results; see {wd / 'log.txt'}")
  return wd


def _fmt(vals, digits=1) -> str:
  m = statistics.fmean(vals)
  s = statistics.stdev(vals) if len(vals) > 1 else 0.0
  return f"{m:.{digits}f} ± {s:.{digits}f}"


def aggregate(out: pathlib.Path, tag: str, modes, seeds) -> str:
  rows, raw = [], {}
  for mode in modes:
    res = {}
    for seed in seeds:
      f = run_dir(out, tag, mode, seed) / "test_results.json"
      if f.exists():
        res[seed] = json.loads(f.read_text())
    if not res:
      continue
    best_steps = []
    for seed in res:
      summ = run_dir(out, tag, mode, seed) / "result.json"
      if summ.exists():
        best_steps.append(json.loads(summ.read_text()).get("best_step"))
    raw[mode] = res
    for kind in KINDS[mode]:
      cells = [_fmt([r[kind][d][f"R@{k}"] for r in res.values()])
               for d in ("t2i", "i2t") for k in KS]
      if kind == "dense":
        nnz = "–"
      else:
        nnz = (f"{statistics.fmean(r['nnz_text'] for r in res.values()):.0f} / "
               f"{statistics.fmean(r['nnz_image'] for r in res.values()):.0f}")
      steps = ",".join(str(s) for s in best_steps)
      rows.append(f"| {mode} | {kind} | " + " | ".join(cells) + f" | {nnz} | {steps} |"
                  + f" {len(res)} |")
  head = ("| mode | scores | t2i R@1 | t2i R@5 | t2i R@10 | i2t R@1 | i2t R@5 | i2t R@10 "
          "| nnz caption / image | best steps | seeds |")
  table = "\n".join([head, "|" + "---|" * 11] + rows)
  (out / tag).mkdir(parents=True, exist_ok=True)
  (out / tag / "results.md").write_text(table + "\n")
  (out / tag / "results.json").write_text(json.dumps(raw, indent=1))
  return table


def lexical_rows(out: pathlib.Path, tag: str, mode: str, seeds) -> dict | None:
  """Mean ± std over the seeds of a sparse mode's lexical metrics (test split), or None.

  Returns:
    {"seeds", "self_grounding", "image_grounding", "max_top_term_share", "max_share_text",
    "max_share_image", "overuse_text", "overuse_image" (each a list over the seeds, in [0, 1];
    over-use: `lexical.most_overused_term`'s excess), "overused" ([(captions' term, images'
    term)] per seed), "top_text" / "top_image" (the
    first seed's most common top terms among the captions / images: [term, share, share whose
    caption holds it]), "nnz_text", "nnz_image", "sparse_t2i_r1", "dense_t2i_r1", "flops"}.
  """
  res = []
  for seed in seeds:
    f = run_dir(out, tag, mode, seed) / "test_results.json"
    if f.exists():
      r = json.loads(f.read_text())
      if "lexical" in r:
        res.append(r)
  if not res:
    return None
  lex = [r["lexical"] for r in res]
  return {"seeds": len(res),
          "self_grounding": [x["caption_self_grounding"] for x in lex],
          "image_grounding": [x["image_grounding"] for x in lex],
          "max_top_term_share": [x["max_top_term_share"] for x in lex],
          "max_share_text": [x.get("max_top_term_share_text", float("nan")) for x in lex],
          "max_share_image": [x.get("max_top_term_share_image", float("nan")) for x in lex],
          "overuse_text": [x.get("overuse_text", float("nan")) for x in lex],
          "overuse_image": [x.get("overuse_image", float("nan")) for x in lex],
          "overused": [(x.get("most_overused_text", ["?"])[0], x.get("most_overused_image",
                                                                      ["?"])[0]) for x in lex],
          "top_text": lex[0].get("top_terms_text", [])[:2],
          "top_image": lex[0].get("top_terms_image", [])[:2],
          "nnz_text": [r["nnz_text"] for r in res], "nnz_image": [r["nnz_image"] for r in res],
          "sparse_t2i_r1": [r["sparse"]["t2i"]["R@1"] for r in res],
          "dense_t2i_r1": [r["dense"]["t2i"]["R@1"] for r in res],
          "flops": [r["flops"] for r in res]}


def lexical_table(out: pathlib.Path, tag: str, modes, seeds) -> str:
  """Markdown: sparse / dense t2i R@1, non-zeros, grounding and the most common top term."""
  head = ("| mode | t2i R@1 sparse | t2i R@1 dense | nnz image / caption | caption "
          "self-grounding@10 | image grounding@10 | top term's share captions / images | "
          "over-use captions / images, points (terms per seed) | "
          "top terms of captions; of images (first seed; share, in brackets the share whose "
          "caption holds the word) | seeds |")
  rows = [head, "|" + "---|" * 10]
  pct = lambda v: _fmt([100 * x for x in v], 0) + "%"
  pts = lambda v: _fmt([100 * x for x in v], 1)
  for mode in modes:
    if mode == "dense_only":
      continue
    r = lexical_rows(out, tag, mode, seeds)
    if r is None:
      continue
    terms = "; ".join(", ".join(f"`{t}` {100 * s:.0f}% ({100 * n:.0f}%)" for t, s, n in side)
                      for side in (r["top_text"], r["top_image"]))
    rows.append(f"| {mode} | {_fmt(r['sparse_t2i_r1'])} | {_fmt(r['dense_t2i_r1'])} | "
                f"{_fmt(r['nnz_image'], 0)} / {_fmt(r['nnz_text'], 0)} | "
                f"{pct(r['self_grounding'])} | {pct(r['image_grounding'])} | "
                f"{pct(r['max_share_text'])} / {pct(r['max_share_image'])} | "
                f"{pts(r['overuse_text'])} / {pts(r['overuse_image'])} ("
                + ", ".join(f"`{a}` / `{b}`" for a, b in r["overused"]) + f") | {terms} | "
                f"{r['seeds']} |")
  return "\n".join(rows) if len(rows) > 2 else ""


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/demo.py")
  p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/quality"))
  p.add_argument("--tag", default="default", help="subfolder of --out for this variant")
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--override", action="append", default=[],
                 help="extra config override without the --config. prefix, e.g. "
                      "train.loss.lam2=0 (repeatable)")
  p.add_argument("--init_tag", default="",
                 help="take d2s's dense_only runs from this tag (default: --tag)")
  p.add_argument("--jsds_init", action="store_true",
                 help="start jsds from the dense_only run of its seed too (see --init_tag)")
  p.add_argument("--aggregate_only", action="store_true")
  args = p.parse_args()
  args.out = args.out.expanduser().absolute()
  modes = [m for m in args.modes.split(",") if m]
  seeds = [int(s) for s in args.seeds.split(",") if s]
  if not args.aggregate_only:
    # dense_only first: d2s starts from it.
    for mode in sorted(modes, key=lambda m: MODES.index(m)):
      for seed in seeds:
        run_one(args, mode, seed)
  print(aggregate(args.out, args.tag, modes, seeds))
  lex = lexical_table(args.out, args.tag, modes, seeds)
  if lex:
    (args.out / args.tag / "lexical.md").write_text(lex + "\n")
    print(lex)


if __name__ == "__main__":
  os.environ.setdefault("PYTHONUNBUFFERED", "1")
  main()
