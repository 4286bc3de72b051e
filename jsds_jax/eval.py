"""`eval`: a trained tail on one split's feature cache: dense, sparse and integrated retrieval.

  python -m jsds_jax.eval --config configs/demo.py --checkpoint runs/demo --out runs/demo/eval
  jsds-eval --config configs/blip_coco.py --checkpoint runs/coco --out runs/coco/eval-flickr \
      --config.data.name=karpathy --config.data.json=PATH/dataset_flickr30k.json \
      --config.data.image_root=PATH/flickr30k-images --split test

The config picks the backbone and the dataset exactly as `encode` does (same overrides, same
cache key), so a model trained on one dataset is evaluated on any other by overriding
`config.data`; a missing cache is built first. The checkpoint must come from the same backbone
(name and weights) as the cache; a mismatch stops with an error naming the field.

OUTDIR receives (each file written to a temporary name, then renamed):
  report.json   {"t2i"|"i2t": {"dense"|"sparse"|"integrated"[|"zero_shot"]: {R@1, R@5, R@10,
                MRR@10, rsum}}, "sparsity": {caption_nnz, image_nnz, flops}, "pruning": [...],
                ...}; recalls in percent, ties counted against the model (`metrics`).
  report.md     the same as Markdown tables.
  pruning.png   t2i R@1 against FLOPs as every vector keeps only its top-k terms.
  report.html   example queries, their top images (sparse | dense) and the shared terms.
  index/        an exact inverted index of the split's image sparse vectors, and beside it
  search.json, image_dense.npy, tail.safetensors   what `jsds-search` needs (see search.py).
"""

from collections.abc import Mapping, Sequence
import json
import os
import pathlib
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
import flax.traverse_util
import jax
import ml_collections
import numpy as np
import scipy.sparse as sp

from jsds_jax import distributed
from jsds_jax import explain
from jsds_jax import metrics
from jsds_jax import tail_outputs
from jsds_jax.data import feature_cache
from jsds_jax.evaluation import lexical
from jsds_jax.index import inputs as index_inputs
from jsds_jax.index import pruning
from jsds_jax.models import dense_tail
from jsds_jax.models import jsds

KINDS = ("dense", "sparse", "integrated")
PRUNE_KS = (4, 8, 16, 32, 64, 128, None)  # None: every term kept
INDEX_DIR = "index"
SEARCH_META = "search.json"
IMAGE_DENSE = "image_dense.npy"
TAIL_PARAMS = "tail.safetensors"
_FLOPS_BLOCK = 4096


class EvalError(ValueError):
  """The checkpoint, the cache and the split do not fit together, or the split is missing."""


# ----------------------------------------------------------------------------------------------
# Compatibility of a checkpoint with a cache.


def _meta_get(meta: Mapping[str, Any] | None, name: str) -> Any:
  """`meta[name]`, or None without metadata (`checkpoint.make_metadata` names the fields)."""
  return (meta or {}).get(name)


