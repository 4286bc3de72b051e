"""`encode`: runs the frozen trunk once over every split and writes the feature cache.

  python -m jsds_jax.encode --config configs/demo.py
  jsds-encode --config configs/blip_coco.py --config.encode.dtype=bfloat16

The towers are jit-compiled and their batches sharded over every local device (a 'data' mesh
axis); the parameters are replicated. Work is cut into chunks of `encode.chunk_size` items,
each written to disk as soon as it is done, so a killed run picks up at the first missing chunk
and ends with a cache identical to an uninterrupted run (chunk and batch boundaries do not depend
on where a run started).
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
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import tqdm

import jsds_jax
from jsds_jax.data import feature_cache
from jsds_jax.data import images as images_lib
from jsds_jax.data import registry
from jsds_jax.data.split import BadItemError
from jsds_jax.data.split import RetrievalSplit
from jsds_jax.models import backbones
from jsds_jax import distributed
from jsds_jax import sharding



@dataclasses.dataclass(frozen=True)
class EncodeSettings:
  """What, besides the weights, decides the cached numbers (so it is part of the cache key)."""

  batch_size: int = 64
  chunk_size: int = 1024
  dtype: str = "float32"
  last_block: bool = False
  num_workers: int = 8
  skip_bad: bool = False

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "EncodeSettings":
    enc, data = config.encode, config.data
    return cls(batch_size=enc.batch_size, chunk_size=enc.chunk_size, dtype=enc.dtype,
               last_block=enc.last_block, num_workers=enc.num_workers,
               skip_bad=data.get("skip_bad", False))

  def key(self, backbone: backbones.Backbone) -> str:
    """Hash of everything that changes the cached values."""
    blob = json.dumps({"weights": backbone.weights_hash, "dtype": self.dtype,
                       "last_block": self.last_block, "image_size": backbone.image_size,
                       "image_resize": backbone.image_resize,
                       "image_mean": backbone.image_mean, "image_std": backbone.image_std,
                       "max_text_len": backbone.max_text_len}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_dir_for(config: ml_collections.ConfigDict, backbone: backbones.Backbone,
                  split: str) -> pathlib.Path:
  """Where `encode` writes (and `train`/`eval` read) one split's cache for this config."""
  key = EncodeSettings.from_config(config).key(backbone)
  return feature_cache.split_dir(config.encode.cache_root, backbone.name, key,
                                 dataset_key(config.data), split)


def tail_init_path(config: ml_collections.ConfigDict,
                   backbone: backbones.Backbone) -> pathlib.Path:
  key = EncodeSettings.from_config(config).key(backbone)
  return feature_cache.backbone_dir(config.encode.cache_root, backbone.name,
                                    key) / feature_cache.TAIL_INIT


def dataset_key(data: ml_collections.ConfigDict) -> str:
  """The cache folder name of a dataset: Karpathy files are told apart by their JSON path."""
  if data.name != "karpathy":
    return data.name
  path = pathlib.Path(data.json).expanduser().resolve()
  return f"karpathy-{path.stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


# ----------------------------------------------------------------------------------------------
# Jitted, sharded tower calls.


