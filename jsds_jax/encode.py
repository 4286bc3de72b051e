"""`encode`: runs the frozen trunk once over every split and writes the feature cache.

  python -m jsds_jax.encode --config configs/demo.py
  jsds-encode --config configs/blip_coco.py --config.encode.dtype=bfloat16

The towers are jit-compiled and their batches sharded over every local device (a 'data' mesh
axis); the parameters are replicated. Work is cut into chunks of `encode.chunk_size` items,
each written to disk as soon as it is done, so a killed run picks up at the first missing chunk
and ends with a cache identical to an uninterrupted run (chunk and batch boundaries do not depend
on where a run started).

A corpus selection (`data.sources` / `data.test_sources` / `data.max_test_images`) holds pictures
of the whole corpus: when the whole corpus's cache of the same backbone and settings is finished
and holds every item of a selection's split, that split's cache is gathered from its rows
(`feature_cache.gather_rows` / `write_gathered`; meta.json's `derived_from` names the donor)
instead of running the backbone; otherwise it is encoded, and one log line says why.

Several processes (`jax.process_count() > 1`): each chunk's batches are dealt to the processes
in contiguous runs (process p loads, decodes and encodes only its own rows, on its own devices),
and the chunk's rows and unreadable-image indices are gathered to every process
(`multihost_utils.process_allgather`) in the order a single process would have produced them,
so the cache is the same bytes as a one-process run with the same local device count. Every
process writes its own copy of the cache (`encode.cache_root` on each host's local disk), unless
`encode.shared_cache` says the cache root is one filesystem every process sees: then process 0
alone writes and the others wait for it. Which chunks are already done (resume) is agreed by all
processes before any work: a chunk is redone unless every writer has it. Progress bars come from
process 0 only.
"""

from collections.abc import Callable, Iterator, Sequence
import concurrent.futures
import dataclasses
import hashlib
import json
import pathlib
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import tqdm

import jsds_jax
from jsds_jax.data import corpus as corpus_lib
from jsds_jax.data import feature_cache
from jsds_jax.data import images as images_lib
from jsds_jax.data import registry
from jsds_jax.data.split import BadItemError
from jsds_jax.data.split import RetrievalSplit
from jsds_jax.models.trunk import backbones
from jsds_jax.models.tail import last_block
from jsds_jax import cli
from jsds_jax import distributed
from jsds_jax import sharding

# The image tower's final-layer token states (N_images, S, D) bf16: what a cross-encoder
# attends to (BLIP's ITM); cached with `encode.image_tokens`.
IMAGE_TOKENS = "image_tokens"