def check_compatible(params: Mapping[str, Any], cache_meta: Mapping[str, Any],
                     meta: Mapping[str, Any] | None = None, vocab_size: int | None = None) -> None:
  """Raises EvalError naming the first thing a checkpoint and a feature cache disagree on.

  Args:
    params: the tail's params (their shapes fix the feature widths and |V|).
    cache_meta: the split cache's meta.json.
    meta: the checkpoint's metadata (backbone, weights_hash, vocab_size, ...), if known.
    vocab_size: the backbone's |V| (its word embeddings), if known.
  """
  dims = tail_outputs.feature_dims(params)
  for field in ("backbone", "weights_hash"):
    have = _meta_get(meta, field)
    if have is not None and have != cache_meta.get(field):
      raise EvalError(f"checkpoint {field} is {have!r} but the feature cache's is "
                      f"{cache_meta.get(field)!r}: evaluate with the backbone it was trained "
                      "on (--config.backbone.*)")
  arrays = cache_meta.get("arrays", {})
  for kind in ("image", "text"):
    want = dims[f"{kind}_dim"]
    have = _meta_get(meta, f"{kind}_dim")
    if have is not None and int(have) != want:
      raise EvalError(f"checkpoint metadata says {kind}_dim={have} but its params take {want}")
    shape = arrays.get(f"{kind}_pooled", {}).get("shape")
    if shape is not None and shape[-1] != want:
      raise EvalError(f"{kind} feature dims differ: the checkpoint takes {want}-d {kind} "
                      f"features, the cache holds {shape[-1]}-d ones (another backbone?)")
  for source, v in (("checkpoint metadata", _meta_get(meta, "vocab_size")),
                    ("backbone", vocab_size)):
    if v is not None and int(v) != dims["vocab_size"]:
      raise EvalError(f"vocabulary size differs: the checkpoint's sparse head has "
                      f"{dims['vocab_size']} terms, the {source} {int(v)}")


# ----------------------------------------------------------------------------------------------
# Scores and metrics.


def sparse_score_matrix(z_t: sp.csr_matrix, z_i: sp.csr_matrix,
                        block: int = 1024) -> np.ndarray:
  """S_s = z_t z_iᵀ of every caption against every image.

  A trained head's vectors hold tens to hundreds of terms, where the sparse product costs a
  few multiply-adds per pair. An untrained or weakly regularised head's hold thousands, where
  that product is minutes on COCO and a dense matmul on the device is seconds; the dense path
  is taken when the expected shared terms per pair exceed V/256 (about where they break even
  on a CPU).

  Args:
    z_t: (N_captions, V) CSR. z_i: (N_images, V) CSR.
    block: captions densified at a time on the dense path.

  Returns:
    (N_captions, N_images) float32.
  """
  v = z_t.shape[1]
  share_t = np.bincount(z_t.indices, minlength=v) / max(1, z_t.shape[0])
  share_i = np.bincount(z_i.indices, minlength=v) / max(1, z_i.shape[0])
  if float(share_t @ share_i) * 256 < v:
    return np.asarray((z_t @ z_i.T).toarray(), np.float32)
  dense_i = jax.device_put(z_i.toarray())
  out = np.empty((z_t.shape[0], z_i.shape[0]), np.float32)
  for start in range(0, z_t.shape[0], block):
    rows = z_t[start:start + block].toarray()
    out[start:start + len(rows)] = np.asarray(jsds.sparse_scores(dense_i, rows)).T
  return out


INTEGRATED_FORMULAS = {"cosine": "w1·cos + w2·z_t·z_i", "tau": "w1·cos/τ + w2·z_t·z_i"}


def score_matrices(out: tail_outputs.TailOutputs, w1: float, w2: float,
                   integrated: str = "cosine") -> dict[str, np.ndarray]:
  """Dense, sparse and integrated scores of every caption against every image.

  Args:
    out: the split's tail outputs.
    w1, w2: the integrated score's weights.
    integrated: "cosine" (the official eval, no τ: w1·cos + w2·sparse) or "tau" (the training
      loss's w1·cos/τ + w2·sparse); see `INTEGRATED_FORMULAS`.

  Returns:
    {"dense", "sparse", "integrated", "integrated_dense" (the dense part the integrated score
    adds: cos or cos/τ)}: (num_captions, num_images) float32; dense = e·e/τ.
  """
  if integrated not in INTEGRATED_FORMULAS:
    raise EvalError(f"eval.integrated must be one of {sorted(INTEGRATED_FORMULAS)}, got "
                    f"{integrated!r}")
  cos = np.asarray(jsds.dense_scores(out.e_i, out.e_t, 1.0)).T
  dense = np.asarray(jsds.dense_scores(out.e_i, out.e_t, out.tau)).T
  sparse = sparse_score_matrix(out.z_t, out.z_i)
  part = cos if integrated == "cosine" else dense
  integ = np.asarray(jsds.integrated_scores(part, sparse, w1, w2), np.float32)
  return {"dense": dense, "sparse": sparse, "integrated": integ, "integrated_dense": part}