def _make_tower_fn(tower, variables, mesh: jax.sharding.Mesh, last_block: bool) -> Callable:
  """Returns f(*inputs) -> {"pooled": np, "last_block_input"?: np} running `tower` sharded."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  variables = jax.device_put(variables, replicated)

  @jax.jit
  def apply(variables, *inputs):
    out = tower.apply(variables, *inputs)
    result = {"pooled": out.pooled.astype(jnp.float32)}
    if last_block:
      result["last_block_input"] = out.last_block_input.astype(jnp.bfloat16)
    return result

  def call(*inputs):
    inputs = [jax.device_put(x, batch_sharded) for x in inputs]
    return apply(variables, *inputs)

  return call


def _batches(n: int, batch_size: int, start: int, stop: int) -> Iterator[tuple[int, int]]:
  del n
  for s in range(start, stop, batch_size):
    yield s, min(s + batch_size, stop)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  if x.shape[0] == rows:
    return x
  pad = np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)
  return np.concatenate([x, pad])


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
                     progress: bool, on_chunk: Callable[[str, int], None] | None) -> int:
  """Encodes all images (kind="image") or captions (kind="text") chunk by chunk.

  Returns the number of chunks.
  """
  n = split.num_images if kind == "image" else split.num_captions
  batch = settings.batch_size
  chunk = max(batch, settings.chunk_size // batch * batch)  # whole batches per chunk
  num_chunks = max(1, -(-n // chunk))
  tower = backbone.image_tower if kind == "image" else backbone.text_tower
  if settings.dtype != "float32":
    tower = tower.clone(dtype=jnp.dtype(settings.dtype))
  variables = backbone.image_variables if kind == "image" else backbone.text_variables
  fn = _make_tower_fn(tower, variables, mesh, settings.last_block)
  names = [f"{kind}_pooled"] + ([f"{kind}_last_block_input"] if settings.last_block else [])
  if kind == "text" and settings.last_block:
    names.append("text_attention_mask")

  # A chunk is done when every file it writes is there (a kill between two renames leaves it
  # to be redone; the image chunks' list of bad images is written last).
  chunk_files = lambda k: [feature_cache.part_path(out_dir, nm, k) for nm in names] + (
      [_bad_images_path(out_dir, k)] if kind == "image" else [])
  done = [k for k in range(num_chunks) if all(f.exists() for f in chunk_files(k))]
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
      for s, e in _batches(n, batch, start, stop):
        if kind == "image":
          pixels, bad_here = _load_image_batch(split, range(s, e), backbone, settings.skip_bad,
                                               pool)
          bad += bad_here
          inputs = (_pad_rows(pixels, batch),)
        else:
          ids, mask = backbone.tokenize([split.captions[c] for c in range(s, e)])
          inputs = (_pad_rows(ids, batch), _pad_rows(mask, batch))
        result = fn(*inputs)  # dispatched asynchronously; the next batch decodes meanwhile
        if pending is not None:
          _collect(pending, outs, names, kind)
          bar.update(pending[1])
        pending = (result, e - s, inputs)
      if pending is not None:
        _collect(pending, outs, names, kind)
        bar.update(pending[1])
      for nm in names:
        feature_cache.atomic_save_npy(feature_cache.part_path(out_dir, nm, k),
                                      np.concatenate(outs[nm]))
      if kind == "image":
        feature_cache.atomic_write_json(_bad_images_path(out_dir, k), bad)
      if on_chunk is not None:
        on_chunk(kind, k)
  bar.close()
  return num_chunks


def _bad_images_path(out_dir: pathlib.Path, chunk: int) -> pathlib.Path:
  return out_dir / f"bad_images.part-{chunk:05d}.json"


def _collect(pending, outs, names, kind) -> None:
  result, count, inputs = pending
  outs[names[0]].append(np.asarray(result["pooled"])[:count])
  if len(names) > 1:
    outs[names[1]].append(np.asarray(result["last_block_input"])[:count])
  if kind == "text" and "text_attention_mask" in names:
    outs["text_attention_mask"].append(np.asarray(inputs[1][:count], np.int8))


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
    progress: show progress bars.
    on_chunk: called with (kind, chunk index) after each chunk is on disk.
  """
  if feature_cache.is_complete(out_dir):
    return feature_cache.load_split(out_dir)["meta"]
  mesh = mesh or sharding.local_data_mesh()
  if settings.batch_size % mesh.size:
    raise ValueError(f"encode.batch_size={settings.batch_size} is not a multiple of the "
                     f"{mesh.size} devices")
  out_dir.mkdir(parents=True, exist_ok=True)
  stale = feature_cache.remove_stale_temps(out_dir)
  if stale:
    logging.warning("removed %d half-written files of an earlier run in %s", stale, out_dir)
  t0 = time.time()
  n_img_chunks = _encode_modality("image", split, backbone, out_dir, settings, mesh, progress,
                                  on_chunk)
  n_txt_chunks = _encode_modality("text", split, backbone, out_dir, settings, mesh, progress,
                                  on_chunk)
  return _finalize(split, backbone, out_dir, settings, n_img_chunks, n_txt_chunks,
                   time.time() - t0)


def _finalize(split: RetrievalSplit, backbone, out_dir: pathlib.Path, settings: EncodeSettings,
              n_img_chunks: int, n_txt_chunks: int, seconds: float) -> dict[str, Any]:
  """Joins the chunks, drops images that failed to decode (when skipping), writes meta last."""
  bad = sorted(i for k in range(n_img_chunks) for i in json.loads(
      _bad_images_path(out_dir, k).read_text()))
  arrays = {}
  for name in ["image_pooled", "image_last_block_input"]:
    if feature_cache.part_path(out_dir, name, 0).exists():
      arrays[name] = feature_cache.concat_parts(out_dir, name, n_img_chunks)
  for name in ["text_pooled", "text_last_block_input", "text_attention_mask"]:
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
    dtype = "bfloat16" if name.endswith("last_block_input") else str(arr.dtype)
    specs[name] = {"shape": list(arr.shape), "dtype": dtype}
  for k in range(n_img_chunks):
    (out_dir / f"bad_images.part-{k:05d}.json").unlink()
  meta = {
      "backbone": backbone.name,
      "weights_hash": backbone.weights_hash,
      "dataset": split.dataset,
      "split": split.split,
      "num_images": len(image_ids),
      "num_captions": len(captions),
      "skipped_images": len(bad),
      "skipped": dict(getattr(split, "skipped", {}) or {}),
      "image_size": backbone.image_size,
      "max_text_len": backbone.max_text_len,
      "dtype": settings.dtype,
      "last_block": settings.last_block,
      "arrays": specs,
      "encode_seconds": round(seconds, 2),
      "jsds_jax_version": jsds_jax.__version__,
  }
  feature_cache.atomic_write_json(out_dir / feature_cache.META, meta)
  return meta


# ----------------------------------------------------------------------------------------------
# All splits of a config.


def encode(config: ml_collections.ConfigDict, *, splits: Sequence[str] | None = None,
           progress: bool = True) -> dict[str, pathlib.Path]:
  """Encodes every split of `config.data` (or `splits`); returns {split: cache dir}."""
  backbone = backbones.load_backbone(config.backbone)
  settings = EncodeSettings.from_config(config)
  tail = tail_init_path(config, backbone)
  tail.parent.mkdir(parents=True, exist_ok=True)
  if not tail.exists():
    feature_cache.save_tail_init(tail, backbone.tail_init_tensors())
  out = {}
  for split_name in splits or config.data.splits:
    out_dir = cache_dir_for(config, backbone, split_name)
    if feature_cache.is_complete(out_dir):
      logging.info("cache for %s is complete: %s", split_name, out_dir)
    else:
      split = registry.load_split(config.data, split_name)
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
  print("Feature cache written:\n" + describe(dirs))


def run() -> None:
  """Console-script entry point `jsds-encode`."""
  # Flags are defined here, not at import, so the binaries' modules can import each other.
  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.mark_flag_as_required("config")
  app.run(main)


if __name__ == "__main__":
  run()
