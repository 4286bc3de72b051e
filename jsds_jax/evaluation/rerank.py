"""A first stage's ranking, and the same ranking with its top K reranked by CMC (DESIGN.md §4).

One home for the reranking arithmetic that CMC's validation during training (`train_cmc`), the
eval binary (`--rerank cmc`) and `search` share:

* `direction_view`: a (captions × images) score matrix seen from one direction's queries, with
  labels that say which documents are gold (an image may have several gold captions).
* `top_k`: each query's K best documents by the first stage.
* `cmc_scores`: CMC over those candidates, batched over queries.
* `reranked_ranks`: the 0-based rank of each query's best-placed gold in the final list (the
  top K in CMC's order, then the rest in the first stage's), ties counted against the model
  as `jsds_jax.metrics` counts them.
* `rerank_table`: first stage alone vs + CMC for several first stages, both directions, several
  K, R@1/5/10/16/64 and MRR@10.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsds_jax.evaluation import metrics
from jsds_jax.models.tail import cmc as cmc_lib

DIRECTIONS = ("t2i", "i2t")
RERANK_KS = (16, 64, 256, 1024)
RECALL_KS = (1, 5, 10, 16, 64)


class RerankError(ValueError):
  """Reranking inputs that do not fit (K, missing embeddings, a CMC of another tail)."""


@dataclasses.dataclass(frozen=True)
class DirectionView:
  """One direction's queries against its documents.

  Attributes:
    scores: (Q, N) float32 first-stage scores, rows = queries.
    query_labels: (Q,) int; document n is gold for query q iff doc_labels[n] == query_labels[q].
    doc_labels: (N,) int.
  """

  scores: np.ndarray
  query_labels: np.ndarray
  doc_labels: np.ndarray

  def gold(self, rows: slice | np.ndarray, docs: np.ndarray) -> np.ndarray:
    """(len(rows), ...) bool: is docs[q, ...] gold for query rows[q]."""
    return self.doc_labels[docs] == self.query_labels[rows][:, None]


def direction_view(scores: np.ndarray, caption_image_index: np.ndarray,
                   direction: str) -> DirectionView:
  """Args: scores (num_captions, num_images) as eval's score matrices; direction t2i | i2t."""
  cap = np.asarray(caption_image_index)
  if direction == "t2i":
    return DirectionView(np.asarray(scores, np.float32), cap, np.arange(scores.shape[1]))
  if direction == "i2t":
    return DirectionView(np.ascontiguousarray(np.asarray(scores, np.float32).T),
                         np.arange(scores.shape[1]), cap)
  raise RerankError(f"direction {direction!r} is not one of {DIRECTIONS}")


def first_stage_ranks(view: DirectionView) -> np.ndarray:
  """(Q,) 0-based rank of each query's best gold (ties against the model); N if none."""
  q, n = view.scores.shape
  ranks = np.full(q, n, np.int64)
  for start in range(0, q, 1024):
    rows = slice(start, min(start + 1024, q))
    s = view.scores[rows]
    gold = view.doc_labels[None, :] == view.query_labels[rows][:, None]
    best = np.where(gold, s, -np.inf).max(axis=1, initial=-np.inf)
    ahead = np.sum((s >= best[:, None]) & ~gold, axis=1)
    ranks[rows] = np.where(gold.any(axis=1), ahead, n)
  return ranks


