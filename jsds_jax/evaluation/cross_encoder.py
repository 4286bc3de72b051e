"""The cross-encoder stage: rescore each query's top k' candidates with BLIP's ITM head.

BLIP's own retrieval (salesforce/BLIP `train_retrieval.py`, `evaluation()`) takes, per query,
the top k by ITC similarity (k = 256 on COCO, 128 on Flickr30k) and ranks them by

  final = ITM match logit + ITC similarity        (`logit_only`: the logit alone)

while every other candidate stays below them. BLIP fills those with -100; here they keep the
first stage's order beneath the k' rescored ones (shifted below the lowest final score), so a
recall at K > k' still counts the first stage's ranking rather than arbitrary ties.

The stage is split in three so each part is testable on its own:

  * `top_candidates`: the first stage's top k' per query (pure numpy),
  * `rescore`: the final score matrix from the cross-encoder's logits (pure numpy),
  * `rerank`: the two around a `logit_fn(queries, candidates) -> logits` callback, called on a
    few queries at a time; `blip_logit_fn` builds that callback for BLIP's ITM from a feature
    cache (caption token ids and the image tokens `encode.image_tokens` stores).

Score matrices are rows = queries, columns = candidates. For the project's (captions, images)
matrices that is text→image as is; image→text reranks the transpose.
"""

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LogitFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class RerankSettings:
  """How the cross-encoder stage rescores.

  Attributes:
    k: candidates rescored per query (k'); BLIP uses 256 on COCO, 128 on Flickr30k.
    logit_only: final score = the ITM match logit alone, instead of logit + ITC similarity.
    queries_per_call: queries whose k candidates go to the device together.
  """

  k: int = 128
  logit_only: bool = False
  queries_per_call: int = 1

  def __post_init__(self):
    if self.k < 1 or self.queries_per_call < 1:
      raise ValueError(f"k ({self.k}) and queries_per_call ({self.queries_per_call}) must be "
                       "at least 1")


def top_candidates(scores: np.ndarray, k: int) -> np.ndarray:
  """Each query's k best candidates, best first.

  Args:
    scores: (Q, N) first-stage scores.
    k: how many (clipped to N).

  Returns:
    (Q, min(k, N)) int64 candidate columns, in descending score order (ties: lower column
    first).
  """
  scores = np.asarray(scores)
  k = min(int(k), scores.shape[1])
  # A partition first (a COCO row has 5k or 25k columns, k' is a few hundred), then the k
  # sorted by score, equal scores by column, so the order is the same every run.
  part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  vals = np.take_along_axis(scores, part, axis=1)
  order = np.lexsort((part, -vals), axis=-1)
  return np.take_along_axis(part, order, axis=1).astype(np.int64)


def rescore(first: np.ndarray, candidates: np.ndarray, logits: np.ndarray,
            itc: np.ndarray | None = None, logit_only: bool = False) -> np.ndarray:
  """The reranked score matrix.

  Args:
    first: (Q, N) the first stage's scores (they order everything outside the candidates).
    candidates: (Q, k) the rescored candidates of each query (`top_candidates`).
    logits: (Q, k) the cross-encoder's match logit of each (query, candidate) pair.
    itc: (Q, N) the similarity added to the logit (BLIP: its ITC cosine); None = `first`.
    logit_only: the final score is the logit alone.

  Returns:
    (Q, N) float32: at the candidates logit (+ itc), elsewhere the first stage's scores shifted
    so that the row's best non-candidate sits 1 below its worst candidate.
  """
  # float32: a COCO t2i matrix is 25k x 5k; float64 would double every copy.
  first = np.asarray(first, np.float32)
  candidates = np.asarray(candidates)
  logits = np.asarray(logits, np.float32)
  if candidates.shape != logits.shape or candidates.shape[0] != first.shape[0]:
    raise ValueError(f"candidates {candidates.shape} and logits {logits.shape} must both be "
                     f"(Q, k) with Q = {first.shape[0]}")
  rows = np.arange(first.shape[0])[:, None]
  final = logits
  if not logit_only:
    final = final + np.asarray(first if itc is None else itc, np.float32)[rows, candidates]
  picked = np.zeros(first.shape, bool)
  picked[rows, candidates] = True
  rest_max = np.where(picked, -np.inf, first).max(axis=1, keepdims=True)
  shift = np.where(np.isfinite(rest_max), final.min(axis=1, keepdims=True) - 1.0 - rest_max, 0.0)
  out = (first + shift).astype(np.float32)
  out[rows, candidates] = final
  return out


