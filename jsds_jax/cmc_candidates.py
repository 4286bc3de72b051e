"""CMC's training candidates, mined once per query with the first stage and cached on disk.

Per query (DESIGN.md §4; yc-song/cmc `data_reranker.py`), with C candidates (64 by default):
its gold documents, the first stage's top C/2 − (number of golds) other documents, and C/2
documents drawn uniformly without replacement from the first stage's ranks [C/2, max_rank),
golds excluded. Every gold is marked as a positive, so in image→text an image's other captions
never act as negatives; a text→image query has the one image of its caption. With fewer than C
documents every document is a candidate.

Beside each candidate the first stage's score is kept: it is the teacher of CMC's KL term,
unless `cross_encoder_teacher` replaces it by a cross-encoder's logits (BLIP's ITM), computed
once per (query, candidate) pair and cached beside the candidates.

Mining applies the trained tail to the split (`tail_outputs.apply_tail`), so it is cached like
encode's features: `<root>/<key>/{meta.json, <direction>.npz}` where the key hashes the tail's
params, the feature cache and the mining settings; a later run with the same inputs reads it.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any

import numpy as np

from jsds_jax import tail_outputs
from jsds_jax.data import feature_cache
from jsds_jax.evaluation import rerank

FIRST_STAGES = ("sparse", "dense", "integrated")
INPUTS = ("dense", "pre_projection")


@dataclasses.dataclass(frozen=True)
class Candidates:
  """One direction's mined training examples.

  Attributes:
    query_ids: (M,) int32 row of each query in its table (captions for t2i, images for i2t).
    candidates: (M, C) int32 rows of the documents (images for t2i, captions for i2t).
    positive: (M, C) bool, True at gold documents.
    teacher: (M, C) float32 first-stage scores of the candidates.
  """

  query_ids: np.ndarray
  candidates: np.ndarray
  positive: np.ndarray
  teacher: np.ndarray


def mine_direction(view: rerank.DirectionView, num_candidates: int = 64, max_rank: int = 1024,
                   seed: int = 0) -> Candidates:
  """Mines C candidates per query from one direction's first-stage scores.

  Args:
    view: `rerank.direction_view` of the training split's first-stage scores.
    num_candidates: C (even, >= 2); capped by the number of documents.
    max_rank: the random half is drawn from ranks [C/2, max_rank) (capped by N).
    seed: seed of the random half.

  Returns:
    `Candidates` with every query that has at least one gold document.
  """
  q, n = view.scores.shape
  if num_candidates < 2:
    raise rerank.RerankError(f"cmc.num_candidates = {num_candidates}: need at least 2 "
                             "(the gold and one other)")
  c = min(num_candidates, n)
  half = c // 2
  top = min(max(max_rank, c), n)
  order = rerank.top_k(view.scores, top)  # (Q, top) best first
  rng = np.random.default_rng(seed)
  rows_q, rows_c = [], []
  for i in range(q):
    all_gold = np.flatnonzero(view.doc_labels == view.query_labels[i])
    if all_gold.size == 0:
      continue
    ranked = order[i]
    others = ranked[view.doc_labels[ranked] != view.query_labels[i]]  # best first
    if c == n:
      chosen = np.concatenate([all_gold, others])[:c]
    else:
      golds = all_gold[:half]
      hard = others[:half - golds.size]
      # Non-gold documents at first-stage ranks [C/2, top), not already taken.
      pool = ranked[half:]
      pool = pool[(view.doc_labels[pool] != view.query_labels[i]) & ~np.isin(pool, hard)]
      rand = rng.choice(pool, size=min(c - half, pool.size), replace=False)
      chosen = np.concatenate([golds, hard, rand])
      if chosen.size < c:  # top too small for the random half: the next ranks fill it
        rest = others[~np.isin(others, chosen)][:c - chosen.size]
        chosen = np.concatenate([chosen, rest])
    rows_q.append(i)
    rows_c.append(chosen)
  cands = np.stack(rows_c).astype(np.int32)
  qs = np.asarray(rows_q, np.int32)
  positive = view.doc_labels[cands] == view.query_labels[qs][:, None]
  teacher = np.take_along_axis(view.scores[qs], cands, axis=1).astype(np.float32)
  return Candidates(qs, cands, positive, teacher)


def _params_hash(params: Mapping[str, Any]) -> str:
  import flax.traverse_util  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  for name, value in sorted(flax.traverse_util.flatten_dict(dict(params), sep="/").items()):
    h.update(name.encode())
    h.update(np.ascontiguousarray(np.asarray(value, np.float32)).tobytes())
  return h.hexdigest()


def tail_hash(params: Mapping[str, Any]) -> str:
  """A short fingerprint of a tail's params: what a CMC checkpoint records of its tail."""
  return _params_hash(params)[:16]


