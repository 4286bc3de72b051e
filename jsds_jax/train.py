"""`train`: trains the tail on the feature cache, validates, checkpoints; a thin `main`.

  python -m jsds_jax.train --config configs/demo.py --workdir runs/demo
  jsds-train --config configs/blip_coco.py --workdir runs/blip_coco --config.train.projections.lr=1e-4

`train_and_evaluate(config, workdir)` finds (or builds, via `encode`) the train and val
feature caches, starts the `JSDSTail` from `tail_init.safetensors` (the backbone's projections
where it has them, its word embeddings for E), and runs the sharded step
(`train_step.make_train_step`) over epochs of `input_pipeline.epoch_order`. What it writes
into the workdir:

  checkpoints/<step>/  best/<step>/   Orbax checkpoints (jsds_jax/checkpoint.py)
  metrics.jsonl                       one JSON object per line: kind "train" every
                                      `train.log_every` steps (window means), kind "val" per
                                      validation
  tensorboard/                        the same scalars as TensorBoard event files
  result.json                         the summary `train_and_evaluate` returns

A rerun with the same workdir resumes from the newest readable checkpoint: params, optimizer
state, step, PRNG key and data position, so it ends with the same params as an uninterrupted
run; metrics.jsonl records after that checkpoint are dropped so the log reads as one run.
SIGTERM saves a checkpoint at the next step boundary and returns (exit code 0). A non-finite
loss, gradient or parameter norm stops the run with `TrainingDivergedError` (exit code 3)
before anything non-finite is saved.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import tqdm

from jsds_jax import checkpoint
from jsds_jax import cli
from jsds_jax import distributed
from jsds_jax import encode
from jsds_jax import metric_writer
from jsds_jax import optim
from jsds_jax import sharding
from jsds_jax import term_losses
from jsds_jax import train_data
from jsds_jax import train_step
from jsds_jax import vocab_mask
from jsds_jax.data import feature_cache
from jsds_jax.evaluation import validation
from jsds_jax.models.trunk import backbones
from jsds_jax.models.tail import jsds
from jsds_jax.models.tail import last_block

METRICS_FILE = metric_writer.METRICS_FILE
TENSORBOARD_DIR = metric_writer.TENSORBOARD_DIR
read_jsonl = metric_writer.read_jsonl
RESULT_FILE = "result.json"
EXIT_DIVERGED = 3
DEFAULT_EMBED_DIM = 256  # the tail width for backbones without projections (BLIP's)


class TrainingDivergedError(RuntimeError):
  """The loss, the gradient or the params stopped being finite."""


# ----------------------------------------------------------------------------------------------
# Inputs: feature caches and the tail's starting point.


def feature_dirs(config: ml_collections.ConfigDict, splits: Sequence[str],
                 backbone: Any = None) -> dict[str, pathlib.Path]:
  """{split: feature-cache dir}: `train.features`'s subfolders, else `encode`'s (found from its
  note without loading the backbone when finished, built if missing)."""
  if config.train.features:
    root = pathlib.Path(config.train.features).expanduser()
    dirs = {s: root / s for s in splits}
    for d in dirs.values():
      if not feature_cache.is_complete(d):
        raise feature_cache.CacheError(f"train.features='{root}' has no finished cache '{d}'")
    return dirs
  if backbone is None and (found := encode.cached_dirs(config, splits)):
    return found
  return encode.encode(config, splits=list(splits), progress=config.train.progress,
                       backbone=backbone)


def features_layout(setting: str) -> str:
  """`train.features_layout` resolved: "replicated" or "sharded" ("auto": sharded when the run
  has several processes, so that each reads only its rows of the cache)."""
  if setting == "auto":
    return "sharded" if jax.process_count() > 1 else "replicated"
  if setting not in ("replicated", "sharded"):
    raise ValueError(f"train.features_layout must be 'auto', 'replicated' or 'sharded', got "
                     f"{setting!r}")
  return setting


def build_tail(config: ml_collections.ConfigDict, tail_init: Mapping[str, np.ndarray],
               image_dim: int, text_dim: int, rng: jax.Array,
               blocks: Mapping[str, tuple[Any, Any]] | None = None,
               ) -> tuple[jsds.JSDSTail, dict]:
  """The `JSDSTail` and its starting params.

  Args:
    config: the experiment config (`model` section).
    tail_init: `feature_cache.load_tail_init(...)`: "word_embeddings" (V, d_w) and, where the
      backbone has them, "image_proj.kernel" (D_img, P), "image_proj.bias" (P,), "text_proj.*".
    image_dim, text_dim: widths of the cached features.
    rng: key for what is freshly initialised.
    blocks: the last_block variant's {side: (block module, tower params)}
      (`last_block.blocks_for_backbone`); None or {} for the plain tail.

  Returns:
    (module, params).
  """
  blocks = dict(blocks or {})
  projs = {}
  for name in ("image_proj", "text_proj"):
    if f"{name}.kernel" in tail_init:
      projs[name] = {k: tail_init[f"{name}.{k}"] for k in ("kernel", "bias")
                     if f"{name}.{k}" in tail_init}
  width = projs["image_proj"]["kernel"].shape[1] if projs else DEFAULT_EMBED_DIM
  embed_dim = config.model.embed_dim or width
  if projs and embed_dim != width:
    raise ValueError(f"model.embed_dim={embed_dim}, but the backbone's projections are "
                     f"{width}-d; leave it 0 to use theirs")
  words = tail_init["word_embeddings"]
  module = jsds.JSDSTail(embed_dim=int(embed_dim), vocab_size=int(words.shape[0]),
                         word_dim=int(words.shape[1]),
                         use_bias=not projs or "bias" in projs["image_proj"],
                         use_vocab_bias=config.model.use_vocab_bias,
                         dtype=jnp.dtype(config.model.dtype),
                         own_caption_terms=own_caption_terms(config),
                         **{f"{side}_block": b for side, (b, _) in blocks.items()})
  params = jsds.init_jsds_tail(
      rng, module, image_dim, text_dim, projs.get("image_proj"), projs.get("text_proj"), words,
      image_block_params=blocks["image"][1] if "image" in blocks else None,
      text_block_params=blocks["text"][1] if "text" in blocks else None)
  return module, params


def _check_last_block_setting(config: ml_collections.ConfigDict) -> bool:
  """Whether the last_block variant is on; ValueError if it is on without its cache."""
  if not last_block.sides(config.model.last_block):
    return False
  if not config.encode.last_block:
    raise ValueError(f"model.last_block={config.model.last_block!r} trains on the token states "
                     "entering the last block: set --config.encode.last_block=True too")
  return True


def load_blocks(config: ml_collections.ConfigDict, cache_meta: Mapping[str, Any],
                backbone: Any = None) -> dict[str, tuple[Any, Any]]:
  """`model.last_block`'s blocks from the frozen backbone ({} when the variant is off);
  `backbone` is `config.backbone` loaded, if the caller has it.

  Raises:
    ValueError: the variant is on without encode.last_block, or the backbone is not the one
      the cache was encoded with.
  """
  if not _check_last_block_setting(config):
    return {}
  backbone = backbone or backbones.load_backbone(config.backbone)
  feature_cache.check_matches(cache_meta, backbone=backbone.name,
                              weights_hash=backbone.weights_hash)
  return last_block.blocks_for_backbone(backbone, config.model.last_block,
                                        jnp.dtype(config.model.dtype))


# ----------------------------------------------------------------------------------------------
# The loop.


class _Preemption:
  """SIGTERM → a flag the loop reads at each step boundary (single-process runs; multi-process
  runs rely on JAX's preemption service through `Checkpointer.reached_preemption`)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handler(self, signum, frame):
    del frame
    self.requested = True
    logging.warning("signal %d: saving a checkpoint at the next step boundary", signum)

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_finite(history: Sequence[tuple[int, Mapping[str, np.ndarray]]]) -> None:
  for step, m in history:
    bad = {k: float(m[k]) for k in ("loss", "grad_norm", "param_norm") if not np.isfinite(m[k])}
    if bad:
      raise TrainingDivergedError(
          f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step}; "
          "stopped without saving this state (lower the learning rate, check the features)")