def top_k(scores: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
  """(Q, k) int64 indices of each row's k best scores, best first (ties: lower index first).

  Rows are taken `block` at a time, so the temporaries are O(block · N), not O(Q · N): a
  corpus training matrix (33,579 × 19,705) would otherwise need ~8 GB of them.
  """
  n = scores.shape[1]
  if k <= 0:
    raise RerankError(f"K = {k}: rerank at least one candidate per query")
  k = min(k, n)
  out = np.empty((len(scores), k), np.int64)
  for start in range(0, len(scores), block):
    rows = scores[start:start + block]
    part = (np.argpartition(-rows, k - 1, axis=1)[:, :k] if k < n
            else np.tile(np.arange(n), (len(rows), 1)))
    vals = np.take_along_axis(rows, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    out[start:start + block] = np.take_along_axis(part, order, axis=1)
  return out


@functools.lru_cache(maxsize=16)
def _scorer(module: cmc_lib.CMC):
  return jax.jit(lambda p, q, c, m: module.apply({"params": p}, q, c, m))


def cmc_scores(module: cmc_lib.CMC, params: Any, queries: np.ndarray, docs: np.ndarray,
               candidates: np.ndarray, batch_size: int = 64,
               valid: np.ndarray | None = None) -> np.ndarray:
  """CMC's scores of each query's candidates.

  Args:
    module, params: the CMC.
    queries: (Q, D) query embeddings. docs: (N, D) document embeddings.
    candidates: (Q, K) indices into docs.
    batch_size: queries per call (the last batch is padded so one program serves all).
    valid: (Q, K) bool, False at padded candidates; None = all real.

  Returns:
    (Q, K) float32 (-inf at padding).
  """
  q_count, k = candidates.shape
  if k == 0:
    raise RerankError("K = 0: rerank at least one candidate per query")
  if queries.shape[1] != docs.shape[1]:
    raise RerankError(f"queries are {queries.shape[1]}-d but documents {docs.shape[1]}-d: "
                      "CMC compares them in one sequence, so both need the same width")
  want = cmc_lib.cmc_input_dim(params)
  if queries.shape[1] != want:
    raise RerankError(f"the CMC takes {want}-d embeddings, these are {queries.shape[1]}-d: "
                      "use the tail (and cmc.inputs) it was trained on")
  fn = _scorer(module)
  batch_size = max(1, min(batch_size, q_count))
  out = np.empty((q_count, k), np.float32)
  mask_all = np.ones((q_count, k), bool) if valid is None else np.asarray(valid, bool)
  for start in range(0, q_count, batch_size):
    stop = min(start + batch_size, q_count)
    pad = batch_size - (stop - start)
    idx = np.pad(candidates[start:stop], ((0, pad), (0, 0)))
    qb = np.pad(np.asarray(queries[start:stop], np.float32), ((0, pad), (0, 0)))
    mb = np.pad(mask_all[start:stop], ((0, pad), (0, 0)), constant_values=True)
    s = fn(params, jnp.asarray(qb), jnp.asarray(np.asarray(docs, np.float32)[idx]),
           jnp.asarray(mb))
    out[start:stop] = np.asarray(s)[:stop - start]
  return out


def reranked_ranks(view: DirectionView, candidates: np.ndarray, scores: np.ndarray,
                   first_ranks: np.ndarray | None = None) -> np.ndarray:
  """Rank of each query's best gold after its top-K candidates are reordered by `scores`.

  Args:
    view: the direction's first-stage view.
    candidates: (Q, K) the first stage's top K per query (`top_k`).
    scores: (Q, K) the reranker's scores of those candidates.
    first_ranks: (Q,) `first_stage_ranks(view)`, if already computed.

  Returns:
    (Q,) int64 0-based: within the top K, the number of non-gold candidates scoring at least
    the best gold (ties against the model); a query with no gold in its top K keeps its first-
    stage rank (at least K).
  """
  if first_ranks is None:
    first_ranks = first_stage_ranks(view)
  k = candidates.shape[1]
  gold = view.gold(np.arange(len(candidates)), candidates)
  best = np.where(gold, scores, -np.inf).max(axis=1, initial=-np.inf)
  ahead = np.sum((scores >= best[:, None]) & ~gold, axis=1)
  return np.where(gold.any(axis=1), ahead, np.maximum(first_ranks, k))


def summarize(ranks: np.ndarray) -> dict[str, float]:
  """{"R@1", "R@5", "R@10", "R@16", "R@64" (percent), "MRR@10"}."""
  return {**metrics.recall_at(ranks, RECALL_KS), "MRR@10": metrics.mrr_at(ranks, 10)}


def rerank_direction(view: DirectionView, module: cmc_lib.CMC, params: Any,
                     query_emb: np.ndarray, doc_emb: np.ndarray, ks: Sequence[int],
                     batch_size: int = 64) -> dict[str, Any]:
  """First stage alone and + CMC at each K (capped by the number of documents).

  Returns:
    {"first_stage": summarize, "cmc": {K: summarize}} (duplicate capped Ks collapse).
  """
  first = first_stage_ranks(view)
  out = {"first_stage": summarize(first), "cmc": {}}
  n = view.scores.shape[1]
  for k in ks:
    if k <= 0:
      raise RerankError(f"K = {k} in the rerank Ks: each must be at least 1")
    k_eff = min(int(k), n)
    if k_eff in out["cmc"]:
      continue
    cands = top_k(view.scores, k_eff)
    s = cmc_scores(module, params, query_emb, doc_emb, cands, batch_size)
    out["cmc"][k_eff] = summarize(reranked_ranks(view, cands, s, first))
  return out


def embeddings_for(direction: str, image_emb: np.ndarray | None,
                   caption_emb: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
  """(query embeddings, document embeddings) of a direction; errors name what is missing."""
  for name, x in (("image", image_emb), ("caption", caption_emb)):
    if x is None:
      raise RerankError(f"CMC needs the {name} embeddings of every query and candidate, and "
                        f"this candidate set has none: apply the tail to the split first")
  return (caption_emb, image_emb) if direction == "t2i" else (image_emb, caption_emb)


def rerank_table(score_mats: Mapping[str, np.ndarray], caption_image_index: np.ndarray,
                 image_emb: np.ndarray, caption_emb: np.ndarray, module: cmc_lib.CMC,
                 params: Any, ks: Sequence[int] = RERANK_KS,
                 directions: Sequence[str] = DIRECTIONS,
                 batch_size: int = 64) -> dict[str, Any]:
  """{first stage kind: {direction: rerank_direction(...)}} for every score matrix given."""
  out = {}
  for kind, s in score_mats.items():
    out[kind] = {}
    for d in directions:
      q, docs = embeddings_for(d, image_emb, caption_emb)
      out[kind][d] = rerank_direction(direction_view(s, caption_image_index, d), module, params,
                                      q, docs, ks, batch_size)
  return out


def render_markdown(table: Mapping[str, Any]) -> str:
  """The rerank table as Markdown: one row per first stage, direction and K."""
  lines = ["## First stage alone vs + CMC over its top K", "",
           "| first stage | direction | K | R@1 | R@5 | R@10 | R@16 | R@64 | MRR@10 |",
           "|---|---|---|---|---|---|---|---|---|"]

  def cells(m):
    return " | ".join([f"{m[f'R@{k}']:.2f}" for k in RECALL_KS] + [f"{m['MRR@10']:.4f}"])

  for kind, by_dir in table.items():
    for d, res in by_dir.items():
      lines.append(f"| {kind} | {d} | alone | {cells(res['first_stage'])} |")
      for k, m in res["cmc"].items():
        lines.append(f"| {kind} + CMC | {d} | {k} | {cells(m)} |")
  return "\n".join(lines) + "\n"


def render_html(table: Mapping[str, Any]) -> str:
  """The rerank table as a standalone HTML page."""
  rows = []
  for kind, by_dir in table.items():
    for d, res in by_dir.items():
      for label, k, m in [(kind, "alone", res["first_stage"])] + [
          (f"{kind} + CMC", k, m) for k, m in res["cmc"].items()]:
        vals = "".join(f"<td>{m[f'R@{r}']:.2f}</td>" for r in RECALL_KS)
        rows.append(f"<tr><td>{label}</td><td>{d}</td><td>{k}</td>{vals}"
                    f"<td>{m['MRR@10']:.4f}</td></tr>")
  head = "".join(f"<th>{h}</th>" for h in ("first stage", "direction", "K", "R@1", "R@5",
                                           "R@10", "R@16", "R@64", "MRR@10"))
  return ("<!doctype html><meta charset='utf-8'><title>CMC rerank</title>"
          "<h2>First stage alone vs + CMC over its top K</h2>"
          f"<table border=1 cellpadding=4><tr>{head}</tr>{''.join(rows)}</table>\n")