def zero_shot_scores(tail_init: Mapping[str, np.ndarray],
                     cache: Mapping[str, Any]) -> np.ndarray | None:
  """The backbone's own dense retrieval (its projections, before any training), or None.

  Args:
    tail_init: `feature_cache.load_tail_init` of the cache's backbone.
    cache: the split's cache.

  Returns:
    (num_captions, num_images) cosine similarities, or None when the backbone has no
    projections (`lit`).
  """
  if "image_proj.kernel" not in tail_init or "text_proj.kernel" not in tail_init:
    return None

  def project(h, prefix):
    x = np.asarray(h, np.float32) @ tail_init[f"{prefix}.kernel"]
    if f"{prefix}.bias" in tail_init:
      x = x + tail_init[f"{prefix}.bias"]
    return np.asarray(dense_tail.l2_normalize(x))

  return project(cache["text_pooled"], "text_proj") @ project(cache["image_pooled"],
                                                              "image_proj").T


def _csr_blocks(z: sp.csr_matrix, block: int):
  for start in range(0, z.shape[0], block):
    yield z[start:start + block]


def sparsity(z_t: sp.csr_matrix, z_i: sp.csr_matrix, block: int = _FLOPS_BLOCK) -> dict:
  """Mean non-zeros per caption and per image, and D2S FLOPs (captions query images).

  `metrics.sparse_flops` and `metrics.mean_nnz` take dense arrays; both are means over rows
  (FLOPs a bilinear one), so they are evaluated block by block and the blocks averaged with
  their sizes as weights: memory holds one dense block of captions and the images as booleans
  (COCO 5k: 150 MB) instead of every vector dense (3 GB for its 25k captions).

  Args:
    z_t: (N_captions, V) CSR. z_i: (N_images, V) CSR.
    block: rows densified at a time.

  Returns:
    {"caption_nnz", "image_nnz", "flops"}.
  """
  def nnz(z):
    return sum(b.shape[0] * metrics.mean_nnz(b.toarray()) for b in _csr_blocks(z, block)) / (
        z.shape[0])

  doc_blocks = [b.toarray() != 0 for b in _csr_blocks(z_i, block)]
  flops = 0.0
  for q in _csr_blocks(z_t, block):
    q = q.toarray() != 0
    for d in doc_blocks:
      flops += q.shape[0] * d.shape[0] * metrics.sparse_flops(q, d)
  return {"caption_nnz": nnz(z_t), "image_nnz": nnz(z_i),
          "flops": flops / (z_t.shape[0] * z_i.shape[0])}


def prune_topk(z: sp.csr_matrix, k: int | None) -> sp.csr_matrix:
  """Each row keeps its k largest weights (ties: the smaller term id, as the index prunes)."""
  if k is None:
    return z
  z = sp.csr_matrix(z)
  if not z.has_sorted_indices:
    z = z.sorted_indices()  # a copy: the caller's matrix is left alone
  rows = index_inputs.CsrRows(z.indptr.astype(np.int64), z.indices.astype(np.int32),
                              z.data.astype(np.float32), z.shape[1])
  rows = pruning.prune_rows(rows, k)
  return sp.csr_matrix((rows.data, rows.indices, rows.indptr), shape=z.shape)


