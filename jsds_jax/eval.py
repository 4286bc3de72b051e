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
import os
import pathlib
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np

from jsds_jax import atomic
from jsds_jax import cli
from jsds_jax import distributed
from jsds_jax import explain
from jsds_jax import tail_outputs
from jsds_jax.data import feature_cache
from jsds_jax.evaluation import lexical
from jsds_jax.evaluation import metrics
from jsds_jax.evaluation import pruning as pruning_lib
from jsds_jax.evaluation import report as report_lib
from jsds_jax.evaluation import scores as scores_lib
from jsds_jax.evaluation import sparsity as sparsity_lib
from jsds_jax.index import bundle


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


def _zero_shot(split_dir: pathlib.Path, cache: Mapping[str, Any]) -> np.ndarray | str:
  """The backbone's own (num_captions, num_images) scores, or the note saying why there are
  none."""
  path = feature_cache.tail_init_path(split_dir)
  if not path.exists():
    return "no zero-shot reference: no tail_init beside the cache"
  zs = scores_lib.zero_shot_scores(feature_cache.load_tail_init(path), cache)
  if zs is None:
    return (f"no zero-shot reference: backbone {cache['meta'].get('backbone')!r} has no "
            "projections of its own")
  return zs


def _lexical(out: Any, cache: Mapping[str, Any], cap_index: np.ndarray, backbone: Any,
             notes: list[str]) -> dict[str, Any] | None:
  """`lexical.lexical_metrics_of` the split, or None with a note saying what is missing."""
  if backbone is None or feature_cache.TOKEN_IDS not in cache:
    notes.append("no lexical metrics: they need the backbone's vocabulary and the cache's "
                 "caption token ids")
    return None
  return lexical.lexical_metrics_of(out.z_t, out.z_i, np.asarray(cache[feature_cache.TOKEN_IDS]),
                                    cap_index, explain.vocabulary(backbone))


def _itm_lines(scores: Mapping[str, np.ndarray], zero_shot: np.ndarray | None,
               cache: Mapping[str, Any], cross_encoder: Any) -> dict[str, dict]:
  """The "+itm" lines: every first stage and BLIP's own ITC (zero_shot) reranked by ITM."""
  from jsds_jax.evaluation import cross_encoder as ce  # pylint: disable=g-import-not-at-top
  module, params, settings = cross_encoder
  if "image_tokens" not in cache or zero_shot is None:
    raise EvalError("the ITM stage needs the image token states and BLIP's projections in the "
                    "cache: re-encode a blip or albef backbone with --config.encode.image_tokens=True")
  first = {**{k: scores[k] for k in scores_lib.KINDS if k in scores}, "zero_shot": zero_shot}
  return ce.itm_lines(first, zero_shot, cache, module, params, settings)


def _load_itm(config: ml_collections.ConfigDict, backbone: Any, k: int, logit_only: bool):
  """(config asking for the image-token cache, (BlipItm, params, settings)) for --rerank itm."""
  from jsds_jax.evaluation import cross_encoder as ce  # pylint: disable=g-import-not-at-top
  from jsds_jax.models.trunk import backbones  # pylint: disable=g-import-not-at-top
  if backbone.name not in backbones.CROSS_ENCODERS:
    raise EvalError(f"--rerank=itm needs a backbone with an ITM head "
                    f"({' or '.join(backbones.CROSS_ENCODERS)}), not {backbone.name!r}")
  loaded = backbones.load_cross_encoder(config.backbone)
  itm = (loaded.itm, loaded.itm_params, ce.RerankSettings(k=k, logit_only=logit_only))
  if not config.encode.get("image_tokens", False):
    config = ml_collections.ConfigDict(config.to_dict())
    config.encode.image_tokens = True
    logging.info("--rerank=itm reads image token states: using the encode.image_tokens cache")
  return config, itm