@dataclasses.dataclass
class _Window:
  """Train metrics of the steps since the last log record (fetched from the devices lazily)."""

  items: list = dataclasses.field(default_factory=list)
  start_time: float = dataclasses.field(default_factory=time.time)

  def check(self) -> None:
    """Fetches the metrics and raises TrainingDivergedError on a non-finite one. Called before
    anything is validated or saved, so a diverged state is never kept."""
    self.items = [(s, jax.device_get(m)) for s, m in self.items]
    _check_finite(self.items)

  def flush(self) -> tuple[dict[str, float], float]:
    """(means over the window, steps per second), and starts a new window."""
    self.check()
    history = [m for _, m in self.items]
    means = {k: float(np.mean([m[k] for m in history])) for k in history[0]}
    for k in ("lr_pretrained", "lr_projections"):  # the rate in force now, not the window's mean
      means[k] = float(history[-1][k])
    rate = len(history) / max(time.time() - self.start_time, 1e-9)
    self.items, self.start_time = [], time.time()
    return means, rate


@dataclasses.dataclass
class Setup:
  """What a run needs before its first step (`setup`).

  Attributes:
    module: the `JSDSTail`. state: the fresh replicated train state.
    data: the batches (`train_data.TrainData`). step_fn: `train_step.make_train_step`'s step.
    metadata: saved beside every checkpoint (`checkpoint.make_metadata`).
    total_steps: num_epochs x steps per epoch. dirs: {split: feature-cache dir}.
    vocab: the term strings (vocabulary mask, lexical validation), or None.
  """

  module: jsds.JSDSTail
  state: Any
  data: train_data.TrainData
  step_fn: Any
  metadata: dict[str, Any]
  total_steps: int
  dirs: dict[str, pathlib.Path]
  vocab: list[str] | None = None


