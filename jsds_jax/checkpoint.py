"""Orbax checkpoints of a training run, and `load_params` for everything that reads them.

A train workdir holds two `ocp.CheckpointManager` directories:

  checkpoints/<step>/   every `train.checkpoint_every` steps, at the end, on SIGTERM; the last
                        `train.keep_checkpoints` are kept. Items:
                          params       the `JSDSTail` params            (StandardSave)
                          train_state  {"step", "opt_state", "rng"}     (StandardSave)
                          metadata     what eval needs to rebuild the tail and reject
                                       mismatched inputs (JsonSave, see `make_metadata`)
                          progress     data position, best score, patience counter (JsonSave)
  best/<step>/          the params with the best validation score so far (sparse R@1 t2i;
                        dense in dense_only), kept apart with `best_fn` and max_to_keep=1:
                          params, metadata, progress

Params and the rest of the train state are separate items so that eval restores the params
alone, from either directory, without knowing the optimizer's structure. The PRNG key is saved
as its raw key data (uint32), which every Orbax version stores as a plain array.

A checkpoint that cannot be read back (a truncated or deleted file inside the step dir) is
moved to `corrupt_checkpoints/` with a warning naming it, and the previous one is used; Orbax
itself never exposes half-written steps (it writes to a temporary name and renames), so a run
killed mid-save simply resumes from the step before.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import json
import os
import pathlib
import shutil
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

import jsds_jax
from jsds_jax import tail_outputs
from jsds_jax.models.tail import jsds

CHECKPOINTS = "checkpoints"
BEST = "best"
CORRUPT = "corrupt_checkpoints"
PARAMS, TRAIN_STATE, METADATA, PROGRESS = "params", "train_state", "metadata", "progress"
# Metadata fields that must agree for a checkpoint to be resumed (or its params applied to a
# feature cache): the tail's shapes, the inputs it was trained on, and what fixes the data order.
RESUME_KEYS = ("backbone", "weights_hash", "dataset", "image_dim", "text_dim", "embed_dim",
               "vocab_size", "word_dim", "use_bias", "use_vocab_bias", "mode", "batch_size",
               "steps_per_epoch", "seed", "features_layout", "last_block")
# What a field means when a checkpoint written before it existed lacks it.
# Fields older checkpoints lack, and what their absence meant then.
_ABSENT_MEANS = {"last_block": "", "input_scale": 1.0, "teacher": "first_stage"}
TAIL_KEYS = ("backbone", "weights_hash", "image_dim", "text_dim")


class CheckpointError(FileNotFoundError):
  """No readable checkpoint where one was expected, or one from an incompatible run."""


def make_metadata(config: ml_collections.ConfigDict, module: jsds.JSDSTail,
                  cache_meta: Mapping[str, Any], *, image_dim: int, text_dim: int,
                  steps_per_epoch: int, total_steps: int) -> dict[str, Any]:
  """The JSON saved beside every checkpoint.

  Args:
    config: the run's config (saved whole, as JSON).
    module: the trained `JSDSTail` (its hyperparameters rebuild it: `tail_module`).
    cache_meta: the train split's feature-cache meta.json (backbone, weights hash, dataset).
    image_dim, text_dim: widths of the cached features the tail reads.
    steps_per_epoch, total_steps: the run's schedule.

  Returns:
    A JSON-serialisable dict.
  """
  return {
      "backbone": cache_meta["backbone"],
      "weights_hash": cache_meta["weights_hash"],
      "dataset": cache_meta["dataset"],
      "image_dim": int(image_dim),
      "text_dim": int(text_dim),
      "embed_dim": int(module.embed_dim),
      "vocab_size": int(module.vocab_size),
      "word_dim": int(module.word_dim),
      "use_bias": bool(module.use_bias),
      "use_vocab_bias": bool(module.use_vocab_bias),
      "dtype": jnp.dtype(module.dtype).name,
      "last_block": str(config.model.last_block),
      "mode": config.train.mode,
      "w1": float(config.train.loss.w1),
      "w2": float(config.train.loss.w2),
      "batch_size": int(config.train.batch_size),
      "seed": int(config.seed),
      "steps_per_epoch": int(steps_per_epoch),
      "total_steps": int(total_steps),
      "config": json.loads(config.to_json_best_effort()),
      "jsds_jax_version": jsds_jax.__version__,
  }


def tail_module(metadata: Mapping[str, Any], params: Mapping[str, Any],
                backbone: Any = None) -> jsds.JSDSTail:
  """The `JSDSTail` a checkpoint's params belong to, at the dtype it trained in: the sizes from
  the params (`JSDSTail.from_params`), trained last blocks included, and its config's
  `model.own_caption_terms`.

  Args:
    metadata, params: what `load_params` returns.
    backbone: the loaded backbone; needed only when the params hold last blocks.

  Raises:
    ValueError: the params hold a last block and no backbone was given.
  """
  return tail_outputs.tail_module_for(params, backbone,
                                      jnp.dtype(metadata.get("dtype", "float32")),
                                      own_caption_terms(metadata))


def own_caption_terms(metadata: Mapping[str, Any]) -> bool:
  """The run's `model.own_caption_terms` from a checkpoint's metadata (its saved config;
  False for checkpoints written before the field)."""
  return bool(metadata.get("config", {}).get("model", {}).get("own_caption_terms", False))


def check_compatible(saved: Mapping[str, Any], expected: Mapping[str, Any],
                     keys: Sequence[str] = RESUME_KEYS, where: str = "checkpoint") -> None:
  """Raises CheckpointError naming every field on which `saved` and `expected` disagree."""
  value = lambda k: saved.get(k, _ABSENT_MEANS.get(k))
  diffs = [f"{k}: {value(k)!r} in the {where}, {expected.get(k)!r} now"
           for k in keys if k in expected and value(k) != expected.get(k)]
  if diffs:
    raise CheckpointError(f"the {where} does not match this run ({'; '.join(diffs)}); use a "
                          "fresh workdir, or the config and feature cache it was made with")


@dataclasses.dataclass
class Progress:
  """What the loop needs besides the train state to continue exactly where it stopped.

  Attributes:
    epoch, step_in_epoch: the data position of the next step (`train_data.position`).
    best_score: the best validation score so far (-1 before the first validation).
    best_step: the step it was reached at (-1: none).
    evals_since_best: validations without improvement since then (early stopping).
    last_val: the latest validation's flat metrics.
    status: "" while running; "completed", "early_stopping" or "preempted" in the checkpoint
      saved when the loop stopped (a rerun continues only after "preempted").
  """

  epoch: int = 0
  step_in_epoch: int = 0
  best_score: float = -1.0
  best_step: int = -1
  evals_since_best: int = 0
  last_val: dict = dataclasses.field(default_factory=dict)
  status: str = ""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Progress":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def _rest_of_state(state) -> dict[str, Any]:
  """The train state without its params, the PRNG key as raw key data."""
  return {"step": state.step, "opt_state": state.opt_state,
          "rng": jax.random.key_data(state.rng)}


class Checkpointer:
  """The run's two checkpoint managers (see the module docstring).

  Args:
    workdir: the train workdir.
    every: save every this many steps (`train.checkpoint_every`; <= 0: only at the end / on
      preemption).
    keep: how many regular checkpoints to keep (`train.keep_checkpoints`).
    every_seconds: also save at the first step this many seconds after the last save (or the
      start); `train.checkpoint_every_seconds`, <= 0: off. Single-process runs only: hosts'
      clocks would make several processes disagree on the step.
    async_save: write in background threads (the step loop only waits for the device-to-host
      copy); `wait_until_finished` / `close` join them.
  """

  def __init__(self, workdir: str | os.PathLike, every: int, keep: int,
               async_save: bool = True, every_seconds: float = 0):
    self.workdir = pathlib.Path(workdir).expanduser().absolute()
    self.every_seconds = every_seconds if jax.process_count() == 1 else 0
    self._last_save = time.monotonic()
    policies = [ocp_managers.PreemptionCheckpointingPolicy()]
    if every > 0:
      policies.append(ocp_managers.FixedIntervalPolicy(every))
    self.manager = ocp.CheckpointManager(
        self.workdir / CHECKPOINTS, item_names=(PARAMS, TRAIN_STATE, METADATA, PROGRESS),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_decision_policy=ocp_managers.AnySavePolicy(policies),
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True))
    self.best = ocp.CheckpointManager(
        self.workdir / BEST, item_names=(PARAMS, METADATA, PROGRESS),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m["score"], best_mode="max",
            keep_checkpoints_without_metrics=False,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
            # Its own barrier names: multi-process saves of the same step by both managers
            # (the last step is validated and checkpointed) would otherwise share Orbax's
            # "async_write_complete.<step>" barrier and fail.
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix="best")))

  def step_dir(self, step: int, best: bool = False) -> pathlib.Path:
    return pathlib.Path(self.workdir / (BEST if best else CHECKPOINTS) / str(step))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    """Whether the step or time interval (or a multi-host preemption sync point) asks for a
    save now."""
    if self.every_seconds > 0 and time.monotonic() - self._last_save >= self.every_seconds:
      return True
    return self.manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """JAX's preemption sync point (multi-process runs with the preemption service on)."""
    return self.manager.reached_preemption(step)

  def save(self, state, metadata: Mapping[str, Any], progress: Progress) -> None:
    """Saves the train state at `state.step` (unless that step is already saved)."""
    step = int(state.step)
    if step in self.manager.all_steps():
      return
    self._last_save = time.monotonic()
    self.manager.save(step, force=True, args=ocp.args.Composite(**{
        PARAMS: ocp.args.StandardSave(state.params),
        TRAIN_STATE: ocp.args.StandardSave(_rest_of_state(state)),
        METADATA: ocp.args.JsonSave(dict(metadata)),
        PROGRESS: ocp.args.JsonSave(progress.to_dict())}))

  def save_best(self, step: int, params: Any, metadata: Mapping[str, Any],
                progress: Progress, score: float) -> None:
    """Saves `params` as the best so far (the caller decides that it is)."""
    if step in self.best.all_steps():
      # A resumed run re-reaching a step it had saved before it was killed.
      self.best.wait_until_finished()
      self.best.delete(step)
    self.best.save(step, force=True, metrics={"score": float(score)},
                   args=ocp.args.Composite(**{
                       PARAMS: ocp.args.StandardSave(params),
                       METADATA: ocp.args.JsonSave(dict(metadata)),
                       PROGRESS: ocp.args.JsonSave(progress.to_dict())}))

  def best_progress(self) -> tuple[int | None, Progress | None]:
    """(step, Progress) of the best checkpoint (its `last_val` holds its validation metrics),
    or (None, None) before the first validation."""
    steps = self.best.all_steps()
    if not steps:
      return None, None
    progress = ocp.JsonCheckpointHandler().restore(
        epath.Path(self.step_dir(steps[-1], best=True) / PROGRESS))
    return steps[-1], Progress.from_dict(progress)

  def restore_latest(self, state, metadata: Mapping[str, Any] | None = None,
                     ) -> tuple[Any, Progress] | None:
    """The newest readable checkpoint, restored onto `state`'s structure and shardings.

    Unreadable steps are moved to `<workdir>/corrupt_checkpoints/` with a warning naming them,
    and the one before is tried.

    Args:
      state: a freshly created `TrainState` (its arrays give shapes, dtypes and shardings).
      metadata: this run's metadata; a checkpoint whose `RESUME_KEYS` differ is refused.

    Returns:
      (restored state, Progress), or None when there is no checkpoint.

    Raises:
      CheckpointError: the checkpoint is from an incompatible run.
    """
    abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        saved_meta = self.manager.restore(step, args=ocp.args.Composite(**{
            METADATA: ocp.args.JsonRestore()}))[METADATA]
      except Exception as e:  # pylint: disable=broad-except
        self._quarantine(step, e)
        continue
      if metadata is not None:
        check_compatible(saved_meta, metadata, where=f"checkpoint '{self.step_dir(step)}'")
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(**{
            PARAMS: ocp.args.StandardRestore(abstract(state.params)),
            TRAIN_STATE: ocp.args.StandardRestore(abstract(_rest_of_state(state))),
            PROGRESS: ocp.args.JsonRestore()}))
      except Exception as e:  # pylint: disable=broad-except
        self._quarantine(step, e)
        continue
      rest = out[TRAIN_STATE]
      restored = state.replace(params=out[PARAMS], step=rest["step"], opt_state=rest["opt_state"],
                               rng=jax.random.wrap_key_data(rest["rng"]))
      if int(restored.step) != step:
        self._quarantine(step, ValueError(f"it holds step {int(restored.step)}"))
        continue
      logging.info("resuming from step %d: %s", step, self.step_dir(step))
      return restored, Progress.from_dict(out[PROGRESS])
    logging.info("no checkpoint in %s, starting fresh", self.workdir / CHECKPOINTS)
    return None

  def _quarantine(self, step: int, error: Exception) -> None:
    """Moves an unreadable step dir aside, so that later saves may reuse its step number."""
    bad = self.step_dir(step)
    dest = self.workdir / CORRUPT / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    logging.warning("checkpoint '%s' is unreadable (%s: %s); moved to '%s', falling back to "
                    "the previous checkpoint", bad, type(error).__name__,
                    str(error).splitlines()[0][:300] if str(error) else "", dest)
    if jax.process_index() == 0:
      dest.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(bad), str(dest))
    self.manager.reload()

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
    self.best.close()


