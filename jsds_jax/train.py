"""`train`: trains the tail on the feature cache, validates, checkpoints; a thin `main`.

  python -m jsds_jax.train --config configs/demo.py --workdir runs/demo
  jsds-train --config configs/blip_coco.py --workdir runs/blip_coco --config.train.lr=...

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
import json
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
from jsds_jax import distributed
from jsds_jax import encode
from jsds_jax import input_pipeline
from jsds_jax import metrics as metrics_lib
from jsds_jax import optim
from jsds_jax import sharding
from jsds_jax import tail_outputs
from jsds_jax import token_stream
from jsds_jax import train_step
from jsds_jax import vocab_mask
from jsds_jax.data import feature_cache
from jsds_jax.evaluation import lexical
from jsds_jax.models import backbones
from jsds_jax.models import jsds
from jsds_jax.models import last_block

P = jax.sharding.PartitionSpec
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
RESULT_FILE = "result.json"
EXIT_DIVERGED = 3
DEFAULT_EMBED_DIM = 256  # the tail width for backbones without projections (BLIP's)
SCORE_KINDS = ("dense", "sparse", "integrated")
INTEGRATED = ("cosine", "tau")  # eval.integrated: the dense part of the integrated eval score


class TrainingDivergedError(RuntimeError):
  """The loss, the gradient or the params stopped being finite."""


# ----------------------------------------------------------------------------------------------
# Inputs: feature caches and the tail's starting point.


def feature_dirs(config: ml_collections.ConfigDict,
                 splits: Sequence[str]) -> dict[str, pathlib.Path]:
  """{split: feature-cache dir}: `train.features`'s subfolders, else `encode`'s (built if
  missing, found without re-encoding if complete)."""
  if config.train.features:
    root = pathlib.Path(config.train.features).expanduser()
    dirs = {s: root / s for s in splits}
    for d in dirs.values():
      if not feature_cache.is_complete(d):
        raise feature_cache.CacheError(f"train.features='{root}' has no finished cache '{d}'")
    return dirs
  return encode.encode(config, splits=list(splits), progress=config.train.progress)


def features_layout(setting: str) -> str:
  """`train.features_layout` resolved: "replicated" or "sharded" ("auto": sharded when the run
  has several processes, so that each reads only its rows of the cache)."""
  if setting == "auto":
    return "sharded" if jax.process_count() > 1 else "replicated"
  if setting not in ("replicated", "sharded"):
    raise ValueError(f"train.features_layout must be 'auto', 'replicated' or 'sharded', got "
                     f"{setting!r}")
  return setting


def tail_init_file(cache_dir: str | os.PathLike) -> pathlib.Path:
  """`tail_init.safetensors` of a split's cache: two levels up, beside the datasets."""
  return pathlib.Path(cache_dir).parent.parent / feature_cache.TAIL_INIT


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