def item_embeddings(out: tail_outputs.TailOutputs, cache: Mapping[str, Any],
                    inputs: str) -> tuple[np.ndarray, np.ndarray]:
  """(image (N_i, D), caption (N_c, D)) embeddings CMC reads.

  Args:
    out: the split's tail outputs. cache: the split's feature cache.
    inputs: "dense" (the tail's e, default) or "pre_projection" (the cached h, which needs
      both towers at the same width).

  Raises:
    RerankError: an unknown `inputs`, or pre-projection states of two widths.
  """
  if inputs == "dense":
    return out.e_i, out.e_t
  if inputs == "pre_projection":
    h_i, h_t = np.asarray(cache["image_pooled"]), np.asarray(cache["text_pooled"])
    if h_i.shape[1] != h_t.shape[1]:
      raise rerank.RerankError(
          f"cmc.inputs='pre_projection' needs image and caption states of one width; this "
          f"cache has {h_i.shape[1]}-d images and {h_t.shape[1]}-d captions: use "
          "cmc.inputs='dense'")
    return h_i.astype(np.float32), h_t.astype(np.float32)
  raise rerank.RerankError(f"cmc.inputs={inputs!r} is not one of {INPUTS}")


def first_stage_scores(out: tail_outputs.TailOutputs, kind: str, w1: float,
                       w2: float) -> np.ndarray:
  """(num_captions, num_images) scores of one first stage (eval's definitions)."""
  from jsds_jax.evaluation import scores as scores_lib  # pylint: disable=g-import-not-at-top
  if kind not in FIRST_STAGES:
    raise rerank.RerankError(f"cmc.first_stage={kind!r} is not one of {FIRST_STAGES}")
  return scores_lib.score_matrices(out, w1, w2)[kind]


