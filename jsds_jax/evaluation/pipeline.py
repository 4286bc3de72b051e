"""The three-stage pipeline: first stage → CMC over its top K → ITM over CMC's top k′.

DESIGN.md §4 and the CMC paper's setting (bi-encoder → CMC → cross-encoder). For each first
stage (sparse, dense, integrated) four lines, both directions:

  alone       the first stage's ranking;
  +CMC        its top K reordered by CMC, every other document below them in its order;
  +ITM        its top k′ rescored by the cross-encoder (BLIP's recipe on this first stage);
  +CMC+ITM    the cross-encoder over CMC's top k′ of those K, so ITM sees the candidates CMC
              put first.

Every line is a full (queries × documents) score matrix (`cross_encoder.rescore` keeps the
documents outside a stage's candidates in the previous stage's order), so all four are ranked
by `metrics` exactly as eval's own lines.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from jsds_jax.evaluation import cross_encoder as ce
from jsds_jax.evaluation import metrics
from jsds_jax.evaluation import rerank

LINES = ("alone", "+CMC", "+ITM", "+CMC+ITM")


def cmc_matrix(first: np.ndarray, module: Any, params: Any, query_emb: np.ndarray,
               doc_emb: np.ndarray, k: int, batch_size: int = 64) -> np.ndarray:
  """The first stage's ranking with its top K reordered by CMC.

  Args:
    first: (Q, N) first-stage scores, rows = queries.
    module, params: the CMC.
    query_emb: (Q, D), doc_emb: (N, D) CMC's inputs.
    k: K, capped by N.

  Returns:
    (Q, N) float32: CMC's scores at the top K, the first stage's (shifted below them) elsewhere.
  """
  cands = rerank.top_k(first, k)
  s = rerank.cmc_scores(module, params, query_emb, doc_emb, cands, batch_size)
  return ce.rescore(first, cands, s, logit_only=True)


def _both(t2i: np.ndarray, i2t: np.ndarray, cap_index: np.ndarray) -> dict[str, dict]:
  """Metrics of a t2i matrix (captions, images) and an i2t matrix (images, captions)."""
  out = {"t2i": metrics.summarize(metrics.t2i_ranks(t2i, cap_index)),
         "i2t": metrics.summarize(metrics.i2t_ranks(np.asarray(i2t).T, cap_index))}
  for d in out.values():
    d["rsum"] = sum(d[f"R@{r}"] for r in metrics.KS)
  return out


def pipeline_table(score_mats: Mapping[str, np.ndarray], cap_index: np.ndarray,
                   image_emb: np.ndarray, caption_emb: np.ndarray, cmc: tuple[Any, Any],
                   k: int, logit_fns: Mapping[str, ce.LogitFn], settings: ce.RerankSettings,
                   itc: np.ndarray | None = None) -> dict[str, dict[str, dict]]:
  """The four lines for every first stage.

  Args:
    score_mats: {first stage: (N_captions, N_images) scores}.
    cap_index: (N_captions,) image of each caption.
    image_emb, caption_emb: CMC's inputs for the split's images and captions.
    cmc: (module, params) of a CMC trained on this tail.
    k: K, the first stage's candidates CMC reorders (capped by each direction's documents).
    logit_fns: {"t2i", "i2t"}: the cross-encoder's `LogitFn` of each direction
      (`cross_encoder.blip_logit_fn`).
    settings: k′ (`settings.k`), logit_only, queries per call.
    itc: (N_captions, N_images) what is added to the logit (BLIP: its ITC); None = the
      first stage's own scores.

  Returns:
    {first stage: {line: {"t2i"|"i2t": {R@1, R@5, R@10, MRR@10, rsum}}}} with `LINES`.

  Raises:
    RerankError: K < 1 or CMC inputs that do not fit.
  """
  if int(k) < 1:
    raise rerank.RerankError(f"cmc.pipeline_k = {k}: CMC must see at least one candidate")
  module, params = cmc
  out = {}
  for kind, s in score_mats.items():
    mats = {}
    for d in ("t2i", "i2t"):
      first = np.asarray(s, np.float32) if d == "t2i" else np.asarray(s, np.float32).T
      extra = None if itc is None else (np.asarray(itc) if d == "t2i" else np.asarray(itc).T)
      q, docs = rerank.embeddings_for(d, image_emb, caption_emb)
      with_cmc = cmc_matrix(first, module, params, q, docs, k)
      mats[d] = {"alone": first, "+CMC": with_cmc,
                 "+ITM": ce.rerank(first, logit_fns[d], settings, extra),
                 "+CMC+ITM": ce.rerank(with_cmc, logit_fns[d], settings, extra)}
    out[kind] = {line: _both(mats["t2i"][line], mats["i2t"][line], cap_index) for line in LINES}
  return out


def render_markdown(pipe: Mapping[str, Any]) -> str:
  """report["pipeline"] as Markdown: one row per first stage and line."""
  lines = [f"## First stage → CMC (top K = {pipe['k']}) → ITM (top k′ = {pipe['k_prime']})", "",
           "| first stage | line | t2i R@1 | t2i R@5 | t2i R@10 | i2t R@1 | i2t R@5 | i2t R@10 |",
           "|---|---|---|---|---|---|---|---|"]
  for kind, by_line in pipe["table"].items():
    for line, m in by_line.items():
      cells = [f"{m[d][f'R@{r}']:.2f}" for d in ("t2i", "i2t") for r in metrics.KS]
      lines.append(f"| {kind} | {line} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
