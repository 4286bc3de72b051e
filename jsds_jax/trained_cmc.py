"""A trained CMC read back from its run: `load_cmc` and eval's `--rerank cmc` table.

`train_cmc` writes CMC checkpoints (metadata mode "cmc" and the fingerprint of the tail they were
trained on); eval, search and the benches read them through `load_cmc`, which refuses a
checkpoint that is not a CMC's or was trained on another tail. Kept apart from `train_cmc` (and
from `evaluation.rerank`, whose arithmetic `train_cmc` uses) so that every import here is at the
top without a cycle.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jsds_jax import checkpoint
from jsds_jax import cmc_candidates
from jsds_jax import tail_outputs
from jsds_jax.evaluation import rerank
from jsds_jax.models.tail import cmc as cmc_lib

MODE = "cmc"  # the metadata mode train_cmc gives a CMC checkpoint


def load_cmc(path: str, tail_params: Mapping[str, Any] | None = None,
             attention_block: int = 0) -> tuple[cmc_lib.CMC, dict, dict]:
  """A trained CMC (module, params, metadata), checked against the tail it will rerank for.

  Raises:
    CheckpointError: nothing readable at `path`.
    RerankError: not a CMC checkpoint, or one trained on another tail (the message names both
      fingerprints and the tail it was trained on).
  """
  params, meta = checkpoint.load_params(path)
  if meta.get("mode") != MODE:
    raise rerank.RerankError(f"'{path}' is not a CMC checkpoint (its mode is "
                             f"{meta.get('mode')!r}): pass the workdir of train_cmc")
  if tail_params is not None:
    have = cmc_candidates.tail_hash(tail_params)
    if have != meta.get("tail_hash"):
      raise rerank.RerankError(
          f"the CMC at '{path}' was trained on the tail '{meta.get('tail_checkpoint')}' "
          f"(fingerprint {meta.get('tail_hash')}), not on this one (fingerprint {have}): "
          "rerank with the tail it was trained on, or train a CMC for this tail")
  module = cmc_lib.module_for(params, num_heads=int(meta.get("num_heads", 4)),
                              gate=meta.get("gate"), gate_init=float(meta.get("gate_init", -5.0)),
                              attention_block=attention_block,
                              input_scale=float(meta.get("input_scale", 1.0)))
  return module, params, meta


def cmc_report(cmc_path: str, tail_params: Any, image_emb_dense: np.ndarray,
               caption_emb_dense: np.ndarray, cache: Mapping[str, Any],
               score_mats: Mapping[str, np.ndarray], ks: Sequence[int] = rerank.RERANK_KS,
               attention_block: int = 128) -> dict[str, Any]:
  """What eval's report gains with `--rerank cmc`: the rerank table of a trained CMC.

  Args:
    cmc_path: the CMC run's workdir (or step dir).
    tail_params: the evaluated tail's params (the CMC must have been trained on it).
    image_emb_dense, caption_emb_dense: the split's dense tail outputs e.
    cache: the split's feature cache (pre-projection states, caption → image index).
    score_mats: {"sparse", "dense", "integrated"}: (num_captions, num_images) first stages.
    ks: candidate depths (each capped by the documents of a direction).
    attention_block: CMC attends in query blocks of this size (0 = all at once).

  Raises:
    RerankError: K <= 0, a CMC of another tail, or missing / mismatched embeddings.
  """
  if not cmc_path:
    raise rerank.RerankError("--rerank cmc needs the CMC run: set "
                             "--config.cmc.checkpoint=WORKDIR (python -m jsds_jax.train_cmc ... "
                             "--workdir WORKDIR)")
  bad = [k for k in ks if int(k) <= 0]
  if bad:
    raise rerank.RerankError(f"cmc.rerank_ks holds K = {bad[0]}: each K must be at least 1")
  module, params, meta = load_cmc(cmc_path, tail_params, attention_block)
  out = tail_outputs.TailOutputs(e_i=image_emb_dense, z_i=None, e_t=caption_emb_dense,
                                 z_t=None, tau=1.0)
  image_emb, caption_emb = cmc_candidates.item_embeddings(out, cache, meta.get("inputs", "dense"))
  table = rerank.rerank_table(score_mats, np.asarray(cache["caption_image_index"]), image_emb,
                              caption_emb, module, params, ks)
  return {"checkpoint": str(cmc_path), "first_stage_trained_on": meta.get("first_stage"),
          "table": table}
