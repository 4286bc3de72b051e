"""The eval report: report.json's contents, and report.md / pruning.png / report.html from it.

  report.json   {"t2i"|"i2t": {"dense"|"sparse"|"integrated"[|"zero_shot"]: {R@1, R@5, R@10,
                MRR@10, rsum}}, "sparsity": {caption_nnz, image_nnz, flops}, "pruning": [...],
                "w1", "w2", "tau", "split", "checkpoint", "mode", "notes"}
"""

from collections.abc import Mapping, Sequence
import io
import pathlib
from typing import Any

import numpy as np

from jsds_jax import atomic
from jsds_jax import explain
from jsds_jax.data import feature_cache
from jsds_jax.evaluation import metrics


def notes_for(meta: Mapping[str, Any] | None, w1: float, w2: float) -> list[str]:
  """What a reader of the report should know about the checkpoint's metadata `meta`."""
  meta = meta or {}
  notes = []
  trained_w = (meta.get("w1"), meta.get("w2"))
  if None not in trained_w and tuple(map(float, trained_w)) != (w1, w2):
    notes.append(f"integrated scores use this config's w1={w1}, w2={w2}; the checkpoint was "
                 f"trained with w1={trained_w[0]}, w2={trained_w[1]}")
  if meta.get("mode") == "dense_only":
    notes.append("a dense_only checkpoint: its sparse head was never trained, so the sparse and "
                 "integrated lines only show where it starts")
  return notes