def load_blocks(config: ml_collections.ConfigDict,
                cache_meta: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """`model.last_block`'s blocks from the frozen backbone ({} when the variant is off).

  Raises:
    ValueError: the variant is on without encode.last_block, or the backbone is not the one
      the cache was encoded with.
  """
  if not _check_last_block_setting(config):
    return {}
  backbone = backbones.load_backbone(config.backbone)
  feature_cache.check_matches(cache_meta, backbone=backbone.name,
                              weights_hash=backbone.weights_hash)
  return last_block.blocks_for_backbone(backbone, config.model.last_block,
                                        jnp.dtype(config.model.dtype))


# ----------------------------------------------------------------------------------------------
# Retrieval on a split's cache (validation here; the test table of the main job).


class Evaluator:
  """Dense, sparse and integrated retrieval on one split, the tail run on the mesh.

  Features are cut into fixed-size blocks (one compile per modality), each split over the
  'data' axis; the (captions, images) score matrices come back to the host for
  `metrics.retrieval_metrics`.

  Args:
    module: the `JSDSTail`.
    cache_dir: the split's feature cache.
    mesh: a mesh with a 'data' axis (default: all local devices).
    w1, w2: the integrated score's weights, S_int = w1·S_d + w2·S_s.
    block: items per block (at most; rounded to the device count).
    compiler_options: for `jax.jit`.
    integrated: "cosine" (the official eval: S_int = w1·cos + w2·S_s) or "tau" (the training
      score, w1·cos/τ + w2·S_s); config `eval.integrated`.
    vocab: the V term strings; with them (and the cache's caption token ids) the metrics
      include "lexical" (`evaluation.lexical`, computed from each vector's top terms on the
      devices).
  """

  def __init__(self, module: jsds.JSDSTail, cache_dir: str | os.PathLike,
               mesh: jax.sharding.Mesh | None = None, w1: float = 0.1, w2: float = 0.1,
               block: int = 1024, compiler_options: dict | None = None,
               integrated: str = "cosine", vocab: Sequence[str] | None = None):
    self.mesh = mesh or sharding.local_data_mesh()
    split = feature_cache.load_split(cache_dir, mmap=True)
    self.meta = split["meta"]
    inputs = tail_outputs.split_inputs(module, split, f"'{cache_dir}'")
    # Pooled caches are read whole; token states (last_block) stay memory-mapped.
    self.h_img, self.h_txt = (x if np.ndim(x) == 3 else np.asarray(x, np.float32)
                              for x in (inputs["image"][0], inputs["text"][0]))
    self.token_ids = inputs["text"][1]
    self.caption_image_index = np.asarray(split["caption_image_index"], np.int64)
    if integrated not in INTEGRATED:
      raise ValueError(f"eval.integrated must be one of {INTEGRATED}, got {integrated!r}")
    self.integrated = integrated
    # Lexical metrics need the term strings and every caption's token ids.
    self.caption_ids = None
    if vocab is not None and feature_cache.TOKEN_IDS in split:
      self.caption_ids = np.asarray(split[feature_cache.TOKEN_IDS])
      self.vocab = list(vocab)
      self.classes = lexical.term_classes(self.vocab)
      junk = jnp.asarray(self.classes["junk"], jnp.float32)
    else:
      junk = jnp.zeros((module.vocab_size,), jnp.float32)
    n = self.mesh.size
    most = max(self.h_img.shape[0], self.h_txt.shape[0])
    if np.ndim(self.h_img) == 3 or np.ndim(self.h_txt) == 3:
      block = min(block, tail_outputs.TOKEN_BATCH)
    self.block = -(-min(block, most) // n) * n
    self.w1, self.w2 = float(w1), float(w2)
    self._rows = jax.sharding.NamedSharding(self.mesh, P(input_pipeline.DATA_AXIS))
    jit = lambda f: jax.jit(f, compiler_options=compiler_options)

    def encoder(method):
      def encode(params, h, ids, n_valid):
        args = (h,) if ids is None else (h, ids)
        e, z = module.apply({"params": params}, *args, method=method)
        # Per term, how many of the block's real rows use it (for FLOPs), counted on the
        # devices so that the (block, V) vectors never travel to the host.
        valid = (jnp.arange(h.shape[0]) < n_valid)[:, None]
        zf = z.astype(jnp.float32)
        top_w, top_ids = jax.lax.top_k(zf, lexical.TOP_K)  # ties: the smaller id, as top_terms
        return (e, z, jnp.sum((z != 0) & valid, axis=0, dtype=jnp.int32), top_ids, top_w,
                zf @ junk, jnp.sum(zf, axis=-1))
      return jit(encode)

    self._encode = {"image": encoder(jsds.JSDSTail.encode_image),
                    "text": encoder(jsds.JSDSTail.encode_text)}
    self._tau = jit(lambda params: module.apply({"params": params},
                                                method=jsds.JSDSTail.temperature))
    self._scores = jit(self._score_block)

  def _score_block(self, e_t, z_t, e_i, z_i, tau):
    cos = jsds.dense_scores(e_t, e_i, 1.0)  # (captions, images): rows are the queries here
    s_d = cos / tau
    s_s = jsds.sparse_scores(z_t, z_i)
    return s_d, s_s, jsds.integrated_scores(cos if self.integrated == "cosine" else s_d, s_s,
                                            self.w1, self.w2)

  def _encoded_blocks(self, params, h: np.ndarray, kind: str, token_ids=None):
    """Yields (real rows, e (block, P), z (block, V), term counts (V,), top-k ids and weights
    (block, k), junk and total weight (block,)) per block of h; the last block is padded with
    zero rows (and -1 token ids)."""
    for start in range(0, h.shape[0], self.block):
      chunk = np.asarray(h[start:start + self.block], np.float32)
      x = jax.device_put(sharding.pad_rows(chunk, self.block), self._rows)
      ids = None
      if token_ids is not None:
        ids = jax.device_put(sharding.pad_rows(token_ids[start:start + self.block], self.block,
                                               fill=-1), self._rows)
      yield (chunk.shape[0], *self._encode[kind](params, x, ids, chunk.shape[0]))

  def __call__(self, params) -> dict[str, Any]:
    """Metrics of `params` on the split.

    Returns:
      {"dense" | "sparse" | "integrated": metrics.retrieval_metrics(...) (t2i and i2t R@1/5/10,
      MRR@10, rsum), "nnz_image", "nnz_text": mean non-zeros per sparse vector, "flops": the
      D2S FLOPs of caption queries against images, and with a vocabulary "lexical":
      `lexical.lexical_metrics` without the top-terms list}.
    """
    if jax.process_count() > 1:
      # Replicated params of a multi-process mesh, copied to this process's devices.
      params = jax.tree.map(np.asarray, params)
    n_img, n_cap = self.h_img.shape[0], self.h_txt.shape[0]
    images = list(self._encoded_blocks(params, self.h_img, "image"))
    e_i = jnp.concatenate([b[1] for b in images])  # padded rows last: sliced off the scores
    z_i = jnp.concatenate([b[2] for b in images])
    terms_i = np.sum([np.asarray(b[3], np.float64) for b in images], axis=0)
    tau = self._tau(params)
    blocks = {k: [] for k in SCORE_KINDS}
    terms_t = 0.0
    text_blocks = []
    for rows, e_t, z_t, terms, *lex in self._encoded_blocks(params, self.h_txt, "text",
                                                            self.token_ids):
      text_blocks.append((rows, *lex))
      terms_t = terms_t + np.asarray(terms, np.float64)
      for k, s in zip(SCORE_KINDS, self._scores(e_t, z_t, e_i, z_i, tau)):
        blocks[k].append(np.asarray(s)[:rows, :n_img])
    out: dict[str, Any] = {k: metrics_lib.retrieval_metrics(np.concatenate(v),
                                                            self.caption_image_index)
                           for k, v in blocks.items()}
    out["nnz_image"] = float(terms_i.sum() / n_img)
    out["nnz_text"] = float(np.sum(terms_t) / n_cap)
    out["flops"] = float(np.dot(terms_t / n_cap, terms_i / n_img))
    if self.caption_ids is not None:
      out["lexical"] = self._lexical([(b[0], *b[4:]) for b in images], text_blocks)
    return out

  def _lexical(self, image_blocks, text_blocks) -> dict[str, float]:
    """`lexical.lexical_metrics` from the blocks' (rows, top ids, top weights, junk, total)."""
    def gather(blocks):
      ids = np.concatenate([np.asarray(b[1])[:b[0]] for b in blocks]).astype(np.int64)
      w = np.concatenate([np.asarray(b[2])[:b[0]] for b in blocks])
      junk = sum(float(np.asarray(b[3])[:b[0]].sum()) for b in blocks)
      total = sum(float(np.asarray(b[4])[:b[0]].sum()) for b in blocks)
      return (np.where(w > 0, ids, -1), w), junk, total
    top_i, junk_i, total_i = gather(image_blocks)
    top_t, junk_t, total_t = gather(text_blocks)
    return lexical.lexical_metrics(top_t, top_i, {"text": junk_t, "image": junk_i},
                                   {"text": total_t, "image": total_i}, self.caption_ids,
                                   self.caption_image_index, self.classes)


def evaluate_split(params: Any, module: jsds.JSDSTail, cache_dir: str | os.PathLike,
                   w1: float, w2: float, mesh: jax.sharding.Mesh | None = None) -> dict:
  """One-off `Evaluator(module, cache_dir, mesh, w1, w2)(params)` (see there)."""
  return Evaluator(module, cache_dir, mesh, w1, w2)(params)


def flatten_metrics(val: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
  """{"dense": {"t2i": {"R@1": x}}} -> {"dense/t2i/R@1": x}."""
  out = {}
  for k, v in val.items():
    if isinstance(v, Mapping):
      out.update(flatten_metrics(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = float(v)
  return out


def val_score(val: Mapping[str, Any], mode: str) -> float:
  """What the best checkpoint and early stopping follow: t2i R@1 of the sparse scores (the
  paper's), of the dense ones in dense_only (which never trains the sparse head)."""
  return float(val["dense" if mode == "dense_only" else "sparse"]["t2i"]["R@1"])


def within_budget(val: Mapping[str, Any], tc: ml_collections.ConfigDict) -> bool:
  """Whether a validation may become the best checkpoint under `train.select_max_nnz`: its mean
  non-zeros per image and per caption are both at most that (0 = no budget; dense_only has
  none). Choosing by R@1 alone keeps the densest steps, before the regulariser has warmed up."""
  budget = float(tc.select_max_nnz)
  if budget <= 0 or tc.mode == "dense_only":
    return True
  return max(float(val["nnz_image"]), float(val["nnz_text"])) <= budget


# ----------------------------------------------------------------------------------------------
# Logging.


class MetricWriter:
  """Appends records to `<workdir>/metrics.jsonl` and TensorBoard event files (process 0).

  Args:
    workdir: the train workdir.
    start_step: the step the run (re)starts at; records after it, left by a run killed after
      its last checkpoint, are dropped (and TensorBoard told to purge them).
  """

  def __init__(self, workdir: pathlib.Path, start_step: int):
    self.enabled = jax.process_index() == 0
    self.path = workdir / METRICS_FILE
    self._tb = None
    if not self.enabled:
      return
    _truncate_jsonl(self.path, start_step)
    self._tb = _tensorboardx().SummaryWriter(str(workdir / TENSORBOARD_DIR),
                                          purge_step=start_step if start_step else None)

  def write(self, kind: str, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {"kind": kind, "step": int(step), "time": round(time.time(), 3), **scalars}
    # One write of a whole line, flushed and synced: a kill leaves at most a partial last line,
    # which the next run's `_truncate_jsonl` drops.
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()
      os.fsync(f.fileno())
    for k, v in scalars.items():
      # TensorBoard tags take no "@": "val/sparse/t2i/R1".
      self._tb.add_scalar(f"{kind}/{k}".replace("@", ""), v, int(step))
    if kind != "train":
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _tensorboardx():
  """tensorboardX, imported without torch.

  Its writer imports torch when installed (only to accept torch tensors), which costs seconds
  at every start; it falls back to numpy when the import fails, so torch is masked meanwhile.
  """
  if "torch" in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules["torch"] = None  # makes `import torch` raise ImportError
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return tensorboardX


def _truncate_jsonl(path: pathlib.Path, last_step: int) -> None:
  """Keeps the records with step <= last_step (and drops unparsable lines), atomically."""
  if not path.exists():
    return
  kept = []
  for line in path.read_text().splitlines():
    try:
      if json.loads(line)["step"] <= last_step:
        kept.append(line + "\n")
    except (ValueError, KeyError, TypeError):
      continue
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text("".join(kept))
  os.replace(tmp, path)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """The records of a metrics.jsonl."""
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]


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
    for k in ("lr_embed", "lr_head"):  # the rate in force now, not the window's mean
      means[k] = float(history[-1][k])
    rate = len(history) / max(time.time() - self.start_time, 1e-9)
    self.items, self.start_time = [], time.time()
    return means, rate


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       cache_dirs: Mapping[str, str | os.PathLike] | None = None,
                       ) -> dict[str, Any]:
  """Trains (or resumes) a run in `workdir`; returns its summary.

  Args:
    config: the experiment config.
    workdir: checkpoints, logs and the summary go here; a run already there is resumed.
    cache_dirs: {"train": dir, <train.val_split>: dir} to use instead of `feature_dirs(config)`
      (the main job passes what its encode step returned).

  Returns:
    {"status": "completed" | "early_stopping" | "preempted", "step", "epoch", "total_steps",
    "best_score", "best_step", "final_val" (flat metrics of the last validation), "best_val",
    "workdir", "checkpoint_dir", "best_dir", "metrics_file", "feature_dirs"}.

  Raises:
    TrainingDivergedError: a non-finite loss / gradient / parameter norm (nothing saved after
      the last finite checkpoint).
  """
  tc = config.train
  _check_last_block_setting(config)  # before any encoding
  workdir = pathlib.Path(workdir).expanduser().absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  splits = ("train", tc.val_split)
  dirs = ({s: pathlib.Path(cache_dirs[s]) for s in splits} if cache_dirs
          else feature_dirs(config, splits))
  mesh = (sharding.global_data_mesh() if jax.process_count() > 1
          else sharding.local_data_mesh())
  if tc.batch_size % mesh.size:
    raise ValueError(f"train.batch_size={tc.batch_size} is not a multiple of the {mesh.size} "
                     "devices")

  train_cache = feature_cache.load_split(dirs["train"], mmap=True)
  cap_img = np.asarray(train_cache["caption_image_index"])
  image_dim = train_cache["image_pooled"].shape[1]
  text_dim = train_cache["text_pooled"].shape[1]
  layout_name = features_layout(tc.features_layout)
  blocks = load_blocks(config, train_cache["meta"])
  # Caption token ids on the devices: PEC masks with them, a text last block attends with them.
  token_ids = bool(tc.pec) or "text" in blocks
  if layout_name == "sharded":
    # Each process reads only its devices' shards of the cache (input_pipeline, "sharded").
    features, layout = input_pipeline.load_sharded_features(dirs["train"], mesh,
                                                            token_ids=token_ids)
    steps_per_epoch = layout.steps_per_epoch(tc.batch_size)
  else:
    features = input_pipeline.load_device_features(dirs["train"], mesh, token_ids=token_ids)
    layout = None
    steps_per_epoch = input_pipeline.steps_per_epoch(features.num_images, tc.batch_size)
  total_steps = tc.num_epochs * steps_per_epoch

  init_rng, state_rng = jax.random.split(jax.random.key(config.seed))
  module, params = build_tail(config, feature_cache.load_tail_init(tail_init_file(dirs["train"])),
                              image_dim, text_dim, init_rng, blocks)
  # The last_block variant's token states, streamed from the host each step.
  stream = (token_stream.TokenStream(train_cache, tuple(blocks), mesh, where=f"'{dirs['train']}'")
            if blocks else None)
  metadata = checkpoint.make_metadata(config, module, train_cache["meta"], image_dim=image_dim,
                                      text_dim=text_dim, steps_per_epoch=steps_per_epoch,
                                      total_steps=total_steps)
  # What fixes the batches besides the seed: a checkpoint resumes only under the same value
  # (checkpoint.RESUME_KEYS); the sharded order also depends on the device count.
  metadata["features_layout"] = (f"sharded/{mesh.size}" if layout_name == "sharded"
                                 else "replicated")
  if tc.init_from:
    params = _params_from(tc.init_from, params, metadata)
  # Term strings: for the vocabulary mask and the lexical validation metrics.
  vocab = vocab_mask.vocabulary_for_cache(config.backbone, train_cache["meta"], module.vocab_size)
  if vocab is not None and config.model.vocab_mask != "none":
    params = vocab_mask.apply(params, vocab_mask.masked_terms(vocab, config.model.vocab_mask))
  tx = optim.make_optimizer(tc, total_steps)
  # Placed by `sharding.replicate`, which also works on meshes spanning several processes.
  state = sharding.replicate(train_step.create_train_state(params, tx, state_rng), mesh)
  del params  # donated with the state from the first step on
  ckpt = checkpoint.Checkpointer(workdir, tc.checkpoint_every, tc.keep_checkpoints)
  writer = bar = None
  try:
    restored = ckpt.restore_latest(state, metadata)
    state, progress = restored if restored else (state, checkpoint.Progress())
    start = int(state.step)
    status = progress.status
    writer = MetricWriter(workdir, start)
    # Validation runs on this process's devices (each process gets the same numbers).
    evaluator = Evaluator(module, dirs[tc.val_split], sharding.local_data_mesh(), tc.loss.w1,
                          tc.loss.w2, integrated=config.eval.integrated, vocab=vocab)
    step_fn = train_step.make_train_step(module, tx, tc, total_steps, mesh)
    logging.info("training %s: %d steps (%d epochs x %d), batch %d on %d devices, from step %d",
                 tc.mode, total_steps, tc.num_epochs, steps_per_epoch, tc.batch_size, mesh.size,
                 start)
    bar = tqdm.tqdm(total=total_steps, initial=start, desc=f"train {tc.mode}", unit="step",
                    dynamic_ncols=True, disable=not tc.progress or jax.process_index() != 0)
    window = _Window()
    step = start
    position = input_pipeline.DataPosition(progress.epoch, progress.step_in_epoch)
    with _Preemption() as preemption:
      while step < total_steps and status in ("", "preempted"):
        status = ""
        host_order = input_pipeline.epoch_order(config.seed, position.epoch, cap_img,
                                                tc.batch_size, layout=layout)
        order = input_pipeline.device_order(host_order, mesh)
        streamed = None
        if stream is not None:
          streamed = stream.steps(layout.global_captions(host_order) if layout is not None
                                  else host_order, position.step_in_epoch)
        for k in range(position.step_in_epoch, steps_per_epoch):
          if streamed is None:
            state, step_metrics = step_fn(state, features, order, k)
          else:
            state, step_metrics = step_fn(state, features, order, k, next(streamed))
          step += 1
          window.items.append((step, step_metrics))
          bar.update(1)
          position = position.next(steps_per_epoch)
          progress.epoch, progress.step_in_epoch = position.epoch, position.step_in_epoch
          if step % tc.log_every == 0:
            means, rate = window.flush()
            writer.write("train", step, {**means, "steps_per_second": rate,
                                         "epoch": step / steps_per_epoch})
            bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{means['lr_head']:.2e}")
          epoch_done = position.step_in_epoch == 0
          if epoch_done and (step == total_steps or (
              tc.eval_every_epochs > 0 and position.epoch % tc.eval_every_epochs == 0)):
            window.check()
            status = _validate(evaluator, state, step, position.epoch, progress, ckpt,
                               metadata, writer, tc)
          if (not status and step < total_steps
              and (preemption.requested or ckpt.reached_preemption(step))):
            status = "preempted"
          done = step == total_steps or status != ""
          if done or ckpt.should_save(step):
            window.check()
            if step == total_steps and not status:
              status = "completed"
            progress.status = status if done else ""
            ckpt.save(state, metadata, progress)
          if done:
            break
        if streamed is not None:
          streamed.close()  # stops its read-ahead
        if status:
          break
    ckpt.wait_until_finished()
    if status == "preempted":
      logging.warning("preempted: checkpoint saved at step %d; rerun the same command to "
                      "resume", step)
    result = _summary(status or "completed", step, total_steps, steps_per_epoch, progress,
                      workdir, ckpt, dirs)
    if jax.process_index() == 0:
      feature_cache.atomic_write_json(workdir / RESULT_FILE, result)
    return result
  finally:
    if bar is not None:
      bar.close()
    ckpt.wait_until_finished()
    ckpt.close()
    if writer is not None:
      writer.close()


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


def _validate(evaluator: Evaluator, state, step: int, epoch: int,
              progress: checkpoint.Progress, ckpt: checkpoint.Checkpointer,
              metadata: Mapping[str, Any], writer: MetricWriter,
              tc: ml_collections.ConfigDict) -> str:
  """Validates, records, keeps the best params; returns "early_stopping" or ""."""
  t0 = time.time()
  val = evaluator(sharding.local_replica(state.params, evaluator.mesh))
  flat = flatten_metrics(val)
  score = val_score(val, tc.mode)
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
  if tc.patience > 0 and progress.evals_since_best >= tc.patience:
    logging.info("early stopping: %d validations without improvement", tc.patience)
    return "early_stopping"
  return ""


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
  app.run(main)


if __name__ == "__main__":
  run()
