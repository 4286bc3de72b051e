"""`train_cmc`: trains the CMC reranker on top of a trained tail (DESIGN.md §4).

  python -m jsds_jax.train_cmc --config configs/demo.py --workdir runs/demo_cmc \
      --config.cmc.init_from=runs/demo

The tail (`cmc.init_from`) stays frozen: it gives every training item its embedding (the dense
e by default) and the first stage's scores, from which `cmc_candidates` mines C candidates per
query (cached). CMC learns α·CE(gold) + (1 − α)·KL(first stage ‖ CMC) over them
(`losses.cmc_loss`), both directions in one model, with the tail's machinery: a step mapped
over the 'data' mesh axis with `jax.shard_map` (the batch split over devices, gradients
averaged with `pmean`), optax AdamW with linear warm-up and decay and a global-norm clip, Orbax
checkpoints with resume (`checkpoint.Checkpointer`), validation every `cmc.eval_every_epochs`
on `cmc.val_split` (the first stage's top `cmc.val_k` reranked; score = mean R@1 over the
directions) with early stopping after `cmc.patience` validations without a better score.

The workdir holds checkpoints/ and best/ as a tail run's do (their metadata has mode "cmc" and
the tail's fingerprint, so a CMC is never applied to another tail), metrics.jsonl and
result.json.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import json
import pathlib
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import flax
import flax.traverse_util
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax

import jsds_jax
from jsds_jax import checkpoint
from jsds_jax import cmc_candidates
from jsds_jax import losses
from jsds_jax import metric_writer
from jsds_jax import optim
from jsds_jax import sharding
from jsds_jax import tail_outputs
from jsds_jax import train as train_lib
from jsds_jax import train_step
from jsds_jax import trained_cmc
from jsds_jax.data import feature_cache
from jsds_jax.evaluation import rerank
from jsds_jax.models.tail import cmc as cmc_lib

AXIS = "data"
MODE = trained_cmc.MODE  # the metadata mode of a CMC checkpoint
RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
# Metadata a resumed CMC run must share with its checkpoint.
CMC_RESUME_KEYS = ("mode", "tail_hash", "input_dim", "inputs", "first_stage", "num_layers",
                   "mlp_dim", "gate", "input_scale", "teacher", "batch_size", "seed",
                   "steps_per_epoch", "directions", "num_candidates")


@flax.struct.dataclass
class Examples:
  """Every training example on the devices (replicated; small: C indices per query).

  Attributes:
    table: (N_i + N_c, D) float32 embeddings: images first, then captions.
    query: (M,) int32 rows of `table`.
    candidates: (M, C) int32 rows of `table`.
    positive: (M, C) bool. valid: (M, C) bool (False pads a direction with fewer documents).
    teacher: (M, C) float32 first-stage scores.
  """

  table: jax.Array
  query: jax.Array
  candidates: jax.Array
  positive: jax.Array
  valid: jax.Array
  teacher: jax.Array


def build_examples(mined: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Host arrays of `Examples` from `cmc_candidates.mine`'s result, directions concatenated."""
  img, cap = mined["image_emb"], mined["caption_emb"]
  n_i = img.shape[0]
  offsets = {"t2i": (n_i, 0), "i2t": (0, n_i)}  # (query offset, document offset)
  width = max(c.candidates.shape[1] for c in mined["candidates"].values())
  parts = []
  for d, c in mined["candidates"].items():
    q_off, d_off = offsets[d]
    pad = ((0, 0), (0, width - c.candidates.shape[1]))
    parts.append(dict(query=c.query_ids + q_off,
                      candidates=np.pad(c.candidates + d_off, pad),
                      positive=np.pad(c.positive, pad),
                      valid=np.pad(np.ones_like(c.positive), pad),
                      teacher=np.pad(c.teacher, pad)))
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  out["table"] = np.concatenate([img, cap]).astype(np.float32)
  return out


INPUT_SCALES = ("none", "tau")