def setup(config: ml_collections.ConfigDict,
          cache_dirs: Mapping[str, str | os.PathLike] | None = None,
          backbone: Any = None) -> Setup:
  """Finds (or builds) the feature caches, puts the train split on the devices, builds the tail,
  its optimizer and the step (see `train_and_evaluate` for the arguments)."""
  tc = config.train
  _check_last_block_setting(config)  # before any encoding
  splits = ("train", tc.val_split)
  dirs = ({s: pathlib.Path(cache_dirs[s]) for s in splits} if cache_dirs
          else feature_dirs(config, splits, backbone))
  mesh = (sharding.global_data_mesh() if jax.process_count() > 1
          else sharding.local_data_mesh())
  if tc.batch_size % mesh.size:
    raise ValueError(f"train.batch_size={tc.batch_size} is not a multiple of the {mesh.size} "
                     "devices")
  train_cache = feature_cache.load_split(dirs["train"], mmap=True)
  image_dim = train_cache["image_pooled"].shape[1]
  text_dim = train_cache["text_pooled"].shape[1]
  layout = features_layout(tc.features_layout)
  blocks = load_blocks(config, train_cache["meta"], backbone)
  # Caption token ids on the devices: PEC masks with them, a text last block attends with them.
  data = train_data.TrainData(dirs["train"], train_cache, mesh, seed=config.seed,
                              batch_size=tc.batch_size, layout=layout,
                              token_ids=(bool(tc.pec) or "text" in blocks
                                         or bool(tc.loss.bow_image or tc.loss.bow_text)
                                         or bool(tc.loss.df_weight and tc.loss.df_natural)
                                         or own_caption_terms(config)),
                              stream_sides=tuple(blocks), dtype=tc.features_dtype)
  total_steps = tc.num_epochs * data.steps_per_epoch
  init_rng, state_rng = jax.random.split(jax.random.key(config.seed))
  tail_init = feature_cache.load_tail_init(feature_cache.tail_init_path(dirs["train"]))
  module, params = build_tail(config, tail_init, image_dim, text_dim, init_rng, blocks)
  metadata = checkpoint.make_metadata(config, module, train_cache["meta"], image_dim=image_dim,
                                      text_dim=text_dim, steps_per_epoch=data.steps_per_epoch,
                                      total_steps=total_steps)
  # What fixes the batches besides the seed: a checkpoint resumes only under the same value
  # (checkpoint.RESUME_KEYS); the sharded order also depends on the device count.
  metadata["features_layout"] = f"sharded/{mesh.size}" if layout == "sharded" else "replicated"
  if tc.init_from:
    params = _params_from(tc.init_from, params, metadata)
  # Term strings: for the vocabulary mask and the lexical validation metrics.
  vocab = vocab_mask.vocabulary_for_cache(config.backbone, train_cache["meta"], module.vocab_size)
  masked = None
  if vocab is not None and config.model.vocab_mask != "none":
    masked = vocab_mask.masked_terms(vocab, config.model.vocab_mask)
    params = vocab_mask.apply(params, masked)
  tx = optim.make_optimizer(tc, total_steps)
  # Placed by `sharding.replicate`, which also works on meshes spanning several processes.
  state = sharding.replicate(train_step.create_train_state(params, tx, state_rng), mesh)
  # Bag-of-words targets hold unmasked content wordpieces only.
  bow_terms = None if vocab is None else vocab_mask.target_terms(vocab, masked)
  bow_weights = None
  if tc.loss.get("bow_idf", False):  # idf over the training captions
    bow_weights = term_losses.idf_weights(
        jnp.asarray(np.asarray(train_cache[feature_cache.TOKEN_IDS])), module.vocab_size)
  step_fn = train_step.make_train_step(module, tx, tc, total_steps, mesh, bow_terms=bow_terms,
                                       bow_weights=bow_weights)
  return Setup(module, state, data, step_fn, metadata, total_steps, dirs, vocab)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       cache_dirs: Mapping[str, str | os.PathLike] | None = None,
                       backbone: Any = None) -> dict[str, Any]:
  """Trains (or resumes) a run in `workdir`; returns its summary.

  Args:
    config: the experiment config.
    workdir: checkpoints, logs and the summary go here; a run already there is resumed.
    cache_dirs: {"train": dir, <train.val_split>: dir} to use instead of `feature_dirs(config)`
      (the main job passes what its encode step returned).
    backbone: `config.backbone` loaded, if the caller has it (the main job loads it once);
      loaded when needed otherwise.

  Returns:
    {"status": "completed" | "early_stopping" | "preempted", "step", "epoch", "total_steps",
    "best_score", "best_step", "final_val" (flat metrics of the last validation), "best_val",
    "workdir", "checkpoint_dir", "best_dir", "metrics_file", "feature_dirs"}.

  Raises:
    TrainingDivergedError: a non-finite loss / gradient / parameter norm (nothing saved after
      the last finite checkpoint).
  """
  tc = config.train
  workdir = pathlib.Path(workdir).expanduser().absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  run = setup(config, cache_dirs, backbone)
  ckpt = checkpoint.Checkpointer(workdir, tc.checkpoint_every, tc.keep_checkpoints,
                                 every_seconds=tc.get("checkpoint_every_seconds", 0))
  loop = None
  try:
    restored = ckpt.restore_latest(run.state, run.metadata)
    state, progress = restored if restored else (run.state, checkpoint.Progress())
    run.state = None  # donated with the state from the first step on
    start = int(state.step)
    # Validation runs on this process's devices (each process gets the same numbers).
    evaluator = validation.Evaluator(run.module, run.dirs[tc.val_split],
                                     sharding.local_data_mesh(), tc.loss.w1, tc.loss.w2,
                                     integrated=config.eval.integrated, vocab=run.vocab)
    loop = _Loop(tc, run, ckpt, evaluator, progress, metric_writer.MetricWriter(workdir, start),
                 start)
    status, done = progress.status, start
    if status in ("", "preempted"):  # else the run had finished: nothing left to do
      status = ""
      with _Preemption() as preemption:
        for step in range(start, run.total_steps):
          state, metrics = run.step_fn(state, *run.data.batch(step))
          done = step + 1
          status = loop.after_step(done, state, metrics, preemption.requested)
          if status or done == run.total_steps:
            break
    ckpt.wait_until_finished()
    if status == "preempted":
      logging.warning("preempted: checkpoint saved at step %d; rerun the same command to "
                      "resume", done)
    result = _summary(status or "completed", done, run.total_steps, run.data.steps_per_epoch,
                      progress, workdir, ckpt, run.dirs)
    if jax.process_index() == 0:
      feature_cache.atomic_write_json(workdir / RESULT_FILE, result)
    return result
  finally:
    run.data.close()
    if loop is not None:
      loop.close()
    ckpt.wait_until_finished()
    ckpt.close()