def mine(params: Mapping[str, Any], split_dir: str | os.PathLike, *, first_stage: str,
         directions: Sequence[str], num_candidates: int, max_rank: int, seed: int,
         w1: float, w2: float, inputs: str, root: str | os.PathLike,
         backbone: Any = None, own_caption_terms: bool = False,
         scores: np.ndarray | None = None) -> dict[str, Any]:
  """Mines (or reads back) a split's candidates for every direction, and CMC's embeddings.

  `own_caption_terms`: the tail's `model.own_caption_terms` (its captions keep only their own
  tokens, as in its training and eval; `checkpoint.own_caption_terms(meta)`).
  `scores`: (N_c, N_i) `first_stage_scores(apply_tail(params, split), first_stage, w1, w2)` when
  the caller has them already (several seeds mined from one matrix: on a 33,579 x 19,705 split
  with dense-ish sparse vectors the matrix is minutes of CPU); None computes them here.

  Returns:
    {"candidates": {direction: Candidates}, "image_emb": (N_i, D), "caption_emb": (N_c, D),
    "dir": the cache folder, "tail_hash": str, "tau": the tail's τ}.
  """
  split_dir = pathlib.Path(split_dir)
  cache = feature_cache.load_split(split_dir)
  settings = {"split_dir": str(split_dir.resolve()), "first_stage": first_stage,
              "num_candidates": int(num_candidates), "max_rank": int(max_rank),
              "seed": int(seed), "w1": float(w1), "w2": float(w2), "inputs": inputs,
              "weights_hash": cache["meta"].get("weights_hash"), "tail": tail_hash(params)}
  if own_caption_terms:  # only when on: caches mined before the field keep their keys
    settings["own_caption_terms"] = True
  key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
  folder = pathlib.Path(root).expanduser() / key
  out = tail_outputs.apply_tail(params, cache, backbone=backbone,
                                own_caption_terms=own_caption_terms)
  image_emb, caption_emb = item_embeddings(out, cache, inputs)
  result = {"candidates": {}, "image_emb": image_emb, "caption_emb": caption_emb,
            "dir": folder, "tail_hash": settings["tail"], "tau": float(out.tau)}
  for d in directions:
    path = folder / f"{d}.npz"
    if path.exists():
      with np.load(path) as z:
        result["candidates"][d] = Candidates(**{f.name: z[f.name]
                                                for f in dataclasses.fields(Candidates)})
      continue
    if scores is None:
      scores = first_stage_scores(out, first_stage, w1, w2)
    view = rerank.direction_view(scores, cache["caption_image_index"], d)
    cands = mine_direction(view, num_candidates, max_rank, seed)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{d}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **dataclasses.asdict(cands))
    os.replace(tmp, path)
    result["candidates"][d] = cands
  feature_cache.atomic_write_json(folder / "meta.json", settings)
  return result


def cross_encoder_teacher(mined: dict[str, Any], split_dir: str | os.PathLike, module: Any,
                          params: Mapping[str, Any], queries_per_call: int = 8) -> dict[str, Any]:
  """`mine`'s result with every direction's teacher replaced by BLIP's ITM match logits.

  The logits of each (query, candidate) pair are computed once and cached in the candidates'
  folder under a key of the cross-encoder's params (`<direction>.itm-<key>.npy`).

  Args:
    mined: `mine`'s result for `split_dir`.
    split_dir: the training split's feature cache; it must hold `text_token_ids` and
      `image_tokens` (encode with encode.image_tokens=True).
    module, params: the `BlipItm` cross-encoder.
    queries_per_call: queries whose candidates go to the device together.

  Raises:
    RerankError: the cache has no image token states or caption token ids.
  """
  from jsds_jax.evaluation import cross_encoder as ce  # pylint: disable=g-import-not-at-top
  cache = feature_cache.load_split(split_dir)
  missing = [k for k in ("image_tokens", feature_cache.TOKEN_IDS) if k not in cache]
  if missing:
    raise rerank.RerankError(
        f"cmc.teacher='itm' needs {', '.join(missing)} in the training cache '{split_dir}': "
        "encode a blip or albef backbone with --config.encode.image_tokens=True")
  key = _params_hash(params)[:16]
  out = dict(mined, candidates=dict(mined["candidates"]))
  for d, c in mined["candidates"].items():
    path = pathlib.Path(mined["dir"]) / f"{d}.itm-{key}.npy"
    if path.exists():
      logits = np.load(path)
    else:
      fn = ce.blip_logit_fn(module, params, cache[feature_cache.TOKEN_IDS],
                            cache["image_tokens"], d)
      logits = np.concatenate([
          np.asarray(fn(c.query_ids[i:i + queries_per_call],
                        c.candidates[i:i + queries_per_call]), np.float32)
          for i in range(0, len(c.query_ids), queries_per_call)])
      path.parent.mkdir(parents=True, exist_ok=True)
      feature_cache.atomic_save_npy(path, logits)
    out["candidates"][d] = dataclasses.replace(c, teacher=logits.astype(np.float32))
  out["teacher"] = f"itm-{key}"
  return out