def input_scale_for(cc: ml_collections.ConfigDict, tau: float) -> float:
  """The factor on CMC's inputs: 1 ("none", the official module) or τ^(-1/2) ("tau": a fresh
  CMC then scores the dense first stage's cos/τ rather than a cosine)."""
  kind = cc.get("input_scale", "none")
  if kind == "none":
    return 1.0
  if kind == "tau":
    return float(tau) ** -0.5
  raise rerank.RerankError(f"cmc.input_scale={kind!r} is not one of {INPUT_SCALES}")


def module_from_config(cc: ml_collections.ConfigDict, attention_block: int = 0,
                       input_scale: float = 1.0) -> cmc_lib.CMC:
  return cmc_lib.CMC(num_layers=cc.num_layers, num_heads=cc.num_heads, mlp_dim=cc.mlp_dim,
                     dropout=cc.dropout, gate=cc.gate, gate_init=cc.gate_init,
                     attention_block=attention_block, input_scale=input_scale)


def make_optimizer(cc: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """AdamW with warm-up and linear decay after a global-norm clip; with `cc.gate_lr` > 0 the
  gate logits get their own peak lr (from g = -5 at 1e-4 they barely open in a short run)."""
  def adamw(peak):
    return optax.adamw(optim.warmup_linear_decay(peak, total_steps, cc.warmup_fraction),
                       weight_decay=cc.weight_decay)

  gate_lr = float(cc.get("gate_lr", 0.0))
  if gate_lr <= 0:
    return optax.chain(optax.clip_by_global_norm(cc.clip_norm), adamw(cc.lr))
  labels = lambda params: flax.traverse_util.path_aware_map(
      lambda path, _: "gate" if path[-1] == "gate" else "rest", params)
  return optax.chain(optax.clip_by_global_norm(cc.clip_norm),
                     optax.multi_transform({"rest": adamw(cc.lr), "gate": adamw(gate_lr)},
                                           labels))


def make_train_step(module: cmc_lib.CMC, tx: optax.GradientTransformation,
                    cc: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                    compiler_options: dict[str, Any] | None = None):
  """step(state, examples, order, step_in_epoch) -> (state, metrics), jitted and sharded.

  `order` is the epoch's (steps, B) example indices with the batch axis over 'data': each
  device scores its share of the batch; the loss is the mean over devices (each device's
  loss is a mean over its equal share), so `pmean` of the per-device gradients is the
  gradient of the global loss.
  """
  single = mesh.shape[AXIS] == 1
  teacher_temperature = float(cc.get("teacher_temperature", 1.0))
  if teacher_temperature <= 0:
    raise rerank.RerankError(f"cmc.teacher_temperature = {teacher_temperature}: it divides the "
                             "teacher's scores, so it must be > 0")
  mean = (lambda x: x) if single else (lambda x: jax.lax.pmean(x, AXIS))
  to_varying = (lambda x: x) if single else (lambda x: jax.lax.pcast(x, AXIS, to="varying"))

  def per_device(state, ex: Examples, order, step_in_epoch):
    idx = jax.lax.dynamic_index_in_dim(order, step_in_epoch, 0, keepdims=False)
    q = ex.table[ex.query[idx]]
    c = ex.table[ex.candidates[idx]]
    valid, pos, teacher = ex.valid[idx], ex.positive[idx], ex.teacher[idx]
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                             jax.lax.axis_index(AXIS) if not single else 0)

    def loss_fn(params):
      s = module.apply({"params": params}, q, c, valid, deterministic=False,
                       rngs={"dropout": rng})
      out = losses.cmc_loss(s, pos, teacher / teacher_temperature, valid, cc.alpha,
                            cc.temperature, cc.multi_positive)
      return out["loss"], out

    (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(to_varying(state.params))
    grads, parts = mean(grads), mean(parts)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    gates = [jax.nn.sigmoid(params[n]["gate"]) for n in sorted(params) if "gate" in params[n]]
    metrics = dict(parts, grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params))
    if gates:
      metrics["gate_mean"] = jnp.mean(jnp.stack(gates))
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def sharded(state, ex, order, step_in_epoch):
    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(None, AXIS), P()),
                         out_specs=(P(), P()), check_vma=not single)(state, ex, order,
                                                                     step_in_epoch)

  return jax.jit(sharded, donate_argnums=(0,), compiler_options=compiler_options)