def pruning_curve(out: tail_outputs.TailOutputs, dense: np.ndarray,
                  caption_image_index: np.ndarray, w1: float, w2: float,
                  ks: Sequence[int | None] = PRUNE_KS,
                  sparse: np.ndarray | None = None) -> list[dict]:
  """t2i R@1 of sparse and integrated retrieval as vectors keep only their top-k terms.

  Args:
    out: the split's tail outputs.
    dense: (num_captions, num_images) the dense part of the integrated score (cos or cos/τ,
      `score_matrices`' "integrated_dense"); pruning leaves it alone.
    caption_image_index: (num_captions,).
    w1, w2: the integrated score's weights.
    ks: terms kept per vector (captions and images alike); None keeps all.
    sparse: the unpruned sparse scores, if already computed (reused for k = None).

  Returns:
    One dict per k: {"k", "caption_nnz", "image_nnz", "flops", "sparse_R@1",
    "integrated_R@1"}, in the order of `ks`.
  """
  def r1(scores):
    return metrics.recall_at(metrics.t2i_ranks(scores, caption_image_index), (1,))["R@1"]

  # Largest k first, each pruned from the one before: the top-k of the top-k' (k < k') is the
  # top-k (same tie rule), and the big vectors are then pruned only once.
  order = sorted(ks, key=lambda k: float("inf") if k is None else k, reverse=True)
  z_t, z_i = out.z_t, out.z_i
  rows = {}
  for k in order:
    z_t, z_i = prune_topk(z_t, k), prune_topk(z_i, k)
    s = sparse if k is None and sparse is not None else sparse_score_matrix(z_t, z_i)
    integ = np.asarray(jsds.integrated_scores(dense, s, w1, w2), np.float32)
    rows[k] = {"k": k, **sparsity(z_t, z_i), "sparse_R@1": r1(s), "integrated_R@1": r1(integ)}
  return [rows[k] for k in ks]


def _tail_init_for(split_dir: pathlib.Path) -> dict[str, np.ndarray] | None:
  # The cache layout puts tail_init beside the dataset folders: <backbone dir>/<dataset>/<split>.
  path = pathlib.Path(split_dir).parents[1] / feature_cache.TAIL_INIT
  return feature_cache.load_tail_init(path) if path.exists() else None


# ----------------------------------------------------------------------------------------------
# Files.


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)


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
    lines += [""] + lexical.render_markdown(report["lexical"])
  lines += [""] + [f"Note: {n}" for n in report.get("notes", [])]
  formula = report.get("integrated_formula", INTEGRATED_FORMULAS["tau"])
  lines.append(f"\nIntegrated score = {formula}; w1 = {report['w1']}, w2 = {report['w2']}, "
               f"τ = {report['tau']:.4g}.")
  return "\n".join(lines) + "\n"


def plot_pruning(curve: Sequence[Mapping[str, Any]], path: pathlib.Path) -> None:
  """PNG of t2i R@1 against FLOPs, sparse and integrated, each point labelled with its k."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  flops = [r["flops"] for r in curve]
  for key, label in (("sparse_R@1", "sparse"), ("integrated_R@1", "integrated")):
    ax.plot(flops, [r[key] for r in curve], marker="o", label=label)
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
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  fig.savefig(tmp, format="png")
  plt.close(fig)
  os.replace(tmp, path)


def save_tail_params(path: pathlib.Path, params: Mapping[str, Any]) -> None:
  """The tail's params as one safetensors file ("a/b/c" names), written atomically."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  flat = flax.traverse_util.flatten_dict(jax.device_get(dict(params)), sep="/")
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  # np.array, not np.ascontiguousarray: the latter turns the 0-d τ into shape (1,).
  safetensors.numpy.save_file({k: np.array(v, np.float32, order="C") for k, v in flat.items()},
                              str(tmp))
  os.replace(tmp, path)


def load_tail_params(path: str | os.PathLike) -> dict:
  """Reads `save_tail_params`' file back into the nested params dict."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  flat = safetensors.numpy.load_file(str(path))
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def model_metadata(backbone_name: str, weights_hash: str, vocab_size: int,
                   checkpoint: str) -> dict[str, Any]:
  """What an index of this model's vectors records, and what `search` checks it against."""
  return {"backbone": backbone_name, "weights_hash": weights_hash, "vocab_size": int(vocab_size),
          "checkpoint": str(checkpoint)}