def build(per_kind: Mapping[str, Mapping[str, Any]], sparsity: Mapping[str, float],
          pruning: Sequence[Mapping[str, Any]], *, w1: float, w2: float, tau: float,
          split: Mapping[str, Any], checkpoint: str, mode: str | None,
          notes: Sequence[str], integrated_formula: str = "w1·cos/τ + w2·z_t·z_i",
          lexical: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """report.json's object.

  Args:
    per_kind: `scores.retrieval(...)`: {kind: {"t2i" | "i2t": metrics}}; the report groups
      them by direction first.
    sparsity: `sparsity.sparsity(...)`. pruning: `pruning.pruning_curve(...)`.
    w1, w2, tau: the integrated score's weights and the temperature.
    split: {"dataset", "name", "num_images", "num_captions", "cache"}.
    checkpoint: the checkpoint path; mode: its train.mode; notes: `notes_for(...)` and more.
    integrated_formula: how the integrated line scores (`scores.INTEGRATED_FORMULAS`).
    lexical: `lexical.lexical_metrics_of(...)`, or None when it could not be computed.
  """
  return {
      "t2i": {kind: m["t2i"] for kind, m in per_kind.items()},
      "i2t": {kind: m["i2t"] for kind, m in per_kind.items()},
      "sparsity": dict(sparsity), "pruning": list(pruning),
      "w1": w1, "w2": w2, "tau": tau, "split": dict(split),
      "checkpoint": str(checkpoint), "mode": mode, "notes": list(notes),
      "integrated_formula": integrated_formula,
      **({"lexical": dict(lexical)} if lexical else {}),
  }


def write(out_dir: pathlib.Path, report: Mapping[str, Any], html: str | None = None) -> None:
  """report.json, report.md, pruning.png and (given `html`) report.html in `out_dir`."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  if html is not None:
    atomic.write_text(out_dir / "report.html", html)
  plot_pruning(report["pruning"], out_dir / "pruning.png", _dense_r1(report))
  atomic.write_text(out_dir / "report.md", render_markdown(report))
  feature_cache.atomic_write_json(out_dir / "report.json", report)


def _fmt(x: float, digits: int = 2) -> str:
  return f"{x:.{digits}f}"


def render_markdown(report: Mapping[str, Any]) -> str:
  """report.json as Markdown: retrieval table, sparsity, pruning curve, notes."""
  lines = [f"# Retrieval on {report['split']['dataset']}/{report['split']['name']} "
           f"({report['split']['num_images']} images, {report['split']['num_captions']} "
           "captions)", "",
           "| retriever | t2i R@1 | t2i R@5 | t2i R@10 | t2i MRR@10 | i2t R@1 | i2t R@5 | "
           "i2t R@10 | i2t MRR@10 | rsum |", "|---|" + "---|" * 9]
  for kind in report["t2i"]:
    t, i = report["t2i"][kind], report["i2t"][kind]
    cells = [_fmt(t[f"R@{k}"]) for k in metrics.KS] + [_fmt(t["MRR@10"], 4)]
    cells += [_fmt(i[f"R@{k}"]) for k in metrics.KS] + [_fmt(i["MRR@10"], 4)]
    lines.append(f"| {kind} | " + " | ".join(cells) + f" | {_fmt(t['rsum'] + i['rsum'])} |")
  sp_ = report["sparsity"]
  lines += ["", f"Sparsity: {_fmt(sp_['caption_nnz'], 1)} non-zeros per caption, "
            f"{_fmt(sp_['image_nnz'], 1)} per image, FLOPs {_fmt(sp_['flops'], 3)} "
            "(D2S: mean over caption-image pairs of the terms both have).", "",
            "## Pruning to the top-k terms of every vector", "",
            "| k | caption nnz | image nnz | FLOPs | sparse t2i R@1 | integrated t2i R@1 |",
            "|---|---|---|---|---|---|"]
  for row in report["pruning"]:
    lines.append(f"| {row['k'] or 'all'} | {_fmt(row['caption_nnz'], 1)} | "
                 f"{_fmt(row['image_nnz'], 1)} | {_fmt(row['flops'], 3)} | "
                 f"{_fmt(row['sparse_R@1'])} | {_fmt(row['integrated_R@1'])} |")
  if report.get("lexical"):
    from jsds_jax.evaluation import lexical  # pylint: disable=g-import-not-at-top
    lines += [""] + lexical.render_markdown(report["lexical"])
  lines += [""] + [f"Note: {n}" for n in report.get("notes", [])]
  formula = report.get("integrated_formula", "w1·cos/τ + w2·z_t·z_i")
  lines.append(f"\nIntegrated score = {formula}; w1 = {report['w1']}, w2 = {report['w2']}, "
               f"τ = {report['tau']:.4g}.")
  if "rerank" in report:
    from jsds_jax.evaluation import rerank  # pylint: disable=g-import-not-at-top
    lines += ["", rerank.render_markdown(report["rerank"]["table"])]
  if "pipeline" in report:
    from jsds_jax.evaluation import pipeline  # pylint: disable=g-import-not-at-top
    lines += ["", pipeline.render_markdown(report["pipeline"])]
  return "\n".join(lines) + "\n"


def _dense_r1(report: Mapping[str, Any]) -> float | None:
  dense = report.get("t2i", {}).get("dense")
  return None if dense is None else float(dense["R@1"])


def plot_pruning(curve: Sequence[Mapping[str, Any]], path: pathlib.Path,
                 dense_r1: float | None = None) -> None:
  """PNG of t2i R@1 against FLOPs, sparse and integrated, each point labelled with its k;
  `dense_r1` (the dense retriever's t2i R@1) as a dashed reference line."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig = pruning_figure(curve, dense_r1)
  with atomic.replacing(path) as tmp:
    fig.savefig(tmp, format="png")
  plt.close(fig)


def pruning_png(curve: Sequence[Mapping[str, Any]], dense_r1: float | None = None) -> bytes:
  """The pruning plot as PNG bytes (report.html embeds it)."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig = pruning_figure(curve, dense_r1)
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  return buf.getvalue()


def pruning_figure(curve: Sequence[Mapping[str, Any]], dense_r1: float | None = None):
  """The matplotlib figure of t2i R@1 against FLOPs, sparse and integrated, each point
  labelled with its k, with the dense R@1 as a dashed reference line when given."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  flops = [r["flops"] for r in curve]
  for key, label in (("sparse_R@1", "sparse"), ("integrated_R@1", "integrated")):
    ax.plot(flops, [r[key] for r in curve], marker="o", label=label)
  if dense_r1 is not None:  # what the sparse terms are measured against
    ax.axhline(dense_r1, color="0.4", linestyle="--", label=f"dense ({dense_r1:.1f}, no terms)")
  for r in curve:
    ax.annotate(str(r["k"] or "all"), (r["flops"], r["sparse_R@1"]), fontsize=7,
                textcoords="offset points", xytext=(3, 3))
  if all(f > 0 for f in flops):
    ax.set_xscale("log")
  ax.set_xlabel("FLOPs (mean shared terms per caption-image pair)")
  ax.set_ylabel("text→image R@1 (%)")
  ax.set_title("Pruning every vector to its top-k terms")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  return fig


def html_examples(out: Any, scores: Mapping[str, np.ndarray], cache: Mapping[str, Any],
                  vocab: Sequence[str], num_queries: int = 8, k: int = 5,
                  terms: int = 6) -> list[explain.Example]:
  """Example queries for the HTML report: captions spread over the split, top-k per retriever.

  Args:
    out: the split's `tail_outputs.TailOutputs`. scores: `scores.score_matrices`.
    cache: the split's cache. vocab: term strings.
    num_queries: how many captions to show. k: images per retriever. terms: terms per item.
  """
  items, cap_index = cache["items"], np.asarray(cache["caption_image_index"])
  n = len(items["captions"])
  first_caption = {}
  for c, i in enumerate(cap_index):
    first_caption.setdefault(int(i), items["captions"][c])
  thumbs: dict[int, str | None] = {}
  examples = []
  for c in np.unique(np.linspace(0, n - 1, min(num_queries, n)).astype(int)):
    ranked = {}
    for kind in ("sparse", "dense"):
      row = scores[kind][c]
      top = np.lexsort((np.arange(len(row)), -row))[:k]
      hits = []
      for i in top:
        i = int(i)
        if i not in thumbs:
          thumbs[i] = explain.thumbnail_data_uri(items["image_sources"][i])
        hits.append(explain.Hit(
            image_id=str(items["image_ids"][i]), score=float(row[i]),
            correct=i == int(cap_index[c]), thumbnail=thumbs[i],
            caption=first_caption.get(i, ""),
            terms=explain.shared_terms(out.z_t[c], out.z_i[i], vocab, terms)))
      ranked[kind] = hits
    examples.append(explain.Example(query=items["captions"][c],
                                    query_terms=explain.top_terms(out.z_t[c], vocab, terms),
                                    ranked=ranked))
  return examples


def render_html(out: Any, scores: Mapping[str, np.ndarray], cache: Mapping[str, Any],
                vocab: Sequence[str], report: Mapping[str, Any]) -> str:
  """report.html: `html_examples` under the split's title, with the report's notes."""
  title = f"JSDS retrieval: {report['split']['dataset']}/{report['split']['name']}"
  return explain.render_html_report(
      html_examples(out, scores, cache, vocab), title=title, notes=report["notes"],
      report=report, pruning_png=pruning_png(report["pruning"], _dense_r1(report)))