def epoch_order(seed: int, epoch: int, num_examples: int, batch_size: int) -> np.ndarray:
  """(steps, B) example indices of one epoch: a pure function of (seed, epoch); the last
  partial batch is dropped."""
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  steps = num_examples // batch_size
  return perm[:steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def load_tail(path: str) -> tuple[dict, dict]:
  """The frozen tail CMC reranks for: `cmc.init_from`'s params and metadata."""
  if not path:
    raise checkpoint.CheckpointError("cmc.init_from is empty: set it to the workdir of a "
                                     "trained tail (python -m jsds_jax.train ...)")
  params, meta = checkpoint.load_params(path)
  if meta.get("mode") == MODE:
    raise checkpoint.CheckpointError(f"cmc.init_from='{path}' is a CMC run; it must be the "
                                     "trained tail's workdir")
  return params, meta


class Validator:
  """Reranked R@1 on the validation split: the first stage's top `val_k`, both directions."""

  def __init__(self, tail_params, split_dir, cc: ml_collections.ConfigDict, w1: float,
               w2: float, backbone=None, own_caption_terms: bool = False):
    cache = feature_cache.load_split(split_dir)
    out = tail_outputs.apply_tail(tail_params, cache, backbone=backbone,
                                  own_caption_terms=own_caption_terms)
    self.image_emb, self.caption_emb = cmc_candidates.item_embeddings(out, cache, cc.inputs)
    scores = cmc_candidates.first_stage_scores(out, cc.first_stage, w1, w2)
    self.views = {d: rerank.direction_view(scores, cache["caption_image_index"], d)
                  for d in cc.directions}
    self.k = int(cc.val_k)
    self.module = module_from_config(cc, input_scale=input_scale_for(cc, out.tau))

  def __call__(self, params) -> dict[str, float]:
    out = {}
    for d, view in self.views.items():
      q, docs = rerank.embeddings_for(d, self.image_emb, self.caption_emb)
      res = rerank.rerank_direction(view, self.module, params, q, docs, [self.k])
      (k, m), = res["cmc"].items()
      out.update({f"{d}/first_R@1": res["first_stage"]["R@1"], f"{d}/cmc_R@1": m["R@1"],
                  f"{d}/cmc_R@16": m["R@16"]})
    out["score"] = float(np.mean([out[f"{d}/cmc_R@1"] for d in self.views]))
    return out


def make_metadata(config, tail_meta, tail_hash: str, input_dim: int, steps_per_epoch: int,
                  total_steps: int) -> dict[str, Any]:
  cc = config.cmc
  return {"mode": MODE, "tail_hash": tail_hash, "tail_checkpoint": str(cc.init_from),
          "backbone": tail_meta.get("backbone"), "weights_hash": tail_meta.get("weights_hash"),
          "dataset": tail_meta.get("dataset"), "input_dim": int(input_dim),
          "inputs": cc.inputs, "first_stage": cc.first_stage, "num_layers": cc.num_layers,
          "num_heads": cc.num_heads, "mlp_dim": cc.mlp_dim, "gate": cc.gate,
          "gate_init": cc.gate_init, "gate_lr": float(cc.get("gate_lr", 0.0)),
          "alpha": float(cc.alpha),
          "teacher_temperature": float(cc.get("teacher_temperature", 1.0)),
          "directions": list(cc.directions),
          "num_candidates": cc.num_candidates, "batch_size": cc.batch_size,
          "seed": int(config.seed), "steps_per_epoch": int(steps_per_epoch),
          "total_steps": int(total_steps), "w1": float(config.train.loss.w1),
          "w2": float(config.train.loss.w2),
          "config": json.loads(config.to_json_best_effort()),
          "jsds_jax_version": jsds_jax.__version__}


TEACHERS = ("first_stage", "itm")


def _teacher(config: ml_collections.ConfigDict, mined: dict[str, Any], train_dir,
             cross_encoder: Any) -> dict[str, Any]:
  """`mined` with the teacher `cmc.teacher` asks for: the first stage's scores as mined, or
  the ITM logits over the same candidates (`cross_encoder` = (BlipItm, params), else BLIP's or
  ALBEF's loaded from `config.backbone`, `backbones.load_cross_encoder`)."""
  kind = config.cmc.get("teacher", "first_stage")
  if kind not in TEACHERS:
    raise rerank.RerankError(f"cmc.teacher={kind!r} is not one of {TEACHERS}")
  if kind == "first_stage":
    return mined
  if cross_encoder is None:
    from jsds_jax.models.trunk import backbones  # pylint: disable=g-import-not-at-top
    if config.backbone.name not in backbones.CROSS_ENCODERS:
      raise rerank.RerankError(
          f"cmc.teacher='itm' needs a backbone with an ITM head "
          f"({' or '.join(backbones.CROSS_ENCODERS)}), not {config.backbone.name!r}")
    loaded = backbones.load_cross_encoder(config.backbone)
    cross_encoder = (loaded.itm, loaded.itm_params)
  return cmc_candidates.cross_encoder_teacher(mined, train_dir, *cross_encoder)


@dataclasses.dataclass
class CMCRun:
  """Everything a CMC run needs before its first step (`setup`).

  Attributes:
    module, tx, mesh: the CMC, its optimizer, the local data mesh.
    state: the fresh train state (replicated), before any restore.
    examples: the mined training examples on the devices (`Examples`).
    metadata: what the checkpoints record (checked on resume).
    tail_params: the first-stage tail the candidates were mined with.
    dirs: {"train": cache dir, cmc.val_split: cache dir}.
    mined: `cmc_candidates.mine`'s result (with the teacher's scores).
    num_examples, steps_per_epoch, total_steps, num_candidates: the schedule's sizes.
    own_caption_terms: the tail's `model.own_caption_terms` (mining and validation apply it).
  """
  module: cmc_lib.CMC
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  state: Any
  examples: Examples
  metadata: dict
  tail_params: Mapping[str, Any]
  dirs: dict
  mined: dict
  num_examples: int
  steps_per_epoch: int
  total_steps: int
  num_candidates: int
  own_caption_terms: bool = False


def setup(config: ml_collections.ConfigDict, cache_dirs: Mapping[str, Any] | None = None,
          cross_encoder: Any = None) -> CMCRun:
  """Mines the candidates (cached), builds the module, optimizer, state and metadata.

  Raises:
    ValueError: cmc.batch_size does not fit the devices or the training queries.
  """
  cc = config.cmc
  tail_params, tail_meta = load_tail(cc.init_from)
  splits = ("train", cc.val_split)
  dirs = ({s: pathlib.Path(cache_dirs[s]) for s in splits} if cache_dirs
          else train_lib.feature_dirs(config, splits))
  w1, w2 = float(config.train.loss.w1), float(config.train.loss.w2)
  mesh = sharding.local_data_mesh()
  if cc.batch_size % mesh.size:
    raise ValueError(f"cmc.batch_size={cc.batch_size} is not a multiple of the {mesh.size} "
                     "devices")
  mined = cmc_candidates.mine(tail_params, dirs["train"], first_stage=cc.first_stage,
                              directions=cc.directions, num_candidates=cc.num_candidates,
                              max_rank=cc.max_rank, seed=config.seed, w1=w1, w2=w2,
                              inputs=cc.inputs, root=cc.candidates_root,
                              own_caption_terms=checkpoint.own_caption_terms(tail_meta))
  mined = _teacher(config, mined, dirs["train"], cross_encoder)
  host = build_examples(mined)
  num_examples = len(host["query"])
  steps_per_epoch = num_examples // cc.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"cmc.batch_size={cc.batch_size} exceeds the {num_examples} training "
                     "queries")
  total_steps = steps_per_epoch * cc.num_epochs
  input_dim = host["table"].shape[1]
  examples = jax.device_put(Examples(**{k: jnp.asarray(v) for k, v in host.items()}),
                            jax.sharding.NamedSharding(mesh, P()))
  module = module_from_config(cc, input_scale=input_scale_for(cc, mined["tau"]))
  init_rng, state_rng = jax.random.split(jax.random.key(config.seed))
  tx = make_optimizer(cc, total_steps)
  state = sharding.replicate(train_step.create_train_state(
      cmc_lib.init_cmc(init_rng, module, input_dim), tx, state_rng), mesh)
  metadata = make_metadata(config, tail_meta, mined["tail_hash"], input_dim, steps_per_epoch,
                           total_steps)
  metadata["input_scale"] = module.input_scale
  metadata["teacher"] = mined.get("teacher", "first_stage")
  return CMCRun(module=module, tx=tx, mesh=mesh, state=state, examples=examples,
                metadata=metadata, tail_params=tail_params, dirs=dirs, mined=mined,
                num_examples=num_examples, steps_per_epoch=steps_per_epoch,
                total_steps=total_steps, num_candidates=int(host["candidates"].shape[1]),
                own_caption_terms=checkpoint.own_caption_terms(tail_meta))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, *,
                       cache_dirs: Mapping[str, Any] | None = None,
                       compiler_options: dict[str, Any] | None = None,
                       cross_encoder: Any = None) -> dict[str, Any]:
  """Trains (or resumes) a CMC run in `workdir`; returns its summary (as train.py's).

  `cross_encoder`: (BlipItm, params) for `cmc.teacher='itm'` (loaded from
  `config.backbone.checkpoint` when None)."""
  cc = config.cmc
  workdir = pathlib.Path(workdir).expanduser().absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  run = setup(config, cache_dirs, cross_encoder)
  ckpt = checkpoint.Checkpointer(workdir, cc.checkpoint_every, cc.keep_checkpoints)
  writer = None
  try:
    state, progress = _restore(ckpt, run)
    start = int(state.step)
    status = progress.status
    writer = metric_writer.MetricWriter(workdir, start)
    validator = Validator(run.tail_params, run.dirs[cc.val_split], cc, float(config.train.loss.w1),
                          float(config.train.loss.w2), own_caption_terms=run.own_caption_terms)
    step_fn = make_train_step(run.module, run.tx, cc, run.mesh, compiler_options)
    logging.info("training CMC: %d steps (%d epochs x %d), %d queries, C = %d, from step %d",
                 run.total_steps, cc.num_epochs, run.steps_per_epoch, run.num_examples,
                 run.num_candidates, start)
    t0, window, order, done = time.time(), [], None, start
    if status in ("", "preempted"):  # else the run had finished: nothing left to do
      status = ""
      for step in range(start, run.total_steps):
        epoch, k = divmod(step, run.steps_per_epoch)
        if order is None or k == 0:
          order = jax.device_put(epoch_order(config.seed, epoch, run.num_examples,
                                             cc.batch_size),
                                 jax.sharding.NamedSharding(run.mesh, P(None, AXIS)))
        state, metrics = step_fn(state, run.examples, order, k)
        window.append(metrics)
        done = step + 1
        progress.epoch, progress.step_in_epoch = divmod(done, run.steps_per_epoch)
        if progress.step_in_epoch == 0:  # an epoch ends: its mean metrics, maybe validation
          writer.write("train", done, {**_window_means(window, done), "epoch": progress.epoch,
                                       "steps_per_second": len(window) / (time.time() - t0)})
          t0, window = time.time(), []
          if done == run.total_steps or progress.epoch % cc.eval_every_epochs == 0:
            status = _validate(validator, state, done, progress, ckpt, run.metadata, writer, cc)
        finished = done == run.total_steps or status != ""
        if finished or ckpt.should_save(done):
          progress.status = (status or "completed") if finished else ""
          ckpt.save(state, run.metadata, progress)
        if finished:
          break
    ckpt.wait_until_finished()
    result = _summary(status or "completed", done, run, progress, ckpt, workdir)
    feature_cache.atomic_write_json(workdir / RESULT_FILE, result)
    return result
  finally:
    ckpt.wait_until_finished()
    ckpt.close()
    if writer is not None:
      writer.close()