def write_search_files(out_dir: pathlib.Path, out: tail_outputs.TailOutputs,
                       params: Mapping[str, Any], cache: Mapping[str, Any],
                       config: ml_collections.ConfigDict, model: dict[str, Any],
                       w1: float, w2: float, integrated: str = "tau") -> pathlib.Path:
  """The exact index of the image sparse vectors and what `search` needs beside it."""
  from jsds_jax import index as index_lib  # pylint: disable=g-import-not-at-top
  # float32 postings: the index's scores are the same dot products eval reports.
  index = index_lib.build_index(out.z_i, "exact", quantization="float32", model=model)
  path = index.save(out_dir / INDEX_DIR, overwrite=True)
  feature_cache.atomic_save_npy(out_dir / IMAGE_DENSE, out.e_i.astype(np.float32))
  save_tail_params(out_dir / TAIL_PARAMS, params)
  items = cache["items"]
  feature_cache.atomic_write_json(out_dir / SEARCH_META, {
      "model": model, "config": json.loads(config.to_json_best_effort()),
      "w1": w1, "w2": w2, "tau": out.tau, "integrated": integrated,
      "dataset": cache["meta"].get("dataset"), "split": cache["meta"].get("split"),
      "image_ids": [str(x) for x in items["image_ids"]],
      "image_sources": [str(x) for x in items["image_sources"]],
      "captions": list(items["captions"]),
      "caption_image_index": np.asarray(cache["caption_image_index"]).tolist()})
  return path