class _Loop:
  """What happens between steps: logging, validation, checkpoints, preemption.

  Args:
    tc: the config's train section. run: `setup(...)`. ckpt: the run's checkpointer.
    evaluator: validation on `train.val_split`. progress: restored or fresh.
    writer: the metric log. start: the step the run (re)starts at.
  """

  def __init__(self, tc: ml_collections.ConfigDict, run: Setup, ckpt: checkpoint.Checkpointer,
               evaluator: validation.Evaluator, progress: checkpoint.Progress,
               writer: metric_writer.MetricWriter, start: int):
    self.tc, self.run, self.ckpt, self.evaluator = tc, run, ckpt, evaluator
    self.progress, self.writer = progress, writer
    self.window = _Window()
    logging.info("training %s: %d steps (%d epochs x %d), batch %d on %d devices, from step %d",
                 tc.mode, run.total_steps, tc.num_epochs, run.data.steps_per_epoch,
                 tc.batch_size, run.data.mesh.size, start)
    self.bar = tqdm.tqdm(total=run.total_steps, initial=start, desc=f"train {tc.mode}",
                         unit="step", dynamic_ncols=True,
                         disable=not tc.progress or jax.process_index() != 0)

  def after_step(self, done: int, state, metrics: Mapping[str, Any],
                 preempt_requested: bool) -> str:
    """Logs, validates and saves after `done` steps; returns the status the run stops with
    ("early_stopping", "preempted", "completed") or "" to go on."""
    tc, total, spe = self.tc, self.run.total_steps, self.run.data.steps_per_epoch
    self.window.items.append((done, metrics))
    self.bar.update(1)
    epoch, in_epoch = train_data.position(done, spe)
    self.progress.epoch, self.progress.step_in_epoch = epoch, in_epoch
    if done % tc.log_every == 0:
      means, rate = self.window.flush()
      self.writer.write("train", done, {**means, "steps_per_second": rate, "epoch": done / spe})
      self.bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{means['lr_projections']:.2e}")
    status = ""
    if in_epoch == 0 and (done == total or (
        tc.eval_every_epochs > 0 and epoch % tc.eval_every_epochs == 0)):
      self.window.check()
      status = _validate(self.evaluator, state, done, epoch, self.progress, self.ckpt,
                         self.run.metadata, self.writer, tc)
    if (not status and done < total
        and (preempt_requested or self.ckpt.reached_preemption(done))):
      status = "preempted"
    finished = done == total or status != ""
    if finished or self.ckpt.should_save(done):
      self.window.check()
      if done == total and not status:
        status = "completed"
      self.progress.status = status if finished else ""
      self.ckpt.save(state, self.run.metadata, self.progress)
    return status

  def close(self) -> None:
    self.bar.close()
    self.writer.close()