def parse_rerank(value: str) -> tuple[str, ...]:
  """--rerank's value checked: (), ("cmc",), ("itm",) or ("cmc", "itm") (the chain: CMC over
  the first stage's top K, then ITM over CMC's top k')."""
  stages = [s.strip() for s in value.split(",") if s.strip()]
  if any(s not in ("cmc", "itm") for s in stages):
    raise EvalError(f"--rerank={value!r}: the rerankers are 'cmc' and 'itm'")
  if len(set(stages)) != len(stages) or stages == ["itm", "cmc"]:
    raise EvalError(f"--rerank={value!r}: name each stage once, in pipeline order: 'cmc', "
                    "'itm' or 'cmc,itm'")
  return tuple(stages)


def _pipeline(config: ml_collections.ConfigDict, params: Mapping[str, Any], out: Any,
              scores: Mapping[str, np.ndarray], zero_shot: np.ndarray | None,
              cache: Mapping[str, Any], cross_encoder: Any) -> dict[str, Any]:
  """report["pipeline"]: first stage -> CMC (top `cmc.pipeline_k`) -> ITM (top k')."""
  from jsds_jax import cmc_candidates  # pylint: disable=g-import-not-at-top
  from jsds_jax import trained_cmc  # pylint: disable=g-import-not-at-top
  from jsds_jax.evaluation import cross_encoder as ce  # pylint: disable=g-import-not-at-top
  from jsds_jax.evaluation import pipeline  # pylint: disable=g-import-not-at-top
  from jsds_jax.evaluation import rerank  # pylint: disable=g-import-not-at-top
  if "image_tokens" not in cache or zero_shot is None:
    raise EvalError("the ITM stage needs the image token states and BLIP's projections in the "
                    "cache: re-encode a blip or albef backbone with --config.encode.image_tokens=True")
  if not config.cmc.checkpoint:
    raise rerank.RerankError("--rerank cmc,itm needs the CMC run: set "
                             "--config.cmc.checkpoint=WORKDIR (python -m jsds_jax.train_cmc)")
  module, cmc_params, meta = trained_cmc.load_cmc(config.cmc.checkpoint, params,
                                                  int(config.cmc.attention_block))
  image_emb, caption_emb = cmc_candidates.item_embeddings(out, cache,
                                                          meta.get("inputs", "dense"))
  itm, itm_params, settings = cross_encoder
  fns = {d: ce.blip_logit_fn(itm, itm_params, cache["text_token_ids"], cache["image_tokens"], d)
         for d in ("t2i", "i2t")}
  k = int(config.cmc.pipeline_k)
  table = pipeline.pipeline_table({kind: scores[kind] for kind in scores_lib.KINDS},
                                  np.asarray(cache["caption_image_index"]), image_emb,
                                  caption_emb, (module, cmc_params), k, fns, settings, zero_shot)
  return {"checkpoint": str(config.cmc.checkpoint), "k": min(k, int(out.e_i.shape[0])),
          "k_prime": settings.k, "logit_only": settings.logit_only, "table": table}


# ----------------------------------------------------------------------------------------------
# The library entry point.