def html_examples(out: tail_outputs.TailOutputs, scores: Mapping[str, np.ndarray],
                  cache: Mapping[str, Any], vocab: Sequence[str], num_queries: int = 8,
                  k: int = 5, terms: int = 6) -> list[explain.Example]:
  """Example queries for the HTML report: captions spread over the split, top-k per retriever.

  Args:
    out: tail outputs. scores: `score_matrices`. cache: the split's cache. vocab: term strings.
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


# ----------------------------------------------------------------------------------------------
# The library entry point.


def evaluate(config: ml_collections.ConfigDict, params: Mapping[str, Any],
             split_dir: str | os.PathLike, out_dir: str | os.PathLike,
             meta: Mapping[str, Any] | None = None, *, backbone: Any = None,
             checkpoint: str = "", html_report: bool = True, write_index: bool = True,
             batch_size: int = 1024) -> dict[str, Any]:
  """Evaluates a tail on one split's feature cache and writes the report files to `out_dir`.

  Args:
    config: the experiment config (train.loss.w1/w2 weight the integrated score; backbone
      section for `search`).
    params: the tail's params.
    split_dir: the split's feature cache.
    out_dir: where the reports, index and search files go (created).
    meta: the checkpoint's metadata (backbone, weights_hash, vocab_size, ...) for the checks.
    backbone: the loaded backbone (its vocabulary names terms in the HTML report); loaded from
      `config.backbone` when needed and not given.
    checkpoint: the checkpoint path, recorded in the index's model metadata.
    html_report: also write report.html.
    write_index: also write the index and the search files.
    batch_size: rows per device call when applying the tail.

  Returns:
    The report (what report.json holds).

  Raises:
    EvalError: the checkpoint does not fit the cache.
    CacheError: `split_dir` holds no finished cache.
  """
  split_dir, out_dir = pathlib.Path(split_dir), pathlib.Path(out_dir)
  cache = feature_cache.load_split(split_dir)
  check_compatible(params, cache["meta"], meta,
                   vocab_size=backbone.vocab_size if backbone is not None else None)
  if (html_report or write_index) and backbone is None:
    from jsds_jax.models import backbones  # pylint: disable=g-import-not-at-top
    backbone = backbones.load_backbone(config.backbone)
  if backbone is not None:
    feature_cache.check_matches(cache["meta"], backbone=backbone.name,
                                weights_hash=backbone.weights_hash)
  w1, w2 = float(config.train.loss.w1), float(config.train.loss.w2)
  cap_index = np.asarray(cache["caption_image_index"])

  if backbone is None and any(k.endswith("_block") for k in params):
    from jsds_jax.models import backbones  # pylint: disable=g-import-not-at-top
    backbone = backbones.load_backbone(config.backbone)
  out = tail_outputs.apply_tail(params, cache, batch_size, backbone=backbone)
  integrated = str(config.eval.integrated)
  scores = score_matrices(out, w1, w2, integrated)
  per_kind = {kind: metrics.retrieval_metrics(scores[kind], cap_index) for kind in KINDS}
  notes = []
  trained_w = (_meta_get(meta, "w1"), _meta_get(meta, "w2"))
  if None not in trained_w and tuple(map(float, trained_w)) != (w1, w2):
    notes.append(f"integrated scores use this config's w1={w1}, w2={w2}; the checkpoint was "
                 f"trained with w1={trained_w[0]}, w2={trained_w[1]}")
  if _meta_get(meta, "mode") == "dense_only":
    notes.append("a dense_only checkpoint: its sparse head was never trained, so the sparse and "
                 "integrated lines only show where it starts")
  tail_init = _tail_init_for(split_dir)
  zs = zero_shot_scores(tail_init, cache) if tail_init is not None else None
  if zs is not None:
    per_kind["zero_shot"] = metrics.retrieval_metrics(zs, cap_index)
  else:
    notes.append(f"no zero-shot reference: backbone {cache['meta'].get('backbone')!r} has no "
                 "projections of its own" if tail_init is not None else
                 "no zero-shot reference: no tail_init beside the cache")
  report: dict[str, Any] = {
      "t2i": {kind: m["t2i"] for kind, m in per_kind.items()},
      "i2t": {kind: m["i2t"] for kind, m in per_kind.items()},
      "sparsity": sparsity(out.z_t, out.z_i),
      "pruning": pruning_curve(out, scores["integrated_dense"], cap_index, w1, w2,
                               sparse=scores["sparse"]),
      "w1": w1, "w2": w2, "tau": out.tau,
      "integrated_formula": INTEGRATED_FORMULAS[integrated],
      "split": {"dataset": cache["meta"].get("dataset"), "name": cache["meta"].get("split"),
                "num_images": int(out.e_i.shape[0]), "num_captions": int(out.e_t.shape[0]),
                "cache": str(split_dir)},
      "checkpoint": str(checkpoint), "mode": _meta_get(meta, "mode"),
      "notes": notes,
  }
  if backbone is not None and feature_cache.TOKEN_IDS in cache:
    report["lexical"] = lexical.lexical_metrics_of(
        out.z_t, out.z_i, np.asarray(cache[feature_cache.TOKEN_IDS]), cap_index,
        explain.vocabulary(backbone))
  else:
    notes.append("no lexical metrics: they need the backbone's vocabulary and the cache's "
                 "caption token ids")

  out_dir.mkdir(parents=True, exist_ok=True)
  if write_index:
    model = model_metadata(backbone.name, backbone.weights_hash, backbone.vocab_size, checkpoint)
    write_search_files(out_dir, out, params, cache, config, model, w1, w2, integrated)
  if html_report:
    examples = html_examples(out, scores, cache, explain.vocabulary(backbone))
    title = f"JSDS retrieval: {report['split']['dataset']}/{report['split']['name']}"
    _atomic_write_text(out_dir / "report.html",
                       explain.render_html_report(examples, title=title, notes=notes))
  plot_pruning(report["pruning"], out_dir / "pruning.png")
  _atomic_write_text(out_dir / "report.md", render_markdown(report))
  feature_cache.atomic_write_json(out_dir / "report.json", report)
  return report


def find_or_build_cache(config: ml_collections.ConfigDict, split: str,
                        backbone: Any) -> pathlib.Path:
  """The split's cache for this config (as `encode` names it), encoded first if missing.

  Raises:
    EvalError: the dataset has no such split.
  """
  from jsds_jax import encode  # pylint: disable=g-import-not-at-top
  from jsds_jax.data import registry  # pylint: disable=g-import-not-at-top
  split_dir = encode.cache_dir_for(config, backbone, split)
  if feature_cache.is_complete(split_dir):
    return split_dir
  try:
    registry.load_split(config.data, split)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise EvalError(f"cannot evaluate split {split!r} of dataset {config.data.name!r}: "
                    f"{e}") from e
  logging.info("no feature cache for %s yet: encoding it into %s", split, split_dir)
  return encode.encode(config, splits=[split])[split]


# ----------------------------------------------------------------------------------------------
# The binary.


def evaluate_checkpoint(config: ml_collections.ConfigDict, checkpoint: str | os.PathLike,
                        out_dir: str | os.PathLike, split: str = "test", *,
                        html_report: bool = True, batch_size: int = 1024) -> dict[str, Any]:
  """What `jsds-eval` does: load a checkpoint, find (or build) the split's cache, evaluate.

  Args:
    config: the experiment config (backbone and dataset as `encode` reads them).
    checkpoint: a train workdir (best, else latest), a manager dir or a step dir.
    out_dir: where the report, index and search files go.
    split: the split of `config.data` to evaluate.
    html_report: also write report.html.
    batch_size: rows per device call when applying the tail.

  Raises:
    EvalError: the checkpoint is from another backbone / vocabulary / feature width than the
      config's, or the dataset has no such split.
    CheckpointError: nothing readable at `checkpoint`.
  """
  from jsds_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from jsds_jax.models import backbones  # pylint: disable=g-import-not-at-top
  params, meta = checkpoint_lib.load_params(checkpoint)
  backbone = backbones.load_backbone(config.backbone)
  # Before any encoding: a checkpoint of another backbone would waste the whole encode.
  check_compatible(params, {"backbone": backbone.name, "weights_hash": backbone.weights_hash},
                   meta, vocab_size=backbone.vocab_size)
  if any(k.endswith("_block") for k in params) and not config.encode.last_block:
    # A last_block checkpoint reads token states: the cache encode writes with last_block.
    config = ml_collections.ConfigDict(config.to_dict())
    config.encode.last_block = True
    logging.info("the checkpoint trains last blocks: using the encode.last_block=True cache")
  split_dir = find_or_build_cache(config, split, backbone)
  step_dir = checkpoint_lib.resolve_step_dir(checkpoint).resolve()
  return evaluate(config, params, split_dir, out_dir, meta, backbone=backbone,
                  checkpoint=str(step_dir), html_report=html_report, batch_size=batch_size)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from jsds_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  distributed.maybe_initialize()
  f = flags.FLAGS
  try:
    report = evaluate_checkpoint(f.config, f.checkpoint, f.out, f.split, html_report=f.html,
                                 batch_size=f.batch_size)
  except (EvalError, checkpoint_lib.CheckpointError, feature_cache.CacheError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(render_markdown(report))
  print(f"Report written to {pathlib.Path(f.out).resolve()}")


def run() -> None:
  """Console-script entry point `jsds-eval`."""
  # Flags are defined here, not at import, so the binaries' modules can import each other.
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "Train workdir (best, else latest step) or step dir.")
  flags.DEFINE_string("out", None, "Output folder for the report, index and search files.")
  flags.DEFINE_string("split", "test", "Which split of config.data to evaluate.")
  flags.DEFINE_bool("html", True, "Also write report.html (example queries with thumbnails).")
  flags.DEFINE_integer("batch_size", 1024, "Rows per device call when applying the tail.")
  flags.mark_flags_as_required(["config", "checkpoint", "out"])
  app.run(main)


if __name__ == "__main__":
  run()
