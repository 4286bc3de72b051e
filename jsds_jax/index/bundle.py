"""The search bundle: the files `eval --out DIR` writes for `search` and how they are read back.

  DIR/index/             an exact inverted index of the split's image sparse vectors
  DIR/search.json        model metadata, the config, w1/w2/τ, image ids, sources and captions
  DIR/image_dense.npy    (N_images, P) float32 image dense embeddings, for `--rerank dense`
  DIR/tail.safetensors   the tail's params ("a/b/c" names) that encode the queries

The eval binary writes it (`write`); `search` reads it (`resolve_dir`, `read_meta`,
`load_tail_params`, `load_image_dense`, `INDEX_DIR`) without importing the eval binary.
"""

from collections.abc import Mapping
import json
import os
import pathlib
from typing import Any

import flax.traverse_util
import jax
import ml_collections
import numpy as np

from jsds_jax import atomic
from jsds_jax.data import feature_cache

INDEX_DIR = "index"
SEARCH_META = "search.json"
IMAGE_DENSE = "image_dense.npy"
TAIL_PARAMS = "tail.safetensors"


def save_tail_params(path: pathlib.Path, params: Mapping[str, Any]) -> None:
  """The tail's params as one safetensors file ("a/b/c" names), written atomically."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  flat = flax.traverse_util.flatten_dict(jax.device_get(dict(params)), sep="/")
  # np.array, not np.ascontiguousarray: the latter turns the 0-d τ into shape (1,).
  with atomic.replacing(path) as tmp:
    safetensors.numpy.save_file({k: np.array(v, np.float32, order="C")
                                 for k, v in flat.items()}, str(tmp))


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


def write(out_dir: pathlib.Path, out: Any, params: Mapping[str, Any], cache: Mapping[str, Any],
          config: ml_collections.ConfigDict, model: dict[str, Any],
          w1: float, w2: float, integrated: str = "tau") -> pathlib.Path:
  """The exact index of the image sparse vectors and what `search` needs beside it.

  Args:
    out_dir: the eval output folder.
    out: the split's `tail_outputs.TailOutputs` (z_i (N_images, V) CSR, e_i (N_images, P), tau).
    params: the tail's params.
    cache: the split's feature cache (`feature_cache.load_split`): items and metadata.
    config: the run's config, stored so `search` loads the same backbone.
    model: `model_metadata`, recorded in the index and checked when it is loaded.
    w1, w2: the integrated score's weights.
    integrated: the eval's integrated formula ("cosine" or "tau"), which `search --rerank
      dense` follows.

  Returns:
    The index folder.
  """
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


def resolve_dir(path: str | os.PathLike) -> pathlib.Path:
  """The eval output folder holding the search files, given it or its index/ subfolder."""
  path = pathlib.Path(path).expanduser()
  for root in (path, path.parent):
    if (root / SEARCH_META).is_file() and (root / INDEX_DIR).is_dir():
      return root
  raise FileNotFoundError(f"{path} holds no search index: run `jsds-eval ... --out DIR` and "
                          f"pass DIR (it writes {INDEX_DIR}/ and {SEARCH_META} there)")


def read_meta(root: pathlib.Path) -> dict[str, Any]:
  """search.json of a bundle folder (`resolve_dir`)."""
  return json.loads((pathlib.Path(root) / SEARCH_META).read_text())


def load_image_dense(root: pathlib.Path) -> np.ndarray:
  """(N_images, P) float32 image dense embeddings of a bundle folder, memory-mapped."""
  return np.load(pathlib.Path(root) / IMAGE_DENSE, mmap_mode="r")