def rerank(first: np.ndarray, logit_fn: LogitFn, settings: RerankSettings,
           itc: np.ndarray | None = None) -> np.ndarray:
  """Rescores every query's top `settings.k` candidates with a cross-encoder.

  Args:
    first: (Q, N) first-stage scores.
    logit_fn: (queries (b,), candidates (b, k)) -> (b, k) match logits.
    settings: k', logit_only, queries per call.
    itc: (Q, N) what is added to the logit; None = `first`.

  Returns:
    (Q, N) reranked scores (`rescore`).
  """
  candidates = top_candidates(first, settings.k)
  logits = np.empty(candidates.shape, np.float32)
  for start in range(0, candidates.shape[0], settings.queries_per_call):
    queries = np.arange(start, min(start + settings.queries_per_call, candidates.shape[0]))
    logits[queries] = np.asarray(logit_fn(queries, candidates[queries]), np.float32)
  return rescore(first, candidates, logits, itc, settings.logit_only)


def caption_inputs(token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The cache's caption token ids (-1 at padding) -> (input_ids, attention_mask) int32."""
  token_ids = np.asarray(token_ids)
  return np.maximum(token_ids, 0).astype(np.int32), (token_ids >= 0).astype(np.int32)


def blip_logit_fn(module: Any, params: Mapping[str, Any], token_ids: np.ndarray,
                  image_tokens: np.ndarray, direction: str) -> LogitFn:
  """BLIP's ITM match logits as a `rerank` callback over a feature cache.

  Args:
    module: a `BlipItm` (jsds_jax/models/trunk/blip_itm.py).
    params: its params.
    token_ids: (N_captions, L) the cache's `text_token_ids` (-1 at padding).
    image_tokens: (N_images, S, D) the cache's `image_tokens` (bf16, memory-mapped: only the
      rows a call needs are read).
    direction: "t2i" (queries are captions, candidates images) or "i2t" (the reverse: one
      image's tokens are shared by its k captions, so they are sent once).

  Returns:
    logit_fn(queries (b,), candidates (b, k)) -> (b, k) float32.
  """
  if direction not in ("t2i", "i2t"):
    raise ValueError(f"direction must be 't2i' or 'i2t', got {direction!r}")
  ids, mask = caption_inputs(token_ids)

  @jax.jit
  def logits(params, ids, mask, images):
    return module.apply({"params": params}, ids, mask, images)[:, 1]

  def image_rows(rows: np.ndarray) -> jax.Array:
    # Sorted reads from the memory map, then put back in the asked order.
    order = np.argsort(rows, kind="stable")
    got = np.asarray(image_tokens[rows[order]], np.float32)
    return jnp.asarray(got[np.argsort(order, kind="stable")])

  def fn(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    queries, candidates = np.asarray(queries), np.asarray(candidates)
    b, k = candidates.shape
    if direction == "t2i":
      caps = np.repeat(queries, k)
      images = image_rows(candidates.reshape(-1))
    else:
      caps = candidates.reshape(-1)
      # One image: its (1, S, D) tokens are shared inside the module (projected once).
      images = image_rows(queries if b == 1 else np.repeat(queries, k))
    return np.asarray(logits(params, ids[caps], mask[caps], images)).reshape(b, k)

  return fn


def itm_lines(scores: Mapping[str, np.ndarray], itc: np.ndarray, cache: Mapping[str, Any],
              module: Any, params: Mapping[str, Any],
              settings: RerankSettings) -> dict[str, dict]:
  """Report lines "<first stage>+itm": each first stage's top k' rescored by BLIP's ITM.

  Args:
    scores: {first stage name: (N_captions, N_images) scores}, e.g. dense / sparse /
      integrated and `zero_shot` (BLIP's own ITC: with it, the line is BLIP's recipe).
    itc: (N_captions, N_images) BLIP's ITC cosine similarities, added to the logits.
    cache: the split's feature cache with `text_token_ids`, `image_tokens` and
      `caption_image_index`.
    module, params: the `BlipItm` cross-encoder.
    settings: k', logit_only, queries per call.

  Returns:
    {"<name>+itm": {"t2i": {R@1, R@5, R@10, MRR@10, rsum}, "i2t": {...}}}.
  """
  from jsds_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  cap_index = np.asarray(cache["caption_image_index"])
  fns = {d: blip_logit_fn(module, params, cache["text_token_ids"], cache["image_tokens"], d)
         for d in ("t2i", "i2t")}
  out = {}
  for name, first in scores.items():
    t2i = rerank(first, fns["t2i"], settings, itc)
    i2t = rerank(np.asarray(first).T, fns["i2t"], settings, np.asarray(itc).T).T
    line = {"t2i": metrics.summarize(metrics.t2i_ranks(t2i, cap_index)),
            "i2t": metrics.summarize(metrics.i2t_ranks(i2t, cap_index))}
    for d in line.values():
      d["rsum"] = sum(d[f"R@{k}"] for k in metrics.KS)
    out[f"{name}+itm"] = line
  return out