def _params_from(path: str, like: Any, metadata: Mapping[str, Any]) -> Any:
  """`train.init_from`: another run's params (e.g. a dense_only run's, for d2s), checked to fit
  this run's tail and inputs."""
  params, saved = checkpoint.load_params(path)
  checkpoint.check_compatible(saved, metadata, checkpoint.TAIL_KEYS + (
      "embed_dim", "vocab_size", "word_dim", "use_bias", "use_vocab_bias"),
                              where=f"checkpoint '{checkpoint.resolve_step_dir(path)}'")
  if jax.tree.structure(params) != jax.tree.structure(like):
    raise checkpoint.CheckpointError(f"the params at '{path}' have another structure than "
                                     "this run's tail")
  logging.info("starting from the params of %s", checkpoint.resolve_step_dir(path))
  return jax.tree.map(jnp.asarray, params)


def own_caption_terms(config: ml_collections.ConfigDict) -> bool:
  """`model.own_caption_terms` (False in configs written before it)."""
  return bool(config.model.get("own_caption_terms", False))


def within_budget(val: Mapping[str, Any], tc: ml_collections.ConfigDict) -> bool:
  """Whether a validation may become the best checkpoint under `train.select_max_nnz`: its mean
  non-zeros per image and per caption are both at most that (0 = no budget; dense_only has
  none). Choosing by R@1 alone keeps the densest steps, before the regulariser has warmed up."""
  budget = float(tc.select_max_nnz)
  if budget <= 0 or tc.mode == "dense_only":
    return True
  return max(float(val["sparsity"]["image_nnz"]), float(val["sparsity"]["caption_nnz"])) <= budget