@dataclasses.dataclass(frozen=True)
class EncodeSettings:
  """What, besides the weights, decides the cached numbers (so it is part of the cache key)."""

  batch_size: int = 64
  chunk_size: int = 1024
  dtype: str = "float32"
  last_block: bool = False
  # The image tower's final token states, for the cross-encoder (ITM) stage.
  image_tokens: bool = False
  num_workers: int = 8
  skip_bad: bool = False
  # Multi-process only: the cache root is one shared filesystem, so process 0 alone writes.
  # Not part of the cache key (it does not change the cached numbers).
  shared_cache: bool = False

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "EncodeSettings":
    enc, data = config.encode, config.data
    return cls(batch_size=enc.batch_size, chunk_size=enc.chunk_size, dtype=enc.dtype,
               last_block=enc.last_block, image_tokens=enc.get("image_tokens", False),
               num_workers=enc.num_workers,
               skip_bad=data.get("skip_bad", False),
               shared_cache=enc.get("shared_cache", False))

  def key(self, backbone: backbones.Backbone) -> str:
    """Hash of everything that changes the cached values."""
    blob = json.dumps({"weights": backbone.weights_hash, "dtype": self.dtype,
                       "last_block": self.last_block, "image_size": backbone.image_size,
                       "image_resize": backbone.image_resize,
                       "image_mean": backbone.image_mean, "image_std": backbone.image_std,
                       "max_text_len": backbone.max_text_len,
                       # Only when on, so that the caches written before it keep their key.
                       **({"image_tokens": True} if self.image_tokens else {})},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_dir_for(config: ml_collections.ConfigDict, backbone: backbones.Backbone,
                  split: str) -> pathlib.Path:
  """Where `encode` writes (and `train`/`eval` read) one split's cache for this config."""
  key = EncodeSettings.from_config(config).key(backbone)
  return feature_cache.split_dir(config.encode.cache_root, backbone.name, key,
                                 dataset_key(config.data), split)


def tail_init_path(config: ml_collections.ConfigDict,
                   backbone: backbones.Backbone) -> pathlib.Path:
  """Where `encode` writes the tensors the tail starts from, beside this config's caches."""
  # Any split's folder locates it: tail_init is one per backbone, not per dataset or split.
  return feature_cache.tail_init_path(cache_dir_for(config, backbone, "train"))


# ----------------------------------------------------------------------------------------------
# Finding a finished cache without loading the backbone.
#
# The cache key hashes the weights, so naming a cache directory needs the backbone loaded and its
# weight files read (tens of seconds for `lit` on two cores). `encode` therefore leaves a note,
# keyed by what the config says about the backbone and the encoding, of the key it resolved to
# and of its weight files' sizes and mtimes; `cached_dirs` follows the note when those files are
# unchanged, and falls back to loading the backbone otherwise.


def _lookup_path(config: ml_collections.ConfigDict) -> pathlib.Path:
  """Where `encode` notes the cache key this config resolved to (one small JSON file)."""
  backbone = config.backbone.to_dict()
  checkpoint = backbone.get("checkpoint")
  if checkpoint and pathlib.Path(checkpoint).expanduser().exists():
    # A local folder is named by where it is, not by how the config spells it.
    backbone["checkpoint"] = str(pathlib.Path(checkpoint).expanduser().resolve())
    try:
      backbone["checkpoint_mtime_ns"] = pathlib.Path(backbone["checkpoint"]).stat().st_mtime_ns
    except OSError:
      pass
  settings = EncodeSettings.from_config(config)
  blob = json.dumps({"backbone": backbone, "dtype": settings.dtype,
                     "last_block": settings.last_block, "image_tokens": settings.image_tokens},
                    sort_keys=True, default=str)
  name = hashlib.sha256(blob.encode()).hexdigest()[:24]
  return pathlib.Path(config.encode.cache_root).expanduser() / "lookup" / f"{name}.json"


def _file_stats(paths: Sequence[str]) -> list[list[Any]]:
  """[[path, size, mtime_ns], ...]: what says a weight file is the one that was hashed."""
  return [[p, pathlib.Path(p).stat().st_size, pathlib.Path(p).stat().st_mtime_ns] for p in paths]


def note_cache_key(config: ml_collections.ConfigDict, backbone: backbones.Backbone) -> None:
  """Records which cache key `config` resolves to with `backbone` (see `cached_dirs`)."""
  key = EncodeSettings.from_config(config).key(backbone)
  note = {"backbone": backbone.name, "key": key,
          "weight_files": _file_stats(backbone.weight_files)}
  path = _lookup_path(config)
  path.parent.mkdir(parents=True, exist_ok=True)
  if not path.exists() or json.loads(path.read_text()) != note:
    feature_cache.atomic_write_json(path, note)


def cached_dirs(config: ml_collections.ConfigDict,
                splits: Sequence[str]) -> dict[str, pathlib.Path] | None:
  """{split: finished cache dir} found without loading the backbone, or None when any split is
  unfinished, `encode` left no note for this config, or the weight files changed since."""
  path = _lookup_path(config)
  try:
    note = json.loads(path.read_text())
    if _file_stats([f[0] for f in note["weight_files"]]) != note["weight_files"]:
      return None
  except (OSError, ValueError, KeyError, TypeError):
    return None
  dirs = {s: feature_cache.split_dir(config.encode.cache_root, note["backbone"], note["key"],
                                     dataset_key(config.data), s) for s in splits}
  if not all(feature_cache.is_complete(d) and feature_cache.TOKEN_IDS in
             json.loads((d / feature_cache.META).read_text())["arrays"] for d in dirs.values()):
    return None
  return dirs
# Appended to the dataset's folder name when its "train" split leaves COCO's restval out.
TRAIN_ONLY_SUFFIX = "-train_only"


def dataset_key(data: ml_collections.ConfigDict) -> str:
  """The cache folder name of a dataset: Karpathy files are told apart by their JSON path, corpus
  selections by their sources; a "train" split without restval (`data.train_splits=("train",)`
  or `data.include_restval=False`, karpathy / coco_tfds) gets `TRAIN_ONLY_SUFFIX`, so it never
  reads the cache of the 113k-image train + restval set. The default (restval in) adds nothing,
  so the caches written before keep their folders."""
  if data.name == "corpus":
    return registry.corpus_dataset_name(data)
  suffix = ""
  if data.name in ("karpathy", "coco_tfds") and not registry.include_restval(data, True):
    suffix = TRAIN_ONLY_SUFFIX
  if data.name != "karpathy":
    return data.name + suffix
  path = pathlib.Path(data.json).expanduser().resolve()
  return f"karpathy-{path.stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}{suffix}"


# ----------------------------------------------------------------------------------------------
# Jitted, sharded tower calls.


def _make_tower_fn(tower, variables, mesh: jax.sharding.Mesh, last_block: bool,
                   tokens: bool = False) -> Callable:
  """Returns f(*inputs) -> {"pooled", "last_block_input"?, "tokens"?} running `tower` sharded."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  variables = jax.device_put(variables, replicated)

  @jax.jit
  def apply(variables, *inputs):
    out = tower.apply(variables, *inputs)
    result = {"pooled": out.pooled.astype(jnp.float32)}
    if last_block:
      result["last_block_input"] = out.last_block_input.astype(jnp.bfloat16)
    if tokens:
      result["tokens"] = out.tokens.astype(jnp.bfloat16)
    return result

  def call(*inputs):
    inputs = [jax.device_put(x, batch_sharded) for x in inputs]
    return apply(variables, *inputs)

  return call


def _batches(n: int, batch_size: int, start: int, stop: int) -> Iterator[tuple[int, int]]:
  del n
  for s in range(start, stop, batch_size):
    yield s, min(s + batch_size, stop)


# ----------------------------------------------------------------------------------------------
# Several processes.


def _writes(settings: EncodeSettings) -> bool:
  """Whether this process writes cache files: always with one process or private caches; with
  a shared cache root only process 0."""
  return jax.process_count() == 1 or not settings.shared_cache or jax.process_index() == 0


def _agree(flags: Sequence[bool], settings: EncodeSettings) -> list[bool]:
  """Makes per-process booleans (e.g. "chunk k is on disk") the same on every process.

  With a shared cache only process 0's view counts (it is the one that writes); with private
  caches a flag holds only where it holds on every process. One process: returned as is.
  """
  flags = [bool(f) for f in flags]
  if jax.process_count() == 1 or not flags:
    return flags
  local = np.asarray(flags, np.int32)
  if settings.shared_cache:
    return [bool(f) for f in np.asarray(multihost_utils.broadcast_one_to_all(local))]
  every = np.asarray(multihost_utils.process_allgather(local))  # (P, len(flags))
  return [bool(f) for f in every.min(axis=0)]


def _process_batches(start: int, stop: int,
                     batch: int) -> tuple[list[tuple[int, int]], list[int]]:
  """This process's batches of the chunk [start, stop) and every process's row count.

  The chunk's batches (the very batches one process would run) are dealt to the processes in
  contiguous runs, process 0 first, so the processes' rows joined in process order are the
  chunk's rows in order. A process may get no batch (a short last chunk).
  """
  all_batches = list(_batches(stop - start, batch, start, stop))
  nb, num = len(all_batches), jax.process_count()
  runs = [all_batches[q * nb // num:(q + 1) * nb // num] for q in range(num)]
  return runs[jax.process_index()], [sum(e - s for s, e in run) for run in runs]


def _gather_chunk(outs: dict[str, np.ndarray], bad: list[int],
                  rows: list[int]) -> tuple[dict[str, np.ndarray], list[int]]:
  """Gathers every process's rows of one chunk (and its unreadable images) to every process.

  Args:
    outs: this process's rows, by array name.
    bad: this process's unreadable image indices (ascending).
    rows: every process's row count (`_process_batches`).

  Returns:
    The chunk's rows by name, in row order, and its unreadable images in ascending order.
  """
  max_rows = max(rows)
  padded = {nm: sharding.pad_rows(x, max_rows) for nm, x in outs.items()}
  bad_arr = np.full(max_rows, -1, np.int64)
  bad_arr[:len(bad)] = bad
  got = multihost_utils.process_allgather({"outs": padded, "bad": bad_arr})
  full = {}
  for nm, x in outs.items():
    stacked = np.asarray(got["outs"][nm])  # (P, max_rows, ...)
    full[nm] = np.concatenate([stacked[q][:n] for q, n in enumerate(rows)]).astype(x.dtype)
  all_bad = np.asarray(got["bad"]).reshape(-1)
  return full, [int(i) for i in all_bad if i >= 0]


# ----------------------------------------------------------------------------------------------
# One split.


def _load_image_batch(split: RetrievalSplit, indices: Sequence[int], backbone, skip_bad: bool,
                      pool: concurrent.futures.Executor) -> tuple[np.ndarray, list[int]]:
  """Decodes and preprocesses images; returns (pixels (b, S, S, 3) float32, bad indices)."""

  def load(i):
    try:
      return split.load_image(i)
    except BadItemError:
      if not skip_bad:
        raise
      return None

  decoded = list(pool.map(load, indices))
  bad = [i for i, im in zip(indices, decoded) if im is None]
  blank = np.full((backbone.image_size, backbone.image_size, 3), 255, np.uint8)
  decoded = [blank if im is None else im for im in decoded]
  pixels = images_lib.preprocess(decoded, backbone.image_size, backbone.image_mean,
                                 backbone.image_std, resize=backbone.image_resize)
  return pixels, bad


def _encode_modality(kind: str, split: RetrievalSplit, backbone: backbones.Backbone,
                     out_dir: pathlib.Path, settings: EncodeSettings, mesh,
                     progress: bool, on_chunk: Callable[[str, int], None] | None,
                     writes: bool = True) -> int:
  """Encodes all images (kind="image") or captions (kind="text") chunk by chunk.

  `writes`: whether this process writes the chunk files (several processes: see the module
  doc). Returns the number of chunks.
  """
  n = split.num_images if kind == "image" else split.num_captions
  batch = settings.batch_size
  chunk = max(batch, settings.chunk_size // batch * batch)  # whole batches per chunk
  num_chunks = max(1, -(-n // chunk))
  tower = backbone.image_tower if kind == "image" else backbone.text_tower
  if settings.dtype != "float32":
    tower = tower.clone(dtype=jnp.dtype(settings.dtype))
  variables = backbone.image_variables if kind == "image" else backbone.text_variables
  names = _array_names(kind, backbone, settings)
  fn = _make_tower_fn(tower, variables, mesh, f"{kind}_last_block_input" in names,
                      IMAGE_TOKENS in names)

  # A chunk is done when every file it writes is there (a kill between two renames leaves it
  # to be redone; the image chunks' list of bad images is written last).
  chunk_files = lambda k: [feature_cache.part_path(out_dir, nm, k) for nm in names] + (
      [_bad_images_path(out_dir, k)] if kind == "image" else [])
  # Several processes agree first (the same chunks must be skipped by all of them).
  done = [k for k, d in enumerate(_agree(
      [writes and all(f.exists() for f in chunk_files(k)) for k in range(num_chunks)],
      settings)) if d]
  multi = jax.process_count() > 1
  bar = tqdm.tqdm(total=n, desc=f"{split.dataset}/{split.split} {kind}s", unit=kind[:3] if
                  kind == "text" else "img", disable=not progress, dynamic_ncols=True)
  bar.update(sum(min(chunk, n - k * chunk) for k in done))
  with concurrent.futures.ThreadPoolExecutor(settings.num_workers) as pool:
    for k in range(num_chunks):
      if k in done:
        continue
      start, stop = k * chunk, min((k + 1) * chunk, n)
      outs: dict[str, list[np.ndarray]] = {nm: [] for nm in names}
      bad: list[int] = []
      pending = None
      if multi:
        my_batches, rows = _process_batches(start, stop, batch)
        if not my_batches:  # nothing of this chunk here: a blank batch gives the shapes
          blank = _blank_inputs(kind, backbone, batch)
          _collect((fn(*blank), 0, blank), outs, names, kind)
      else:
        my_batches = list(_batches(n, batch, start, stop))
      for s, e in my_batches:
        if kind == "image":
          pixels, bad_here = _load_image_batch(split, range(s, e), backbone, settings.skip_bad,
                                               pool)
          bad += bad_here
          inputs = (sharding.pad_rows(pixels, batch),)
        else:
          ids, mask = backbone.tokenize([split.captions[c] for c in range(s, e)])
          inputs = (sharding.pad_rows(ids, batch), sharding.pad_rows(mask, batch))
        result = fn(*inputs)  # dispatched asynchronously; the next batch decodes meanwhile
        if pending is not None:
          _collect(pending, outs, names, kind)
          bar.update(pending[1])
        pending = (result, e - s, inputs)
      if pending is not None:
        _collect(pending, outs, names, kind)
        bar.update(pending[1])
      joined = {nm: np.concatenate(outs[nm]) for nm in names}
      if multi:
        joined, bad = _gather_chunk(joined, bad, rows)
        bar.update(sum(rows) - rows[jax.process_index()])
      if writes:
        for nm in names:
          feature_cache.atomic_save_npy(feature_cache.part_path(out_dir, nm, k), joined[nm])
        if kind == "image":
          feature_cache.atomic_write_json(_bad_images_path(out_dir, k), bad)
      if on_chunk is not None:
        on_chunk(kind, k)
  bar.close()
  return num_chunks


def _array_names(kind: str, backbone: backbones.Backbone,
                 settings: EncodeSettings) -> list[str]:
  """The arrays `encode` caches for `kind` ("image" / "text") with these settings."""
  tower = backbone.image_tower if kind == "image" else backbone.text_tower
  # Token states only from towers with transformer blocks (not `lit`'s EfficientNet side).
  states = settings.last_block and _has_last_block(tower)
  names = [f"{kind}_pooled"] + ([f"{kind}_last_block_input"] if states else [])
  if settings.image_tokens and kind == "image":
    names.append(IMAGE_TOKENS)
  if kind == "text" and states:
    names.append("text_attention_mask")
  if kind == "text":
    names.append(feature_cache.TOKEN_IDS)
  return names


def _has_last_block(tower) -> bool:
  try:
    last_block.block_for(tower)
  except ValueError:
    logging.info("%s has no transformer blocks: no token states cached for it",
                 type(tower).__name__)
    return False
  return True


def _blank_inputs(kind: str, backbone, batch: int) -> tuple[np.ndarray, ...]:
  """A batch of nothing (white images / empty captions), for a process with no rows."""
  if kind == "image":
    blank = np.full((backbone.image_size, backbone.image_size, 3), 255, np.uint8)
    pixels = images_lib.preprocess([blank], backbone.image_size, backbone.image_mean,
                                   backbone.image_std, resize=backbone.image_resize)
    return (sharding.pad_rows(pixels, batch),)
  ids, mask = backbone.tokenize([""])
  return (sharding.pad_rows(ids, batch), sharding.pad_rows(mask, batch))


def _bad_images_path(out_dir: pathlib.Path, chunk: int) -> pathlib.Path:
  return out_dir / f"bad_images.part-{chunk:05d}.json"


def _collect(pending, outs, names, kind) -> None:
  result, count, inputs = pending
  outs[names[0]].append(np.asarray(result["pooled"])[:count])
  if f"{kind}_last_block_input" in names:
    outs[f"{kind}_last_block_input"].append(np.asarray(result["last_block_input"])[:count])
  if IMAGE_TOKENS in names:
    outs[IMAGE_TOKENS].append(np.asarray(result["tokens"])[:count])
  if kind == "text" and "text_attention_mask" in names:
    outs["text_attention_mask"].append(np.asarray(inputs[1][:count], np.int8))
  if kind == "text":
    outs[feature_cache.TOKEN_IDS].append(feature_cache.token_ids(inputs[0][:count], inputs[1][:count]))


def add_token_ids(out_dir: pathlib.Path, backbone: backbones.Backbone,
                  batch_size: int = 1024) -> bool:
  """Adds `text_token_ids.npy` to a finished cache written before encode stored it.

  Only the tokenizer runs (on the captions in items.json), so this takes seconds. The array is
  written first, then meta.json is rewritten (both atomically): a kill in between leaves the
  cache as it was. Returns whether anything was added.
  """
  meta = feature_cache.load_split(out_dir)["meta"]
  if feature_cache.TOKEN_IDS in meta["arrays"]:
    return False
  if meta.get("max_text_len") not in (None, backbone.max_text_len):
    raise feature_cache.CacheError(
        f"cache '{out_dir}' was tokenized to {meta['max_text_len']} tokens, the backbone now "
        f"to {backbone.max_text_len}: re-encode it")
  captions = json.loads((out_dir / feature_cache.ITEMS).read_text())["captions"]
  ids = [feature_cache.token_ids(*backbone.tokenize(captions[a:a + batch_size]))
         for a in range(0, len(captions), batch_size)]
  ids = np.concatenate(ids) if ids else np.zeros((0, backbone.max_text_len), np.int32)
  feature_cache.atomic_save_npy(out_dir / f"{feature_cache.TOKEN_IDS}.npy", ids)
  meta["arrays"][feature_cache.TOKEN_IDS] = {"shape": list(ids.shape), "dtype": str(ids.dtype)}
  feature_cache.atomic_write_json(out_dir / feature_cache.META, meta)
  logging.info("added caption token ids to the finished cache %s", out_dir)
  return True


def encode_split(split: RetrievalSplit, backbone: backbones.Backbone, out_dir: pathlib.Path,
                 settings: EncodeSettings, *, mesh: jax.sharding.Mesh | None = None,
                 progress: bool = True,
                 on_chunk: Callable[[str, int], None] | None = None) -> dict[str, Any]:
  """Encodes one split into `out_dir` (resuming from finished chunks); returns its meta.

  Args:
    split: the images and captions.
    backbone: frozen towers, tokenizer and preprocessing.
    out_dir: the split's cache directory.
    settings: batch/chunk sizes, dtype, `last_block`, bad-item policy.
    mesh: a 1-D mesh with axis 'data'; default: all local devices.
    progress: show progress bars (process 0 only, when there are several).
    on_chunk: called with (kind, chunk index) after each chunk is on disk.

  With several processes every one of them must call this with the same split and settings
  (see the module doc); `mesh` must then hold only this process's devices.
  """
  writes = _writes(settings)
  complete = feature_cache.is_complete(out_dir)
  if all(_agree([complete or not writes], settings)):
    return feature_cache.load_split(out_dir)["meta"]
  # A process whose own copy is complete (others' are not) helps without writing again.
  writes = writes and not complete
  mesh = mesh or sharding.local_data_mesh()
  if settings.batch_size % mesh.size:
    raise ValueError(f"encode.batch_size={settings.batch_size} is not a multiple of the "
                     f"{mesh.size} devices")
  progress = progress and distributed.is_main_process()
  if writes:
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = feature_cache.remove_stale_temps(out_dir)
    if stale:
      logging.warning("removed %d half-written files of an earlier run in %s", stale, out_dir)
  t0 = time.time()
  n_img_chunks = _encode_modality("image", split, backbone, out_dir, settings, mesh, progress,
                                  on_chunk, writes)
  n_txt_chunks = _encode_modality("text", split, backbone, out_dir, settings, mesh, progress,
                                  on_chunk, writes)
  meta = None
  if writes:
    meta = _finalize(split, backbone, out_dir, settings, n_img_chunks, n_txt_chunks,
                     time.time() - t0)
  if jax.process_count() > 1 and settings.shared_cache:
    multihost_utils.sync_global_devices(f"jsds encode {split.dataset}/{split.split} finalized")
  return meta if meta is not None else feature_cache.load_split(out_dir)["meta"]


def _finalize(split: RetrievalSplit, backbone, out_dir: pathlib.Path, settings: EncodeSettings,
              n_img_chunks: int, n_txt_chunks: int, seconds: float) -> dict[str, Any]:
  """Joins the chunks, drops images that failed to decode (when skipping), writes meta last."""
  bad = sorted(i for k in range(n_img_chunks) for i in json.loads(
      _bad_images_path(out_dir, k).read_text()))
  arrays = {}
  for name in ["image_pooled", "image_last_block_input", IMAGE_TOKENS]:
    if feature_cache.part_path(out_dir, name, 0).exists():
      arrays[name] = feature_cache.concat_parts(out_dir, name, n_img_chunks)
  for name in ["text_pooled", "text_last_block_input", "text_attention_mask", feature_cache.TOKEN_IDS]:
    if feature_cache.part_path(out_dir, name, 0).exists():
      arrays[name] = feature_cache.concat_parts(out_dir, name, n_txt_chunks)
  cap_index = np.asarray(split.caption_image_index, np.int64)
  image_ids, sources, captions = list(split.image_ids), list(split.image_sources), list(
      split.captions)
  if bad:
    keep_img = np.ones(split.num_images, bool)
    keep_img[bad] = False
    keep_cap = keep_img[cap_index]
    new_row = np.cumsum(keep_img) - 1
    for name, path in arrays.items():
      keep = keep_img if name.startswith("image") else keep_cap
      feature_cache.atomic_save_npy(path, np.asarray(np.load(path, mmap_mode="r"))[keep])
    cap_index = new_row[cap_index[keep_cap]]
    image_ids = [x for x, k in zip(image_ids, keep_img) if k]
    sources = [x for x, k in zip(sources, keep_img) if k]
    captions = [x for x, k in zip(captions, keep_cap) if k]
    logging.warning("skipped %d images that could not be read (and their captions)", len(bad))
  feature_cache.atomic_save_npy(out_dir / "caption_image_index.npy", cap_index)
  feature_cache.atomic_write_json(out_dir / feature_cache.ITEMS, {
      "image_ids": image_ids, "image_sources": sources, "captions": captions})
  specs = {}
  for name in list(arrays) + ["caption_image_index"]:
    arr = np.load(out_dir / f"{name}.npy", mmap_mode="r")
    dtype = ("bfloat16" if name.endswith("last_block_input") or name == IMAGE_TOKENS
             else str(arr.dtype))
    specs[name] = {"shape": list(arr.shape), "dtype": dtype}
  for k in range(n_img_chunks):
    (out_dir / f"bad_images.part-{k:05d}.json").unlink()
  meta = _split_meta(split, backbone, settings, len(image_ids), len(captions), len(bad),
                     seconds)
  meta["arrays"] = specs
  feature_cache.atomic_write_json(out_dir / feature_cache.META, meta)
  return meta


def _split_meta(split: RetrievalSplit, backbone: backbones.Backbone, settings: EncodeSettings,
                num_images: int, num_captions: int, skipped_images: int,
                seconds: float) -> dict[str, Any]:
  """meta.json's fields, but "arrays" (the shapes and dtypes, known once the arrays are)."""
  return {
      "backbone": backbone.name,
      "weights_hash": backbone.weights_hash,
      "dataset": split.dataset,
      "split": split.split,
      "num_images": num_images,
      "num_captions": num_captions,
      "skipped_images": skipped_images,
      "skipped": dict(getattr(split, "skipped", {}) or {}),
      "image_size": backbone.image_size,
      "max_text_len": backbone.max_text_len,
      "dtype": settings.dtype,
      "last_block": settings.last_block,
      "image_tokens": settings.image_tokens,
      "encode_seconds": round(seconds, 2),
      "jsds_jax_version": jsds_jax.__version__,
  }


# ----------------------------------------------------------------------------------------------
# A corpus selection's split gathered from the full corpus's cache.
#
# A selection's pictures are the full corpus's, so when the full corpus is cached with the same
# backbone and settings (the same backbone folder), a selection's split is written from its rows
# instead of running the backbone again (README "Data": ~1,400 s of CPU for a cross-source
# selection on two cores, against seconds for the gather).

# meta.json fields a donor cache must share with what this run would write.
_DONOR_FIELDS = ("backbone", "weights_hash", "image_size", "max_text_len", "dtype",
                 "last_block", "image_tokens")


def _full_corpus(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """The data config of the whole corpus a corpus selection comes from; None for anything else
  (another dataset, or the whole corpus itself)."""
  if data.name != "corpus":
    return None
  full = ml_collections.ConfigDict({**data.to_dict(), "sources": "", "test_sources": "",
                                    "max_test_images": 0})
  return None if dataset_key(full) == dataset_key(data) else full


def _gather_plan(config: ml_collections.ConfigDict, backbone: backbones.Backbone,
                 split: RetrievalSplit, out_dir: pathlib.Path,
                 settings: EncodeSettings) -> dict[str, Any] | None:
  """How to write `split` from the full corpus's cache: {"donors", "names", "image_rows",
  "caption_rows"}; None (logged why, for a corpus selection) when it must be encoded."""
  full = _full_corpus(config.data)
  if full is None:
    return None
  donor_root = out_dir.parents[1] / dataset_key(full)
  donors = [donor_root / s for s in corpus_lib.SPLITS if feature_cache.is_complete(donor_root / s)]
  names = _array_names("image", backbone, settings) + _array_names("text", backbone, settings)
  try:
    if not donors:
      raise feature_cache.CacheError(f"no finished split of the whole corpus in '{donor_root}'")
    want = _split_meta(split, backbone, settings, 0, 0, 0, 0.0)
    donor_items = []
    for d in donors:
      meta = json.loads((d / feature_cache.META).read_text())
      for field in _DONOR_FIELDS:
        if meta.get(field, False if field == "image_tokens" else None) != want[field]:
          raise feature_cache.CacheError(f"'{d}' was encoded with {field}="
                                         f"{meta.get(field)!r}, this run has {want[field]!r}")
      lacking = [n for n in names if n not in meta["arrays"] and n != feature_cache.TOKEN_IDS]
      if lacking:
        raise feature_cache.CacheError(f"'{d}' has no {', '.join(lacking)}")
      if feature_cache.TOKEN_IDS not in meta["arrays"]:  # added after the gather instead
        names = [n for n in names if n != feature_cache.TOKEN_IDS]
      donor_items.append({**json.loads((d / feature_cache.ITEMS).read_text()),
                          "caption_image_index": np.load(d / "caption_image_index.npy")})
    image_rows, caption_rows = feature_cache.gather_rows(
        {"image_ids": split.image_ids, "captions": split.captions,
         "caption_image_index": split.caption_image_index}, donor_items)
  except (feature_cache.CacheError, OSError, ValueError, KeyError) as e:
    logging.info("%s split of %s: encoding it with the backbone, not from the whole corpus's "
                 "cache: %s", split.split, split.dataset, e)
    return None
  return {"donors": donors, "names": names, "image_rows": image_rows,
          "caption_rows": caption_rows}


def _write_gathered(plan: dict[str, Any], split: RetrievalSplit, backbone: backbones.Backbone,
                    out_dir: pathlib.Path, settings: EncodeSettings) -> dict[str, Any]:
  """Writes `split`'s cache from the rows `_gather_plan` found; returns its meta."""
  t0 = time.time()
  out_dir.mkdir(parents=True, exist_ok=True)
  feature_cache.remove_stale_temps(out_dir)
  used = sorted(set(plan["image_rows"][:, 0].tolist()) | set(plan["caption_rows"][:, 0].tolist()))
  donor_root = plan["donors"][0].parent
  derived_from = f"{donor_root.name}/{'+'.join(plan['donors'][d].name for d in used)}"
  meta = _split_meta(split, backbone, settings, split.num_images, split.num_captions, 0, 0.0)
  meta["derived_from"] = derived_from
  items = {"image_ids": split.image_ids, "image_sources": split.image_sources,
           "captions": split.captions, "caption_image_index": split.caption_image_index}
  meta = feature_cache.write_gathered(out_dir, plan["donors"], plan["names"],
                                      plan["image_rows"], plan["caption_rows"], items, meta)
  add_token_ids(out_dir, backbone)  # when the donors were written before token ids were kept
  for leftover in out_dir.glob("*.part-*"):  # an interrupted encoding's chunks
    leftover.unlink()
  logging.info("%s split of %s: %s images / %s captions taken from the cache of %s, no "
               "backbone run (%.1f s)", split.split, split.dataset, f"{split.num_images:,}",
               f"{split.num_captions:,}", derived_from, time.time() - t0)
  return meta


def _gathered(config: ml_collections.ConfigDict, backbone: backbones.Backbone,
              split: RetrievalSplit, out_dir: pathlib.Path, settings: EncodeSettings) -> bool:
  """Writes `split`'s cache from the full corpus's when that holds all of it; whether it did.

  Several processes take this path only together (otherwise some would wait in
  `encode_split`'s collectives for the others).
  """
  if _full_corpus(config.data) is None:  # the same on every process: no collective needed
    return False
  plan = _gather_plan(config, backbone, split, out_dir, settings)
  if not all(_agree([plan is not None], settings)):
    return False
  if _writes(settings):
    _write_gathered(plan, split, backbone, out_dir, settings)
  if jax.process_count() > 1 and settings.shared_cache:
    multihost_utils.sync_global_devices(f"jsds encode {split.dataset}/{split.split} gathered")
  return True


# ----------------------------------------------------------------------------------------------
# All splits of a config.


def encode(config: ml_collections.ConfigDict, *, splits: Sequence[str] | None = None,
           progress: bool = True,
           backbone: backbones.Backbone | None = None) -> dict[str, pathlib.Path]:
  """Encodes every split of `config.data` (or `splits`); returns {split: cache dir}.

  `backbone` is `config.backbone` loaded, if the caller has it (loaded here otherwise).

  With several processes each encodes its share of every chunk (see the module doc); all of
  them must call this with the same config (each its own `encode.cache_root`, or one shared
  root with `encode.shared_cache`).
  """
  registry.check(config.data)
  backbone = backbone or backbones.load_backbone(config.backbone)
  settings = EncodeSettings.from_config(config)
  # Every split to encode is read (and its data checked) before anything is written, so bad
  # data stops the run with all its problems and no files.
  loaded = {name: registry.load_split(config.data, name) for name in splits or config.data.splits
            if not feature_cache.is_complete(cache_dir_for(config, backbone, name))}
  tail = tail_init_path(config, backbone)
  if _writes(settings):
    tail.parent.mkdir(parents=True, exist_ok=True)
    if not tail.exists():
      feature_cache.save_tail_init(tail, backbone.tail_init_tensors())
    note_cache_key(config, backbone)
  out = {}
  for split_name in splits or config.data.splits:
    out_dir = cache_dir_for(config, backbone, split_name)
    # Several processes skip a split only together (encode_split's collectives need them all).
    if all(_agree([feature_cache.is_complete(out_dir) or not _writes(settings)], settings)):
      logging.info("cache for %s is complete: %s", split_name, out_dir)
      if _writes(settings):
        add_token_ids(out_dir, backbone)
      if jax.process_count() > 1 and settings.shared_cache:
        multihost_utils.sync_global_devices(f"jsds encode {split_name} token ids")
    else:
      split = loaded.get(split_name) or registry.load_split(config.data, split_name)
      if not _gathered(config, backbone, split, out_dir, settings):
        encode_split(split, backbone, out_dir, settings, progress=progress)
    out[split_name] = out_dir
  return out


def describe(cache_dirs: dict[str, pathlib.Path]) -> str:
  """A short human summary of what the cache holds."""
  lines = []
  for split_name, d in cache_dirs.items():
    meta = feature_cache.load_split(d)["meta"]
    arrays = ", ".join(f"{k} {tuple(v['shape'])} {v['dtype']}" for k, v in meta["arrays"].items()
                       if k != "caption_image_index")
    lines.append(f"  {split_name:5s} {meta['num_images']:7d} images {meta['num_captions']:7d} "
                 f"captions -> {d}\n        {arrays}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.maybe_initialize()
  config = flags.FLAGS.config
  dirs = encode(config)
  if distributed.is_main_process():
    print("Feature cache written:\n" + describe(dirs))


def run() -> None:
  """Console-script entry point `jsds-encode`."""
  # Flags are defined here, not at import, so the binaries' modules can import each other.
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.mark_flag_as_required("config")
  cli.run(main, cli.Command(
      "jsds-encode", "runs the frozen backbone once over every split of a config's dataset and "
      "writes the feature cache (a killed run resumes).",
      "--config FILE [--config.SECTION.FIELD=VALUE ...]", ["config"],
      ["jsds-encode --config configs/demo.py",
       "jsds-encode --config configs/demo.py --config.encode.dtype=bfloat16"]))


if __name__ == "__main__":
  run()