# ----------------------------------------------------------------------------------------------
# Reading params back (eval, the main job, users' own code).


def _numeric_children(directory: pathlib.Path) -> list[int]:
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def resolve_step_dir(path: str | os.PathLike) -> pathlib.Path:
  """The checkpoint step dir `path` designates.

  Args:
    path: a train workdir (its best checkpoint if there is one, else its latest), a manager
      directory (`<workdir>/best`, `<workdir>/checkpoints`: its latest step), or a step dir.

  Raises:
    CheckpointError: nothing readable there.
  """
  path = pathlib.Path(path).expanduser()
  if (path / PARAMS).is_dir():
    return path
  for manager_dir in (path / BEST, path / CHECKPOINTS, path):
    steps = _numeric_children(manager_dir)
    if steps:
      return manager_dir / str(steps[-1])
  raise CheckpointError(f"no checkpoint at '{path}': expected a train workdir (with "
                        f"{BEST}/ or {CHECKPOINTS}/), a checkpoint manager directory, or a "
                        f"step dir holding '{PARAMS}/'")


def load_params(path: str | os.PathLike) -> tuple[dict, dict]:
  """A checkpoint's `JSDSTail` params (numpy, on the host) and its metadata.

  Args:
    path: a train workdir (best checkpoint if present, else latest), `<workdir>/best`,
      `<workdir>/checkpoints`, or a specific step dir such as `<workdir>/checkpoints/1200`.

  Returns:
    (params {"image_tail", "text_tail", "sparse_head", "tau"} of np.ndarray, metadata dict as
    written by `make_metadata`; rebuild the module with `tail_module(metadata, params)`).

  Raises:
    CheckpointError: nothing readable at `path` (the message names it).
  """
  # Orbax refuses relative paths; the binaries take them, so this does too.
  step_dir = resolve_step_dir(pathlib.Path(path).expanduser().absolute())
  # The items' handlers directly: a Checkpointer would look for step-level metadata files
  # beside each item and warn that they are missing.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(epath.Path(step_dir / PARAMS)).tree
    # Restored as numpy: the saved shardings name devices this process may not have.
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    params = handler.restore(epath.Path(step_dir / PARAMS),
                             args=ocp.args.PyTreeRestore(restore_args=restore_args))
    metadata = ocp.JsonCheckpointHandler().restore(epath.Path(step_dir / METADATA))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"cannot read the checkpoint '{step_dir}': {type(e).__name__}: "
                          f"{e}") from e
  finally:
    handler.close()
  return params, dict(metadata)