def _validate(evaluator: validation.Evaluator, state, step: int, epoch: int,
              progress: checkpoint.Progress, ckpt: checkpoint.Checkpointer,
              metadata: Mapping[str, Any], writer: metric_writer.MetricWriter,
              tc: ml_collections.ConfigDict) -> str:
  """Validates, records, keeps the best params; returns "early_stopping" or ""."""
  t0 = time.time()
  val = evaluator(sharding.local_replica(state.params, evaluator.mesh))
  flat = validation.flatten_metrics(val)
  score = validation.val_score(val, tc.mode)
  improved = score > progress.best_score and within_budget(val, tc)
  if improved:
    progress.best_score, progress.best_step, progress.evals_since_best = score, step, 0
  else:
    progress.evals_since_best += 1
  progress.last_val = {**flat, "step": step, "epoch": epoch}
  writer.write("val", step, {**flat, "epoch": epoch, "score": score,
                             "best_score": progress.best_score,
                             "seconds": time.time() - t0})
  logging.info("step %d (epoch %d): val %s R@1 t2i %.2f (best %.2f at step %d)", step, epoch,
               "dense" if tc.mode == "dense_only" else "sparse", score, progress.best_score,
               progress.best_step)
  if improved:
    ckpt.save_best(step, state.params, metadata, progress, score)
  if stops_early(progress, tc):
    logging.info("early stopping: %d validations without improvement", tc.patience)
    return "early_stopping"
  return ""


def stops_early(progress: checkpoint.Progress, tc: ml_collections.ConfigDict) -> bool:
  """Whether patience has run out: `train.patience` validations since the best one. It starts
  with the first validation within the sparsity budget (`within_budget`): a run that begins
  dense (from a dense_only stage) must get the chance to reach the budget; before, one demo
  seed stopped at step 180 with no checkpoint within 60 non-zeros yet."""
  return (tc.patience > 0 and progress.best_step >= 0
          and progress.evals_since_best >= tc.patience)


def _summary(status: str, step: int, total_steps: int, steps_per_epoch: int,
             progress: checkpoint.Progress, workdir: pathlib.Path,
             ckpt: checkpoint.Checkpointer, dirs: Mapping[str, pathlib.Path]) -> dict[str, Any]:
  best_step, best_progress = ckpt.best_progress()
  return {
      "status": status,
      "step": step,
      "epoch": step / steps_per_epoch,
      "total_steps": total_steps,
      "best_score": progress.best_score,
      "best_step": progress.best_step,
      "final_val": dict(progress.last_val),
      "best_val": best_progress.last_val if best_progress else {},
      "workdir": str(workdir),
      "checkpoint_dir": str(ckpt.step_dir(ckpt.latest_step())) if ckpt.latest_step() else "",
      "best_dir": str(ckpt.step_dir(best_step, best=True)) if best_progress else "",
      "metrics_file": str(workdir / METRICS_FILE),
      "feature_dirs": {k: str(v) for k, v in dirs.items()},
  }


def describe(result: Mapping[str, Any]) -> str:
  """A few lines for the terminal."""
  lines = [f"training {result['status']} at step {result['step']} of {result['total_steps']} "
           f"(epoch {result['epoch']:.1f})"]
  if result["best_dir"]:
    lines.append(f"  best val score {result['best_score']:.2f} at step {result['best_step']}: "
                 f"{result['best_dir']}")
  if result["checkpoint_dir"]:
    lines.append(f"  latest checkpoint: {result['checkpoint_dir']}")
  lines.append(f"  metrics: {result['metrics_file']}")
  return "\n".join(lines)


def quiet_library_logs() -> None:
  """Drops INFO logs of Orbax and tensorboardX (a dozen lines per checkpoint) from the
  binaries' output; their warnings and errors still show."""
  noisy = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorboardX{os.sep}")
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= logging.converter.STANDARD_WARNING
      or not any(n in r.pathname for n in noisy))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.maybe_initialize()
  quiet_library_logs()
  try:
    result = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except TrainingDivergedError as e:
    print(f"error: training diverged: {e}", file=sys.stderr)
    sys.exit(EXIT_DIVERGED)
  if distributed.is_main_process():
    print(describe(result))


def run() -> None:
  """Console-script entry point `jsds-train`."""
  # Flags are defined here, not at import, so the binaries' modules can import each other.
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, logs and TensorBoard files go here; an "
                      "existing run there is resumed.")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main, cli.Command(
      "jsds-train", "trains the sparse-dense tail on a config's feature cache (encoding it "
      "first if missing), validating as it goes; an existing run in --workdir is resumed.",
      "--config FILE --workdir DIR [--config.SECTION.FIELD=VALUE ...]", ["config", "workdir"],
      ["jsds-train --config configs/demo.py --workdir runs/demo",
       "jsds-train --config configs/demo.py --workdir runs/demo-d2s --config.train.mode=d2s"]))


if __name__ == "__main__":
  run()