def evaluate(config: ml_collections.ConfigDict, params: Mapping[str, Any],
             split_dir: str | os.PathLike, out_dir: str | os.PathLike,
             meta: Mapping[str, Any] | None = None, *, backbone: Any = None,
             checkpoint: str = "", html_report: bool = True, write_index: bool = True,
             batch_size: int = 1024, rerank_with: str = "",
             cross_encoder: Any = None) -> dict[str, Any]:
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
    rerank_with: "" or "cmc": also rerank every first stage's top K with the CMC at
      `config.cmc.checkpoint` (report["rerank"], a table in report.md, rerank.html).
    cross_encoder: None, or (BlipItm module, its params, `cross_encoder.RerankSettings`): adds
      the lines "<first stage>+itm" (each first stage's top k' rescored by BLIP's ITM); the
      cache must hold `image_tokens`. With `rerank_with="cmc"` too, report["pipeline"] holds
      the chain's four lines per first stage (alone, +CMC, +ITM, +CMC+ITM;
      `evaluation/pipeline.py`), CMC over the top `config.cmc.pipeline_k`.

  Returns:
    The report (what report.json holds).

  Raises:
    EvalError: the checkpoint does not fit the cache.
    CacheError: `split_dir` holds no finished cache.
  """
  split_dir, out_dir = pathlib.Path(split_dir), pathlib.Path(out_dir)
  cache, backbone = _load_checked(config, params, split_dir, meta, backbone,
                                  need_backbone=html_report or write_index)
  w1, w2 = float(config.train.loss.w1), float(config.train.loss.w2)
  cap_index = np.asarray(cache["caption_image_index"])
  out = tail_outputs.apply_tail(
      params, cache, batch_size, backbone=backbone,
      own_caption_terms=bool(config.model.get("own_caption_terms", False)))
  integrated = scores_lib.check_integrated(str(config.eval.integrated))
  scores = scores_lib.score_matrices(out, w1, w2, integrated)
  notes = [n for n in [metrics.small_split_note(int(out.e_i.shape[0]))] if n]
  for note in notes:
    logging.warning("%s", note)
  notes += report_lib.notes_for(meta, w1, w2)
  per_kind, pipe = _retrieval_lines(config, params, out, scores, cache, split_dir, notes,
                                    cross_encoder, chain=rerank_with == "cmc")
  report = report_lib.build(
      per_kind, sparsity_lib.sparsity(out.z_t, out.z_i),
      pruning_lib.pruning_curve(out, scores_lib.integrated_dense(out, integrated), cap_index, w1,
                                w2, sparse=scores["sparse"]),
      w1=w1, w2=w2, tau=out.tau, checkpoint=checkpoint, mode=_meta_get(meta, "mode"),
      notes=notes,
      split={"dataset": cache["meta"].get("dataset"), "name": cache["meta"].get("split"),
             "num_images": int(out.e_i.shape[0]), "num_captions": int(out.e_t.shape[0]),
             "cache": str(split_dir)},
      integrated_formula=scores_lib.INTEGRATED_FORMULAS[integrated],
      lexical=_lexical(out, cache, cap_index, backbone, notes))
  if rerank_with:
    from jsds_jax import trained_cmc  # pylint: disable=g-import-not-at-top
    from jsds_jax.evaluation import rerank  # pylint: disable=g-import-not-at-top
    if rerank_with != "cmc":
      raise rerank.RerankError(f"--rerank {rerank_with!r}: the only reranker is 'cmc'")
    report["rerank"] = trained_cmc.cmc_report(
        config.cmc.checkpoint, params, out.e_i, out.e_t, cache, scores,
        tuple(config.cmc.rerank_ks), int(config.cmc.attention_block))
  if pipe is not None:
    report["pipeline"] = pipe
  _write_outputs(out_dir, report, config, params, out, scores, cache, backbone, checkpoint,
                 integrated, html_report=html_report, write_index=write_index)
  return report


def _load_checked(config: ml_collections.ConfigDict, params: Mapping[str, Any],
                  split_dir: pathlib.Path, meta: Mapping[str, Any] | None, backbone: Any, *,
                  need_backbone: bool) -> tuple[dict[str, Any], Any]:
  """The split's cache, checked against the checkpoint (and the backbone, loaded from
  `config.backbone` if the reports need it or the tail holds trunk blocks and none was given).

  Returns:
    (the cache as `feature_cache.load_split` gives it, the backbone or None).
  """
  cache = feature_cache.load_split(split_dir)
  check_compatible(params, cache["meta"], meta,
                   vocab_size=backbone.vocab_size if backbone is not None else None)
  if backbone is None and (need_backbone or any(k.endswith("_block") for k in params)):
    from jsds_jax.models.trunk import backbones  # pylint: disable=g-import-not-at-top
    backbone = backbones.load_backbone(config.backbone)
  if backbone is not None:
    feature_cache.check_matches(cache["meta"], backbone=backbone.name,
                                weights_hash=backbone.weights_hash)
  return cache, backbone


def _retrieval_lines(config: ml_collections.ConfigDict, params: Mapping[str, Any], out: Any,
                     scores: Mapping[str, np.ndarray], cache: Mapping[str, Any],
                     split_dir: pathlib.Path, notes: list[str], cross_encoder: Any, *,
                     chain: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """The report's retrieval lines: dense, sparse, integrated, the backbone's zero-shot line
  (or a note in `notes` why not), and with `cross_encoder` the "+itm" lines; with `chain` too
  the pipeline table (`_pipeline`), whose "+ITM" lines are reused rather than recomputed.

  Returns:
    ({line: retrieval metrics}, the pipeline table or None).
  """
  cap_index = np.asarray(cache["caption_image_index"])
  per_kind = scores_lib.retrieval(scores, cap_index)
  zero_shot = _zero_shot(split_dir, cache)
  if isinstance(zero_shot, str):
    notes.append(zero_shot)
    zero_shot = None
  else:
    per_kind["zero_shot"] = metrics.retrieval_metrics(zero_shot, cap_index)
  pipe = None
  if cross_encoder is not None and chain:
    pipe = _pipeline(config, params, out, scores, zero_shot, cache, cross_encoder)
    for kind, by_line in pipe["table"].items():
      per_kind[f"{kind}+itm"] = by_line["+ITM"]
    per_kind.update(_itm_lines({}, zero_shot, cache, cross_encoder))
  elif cross_encoder is not None:
    per_kind.update(_itm_lines(scores, zero_shot, cache, cross_encoder))
  return per_kind, pipe


def _write_outputs(out_dir: pathlib.Path, report: dict[str, Any],
                   config: ml_collections.ConfigDict, params: Mapping[str, Any], out: Any,
                   scores: Mapping[str, np.ndarray], cache: Mapping[str, Any], backbone: Any,
                   checkpoint: str, integrated: str, *, html_report: bool,
                   write_index: bool) -> None:
  """report.{json,md} (+ pruning.png), and as asked report.html, the index and search bundle,
  and rerank.html when the report holds a CMC rerank table."""
  w1, w2 = float(config.train.loss.w1), float(config.train.loss.w2)
  out_dir.mkdir(parents=True, exist_ok=True)
  if write_index:
    model = bundle.model_metadata(backbone.name, backbone.weights_hash, backbone.vocab_size,
                                  checkpoint)
    bundle.write(out_dir, out, params, cache, config, model, w1, w2, integrated)
  html = (report_lib.render_html(out, scores, cache, explain.vocabulary(backbone), report)
          if html_report else None)
  report_lib.write(out_dir, report, html)
  if "rerank" in report:
    from jsds_jax.evaluation import rerank  # pylint: disable=g-import-not-at-top
    atomic.write_text(out_dir / "rerank.html", rerank.render_html(report["rerank"]["table"]))


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
                        html_report: bool = True, batch_size: int = 1024,
                        backbone: Any = None, rerank: str = "", rerank_k: int = 128,
                        rerank_logit_only: bool = False) -> dict[str, Any]:
  """What `jsds-eval` does: load a checkpoint, find (or build) the split's cache, evaluate.

  Args:
    config: the experiment config (backbone and dataset as `encode` reads them).
    checkpoint: a train workdir (best, else latest), a manager dir or a step dir.
    out_dir: where the report, index and search files go.
    split: the split of `config.data` to evaluate.
    html_report: also write report.html.
    batch_size: rows per device call when applying the tail.
    backbone: `config.backbone` loaded, if the caller has it (loaded here otherwise).
    rerank: "", "cmc" (the CMC at `config.cmc.checkpoint` over each first stage's top K),
      "itm" (BLIP's cross-encoder over each first stage's top `rerank_k`; final score ITM logit
      + ITC similarity, or the logit alone with `rerank_logit_only`) or "cmc,itm" (both, and
      the chain: CMC over the top `config.cmc.pipeline_k`, ITM over CMC's top `rerank_k`).

  Raises:
    EvalError: the checkpoint is from another backbone / vocabulary / feature width than the
      config's, or the dataset has no such split.
    CheckpointError: nothing readable at `checkpoint`.
  """
  from jsds_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from jsds_jax.models.trunk import backbones  # pylint: disable=g-import-not-at-top
  params, meta = checkpoint_lib.load_params(checkpoint)
  backbone = backbone or backbones.load_backbone(config.backbone)
  # Before any encoding: a checkpoint of another backbone would waste the whole encode.
  check_compatible(params, {"backbone": backbone.name, "weights_hash": backbone.weights_hash},
                   meta, vocab_size=backbone.vocab_size)
  if any(k.endswith("_block") for k in params) and not config.encode.last_block:
    # A last_block checkpoint reads token states: the cache encode writes with last_block.
    config = ml_collections.ConfigDict(config.to_dict())
    config.encode.last_block = True
    logging.info("the checkpoint trains last blocks: using the encode.last_block=True cache")
  itm = None
  stages = parse_rerank(rerank)
  if "itm" in stages:
    config, itm = _load_itm(config, backbone, rerank_k, rerank_logit_only)
  split_dir = find_or_build_cache(config, split, backbone)
  step_dir = checkpoint_lib.resolve_step_dir(checkpoint).resolve()
  return evaluate(config, params, split_dir, out_dir, meta, backbone=backbone,
                  checkpoint=str(step_dir), html_report=html_report, batch_size=batch_size,
                  rerank_with="cmc" if "cmc" in stages else "",
                  cross_encoder=itm)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from jsds_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from jsds_jax.evaluation import rerank  # pylint: disable=g-import-not-at-top
  from jsds_jax.models.trunk import convert  # pylint: disable=g-import-not-at-top
  distributed.maybe_initialize()
  f = flags.FLAGS
  try:
    report = evaluate_checkpoint(f.config, f.checkpoint, f.out, f.split, html_report=f.html,
                                 batch_size=f.batch_size, rerank=f.rerank,
                                 rerank_k=f.rerank_k, rerank_logit_only=f.rerank_logit_only)
  except (EvalError, checkpoint_lib.CheckpointError, feature_cache.CacheError,
          rerank.RerankError, convert.ConversionError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(report_lib.render_markdown(report))
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
  flags.DEFINE_string("rerank", "", "cmc: also rerank each first stage's top K with the CMC "
                      "run at --config.cmc.checkpoint (report: first stage alone vs + CMC); "
                      "itm: rescore each first stage's top --rerank_k with BLIP's ITM "
                      "cross-encoder (blip and albef backbones); cmc,itm: both, and the chain (CMC "
                      "over the top --config.cmc.pipeline_k, ITM over CMC's top --rerank_k).")
  flags.DEFINE_integer("rerank_k", 128, "Candidates per query the cross-encoder rescores "
                       "(BLIP: 256 COCO, 128 Flickr30k).")
  flags.DEFINE_bool("rerank_logit_only", False, "Rank by the ITM logit alone instead of "
                    "logit + ITC similarity.")
  flags.mark_flags_as_required(["config", "checkpoint", "out"])
  cli.run(main, cli.Command(
      "jsds-eval", "scores a trained checkpoint on one split (dense, sparse and integrated "
      "retrieval both ways, sparsity, pruning curve) and writes the report, the HTML page and "
      "the search index.", "--config FILE --checkpoint PATH --out DIR [flags]",
      ["config", "checkpoint", "out", "split", "html", "batch_size", "rerank", "rerank_k",
       "rerank_logit_only"],
      ["jsds-eval --config configs/demo.py --checkpoint runs/demo --out runs/demo/eval",
       "jsds-eval --config configs/demo.py --checkpoint runs/demo --out runs/demo/eval-val "
       "--split val"]))


if __name__ == "__main__":
  run()