def _restore(ckpt: checkpoint.Checkpointer, run: CMCRun) -> tuple[Any, checkpoint.Progress]:
  """(state, progress) of the latest checkpoint in the run, checked against `run.metadata`;
  (the fresh state, a fresh progress) when there is none."""
  latest = ckpt.latest_step()
  if latest is not None:
    saved = checkpoint.load_params(ckpt.step_dir(latest))[1]
    checkpoint.check_compatible(saved, run.metadata, CMC_RESUME_KEYS,
                                where=f"checkpoint '{ckpt.step_dir(latest)}'")
  restored = ckpt.restore_latest(run.state, run.metadata)
  return restored if restored else (run.state, checkpoint.Progress())


def _window_means(window: list[Mapping[str, Any]], step: int) -> dict[str, float]:
  """The mean of each step metric over `window`.

  Raises:
    TrainingDivergedError: one of them is not finite.
  """
  means = {n: float(np.mean([float(w[n]) for w in window])) for n in window[0]}
  if not all(np.isfinite(v) for v in means.values()):
    raise train_lib.TrainingDivergedError(f"non-finite CMC metrics at step {step}: {means}")
  return means


def _summary(status: str, step: int, run: CMCRun, progress: checkpoint.Progress,
             ckpt: checkpoint.Checkpointer, workdir: pathlib.Path) -> dict[str, Any]:
  """What `train_and_evaluate` returns and writes to result.json."""
  best_step, best_progress = ckpt.best_progress()
  return {"status": status, "step": step, "total_steps": run.total_steps,
          "best_score": progress.best_score, "best_step": progress.best_step,
          "final_val": dict(progress.last_val),
          "best_val": best_progress.last_val if best_progress else {},
          "workdir": str(workdir),
          "best_dir": str(ckpt.step_dir(best_step, best=True)) if best_progress else "",
          "candidates_dir": str(run.mined["dir"]), "num_queries": run.num_examples}


def _validate(validator, state, step, progress, ckpt, metadata, writer, cc) -> str:
  val = validator(jax.device_get(state.params))
  score = val["score"]
  improved = score > progress.best_score
  if improved:
    progress.best_score, progress.best_step, progress.evals_since_best = score, step, 0
  else:
    progress.evals_since_best += 1
  progress.last_val = {**val, "step": step, "epoch": progress.epoch}
  writer.write("val", step, {**val, "best_score": progress.best_score})
  logging.info("step %d: val reranked R@1 %.2f (best %.2f at step %d)", step, score,
               progress.best_score, progress.best_step)
  if improved:
    ckpt.save_best(step, state.params, metadata, progress, score)
  if cc.patience > 0 and progress.evals_since_best >= cc.patience:
    return "early_stopping"
  return ""


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  train_lib.quiet_library_logs()
  try:
    result = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except (checkpoint.CheckpointError, rerank.RerankError, feature_cache.CacheError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"CMC training {result['status']} at step {result['step']} of {result['total_steps']}; "
        f"best val reranked R@1 {result['best_score']:.2f} at step {result['best_step']}: "
        f"{result['best_dir']}")


def run() -> None:
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "CMC checkpoints and logs; a run there is resumed.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)


if __name__ == "__main__":
  run()
