"""The feature cache: what the frozen trunk computed once, read back memory-mapped.

Layout of one split's cache (`<cache_root>/<backbone>-<weights hash[:12]>/<dataset>/<split>/`):

  image_pooled.npy            (N_images, D_image)  float32   h_x of every image
  text_pooled.npy             (N_captions, D_text) float32   h_x of every caption
  caption_image_index.npy     (N_captions,)        int64     caption -> image row
  image_last_block_input.npy  (N_images, L_i, D_image)  bf16  optional (`last_block`)
  text_last_block_input.npy   (N_captions, L_t, D_text) bf16  optional
  text_attention_mask.npy     (N_captions, L_t)    int8      optional, with the above
  image_tokens.npy            (N_images, S, D_image)    bf16  optional (`image_tokens`): the
                                                             final token states a
                                                             cross-encoder attends to
  text_token_ids.npy          (N_captions, L_t)    int32     token ids, -1 at padding (for
                                                             PEC); `encode` adds it to a
                                                             cache written without it
  items.json                  image ids, image sources, captions
  meta.json                   backbone, weights hash, dataset, split, counts, shapes, dtypes;
                              written last, so its presence means the split is complete.

and once per backbone `<cache_root>/<backbone>-<hash[:12]>/tail_init.safetensors` holding the
tensors the tail starts from (`image_proj.kernel`, `image_proj.bias`, `text_proj.*`,
`word_embeddings`).

Why `.npy`: `np.load(mmap_mode="r")` maps it without reading it, so the 100 GB `last_block`
cache streams from disk while the small [CLS] cache is read whole; it needs nothing beyond
numpy, every tool reads it, and a file's header fixes its shape and dtype. bf16 arrays are stored
as their uint16 bit patterns (numpy has no bf16) and viewed back on load, as meta.json records.

While a split is being encoded, finished chunks live as `<name>.part-<k>.npy` and are
concatenated once all are present; every file is written to a temporary name and renamed, so a
killed run leaves no half-written file that could be mistaken for a finished one.
"""

from collections.abc import Mapping
import json
import os
import pathlib
from typing import Any

import ml_dtypes
import numpy as np

from jsds_jax import atomic

META = "meta.json"
# (N_captions, L) int32 token ids of every caption, -1 at padding: the vocabulary entries a
# caption's own words occupy (PEC masks with them; a text last block attends with them).
TOKEN_IDS = "text_token_ids"


def token_ids(input_ids: Any, attention_mask: Any) -> np.ndarray:
  """(B, L) int32 the captions' token ids as the cache keeps them: -1 where the attention mask
  is 0 (padding)."""
  return np.where(np.asarray(attention_mask) > 0, np.asarray(input_ids), -1).astype(np.int32)
ITEMS = "items.json"
TAIL_INIT = "tail_init.safetensors"
_BF16 = "bfloat16"


class CacheError(ValueError):
  """A feature cache is missing, incomplete, or from another backbone / dataset."""


def backbone_dir(cache_root: str | os.PathLike, backbone: str, weights_hash: str) -> pathlib.Path:
  return pathlib.Path(cache_root).expanduser() / f"{backbone}-{weights_hash[:12]}"


def split_dir(cache_root, backbone: str, weights_hash: str, dataset: str,
              split: str) -> pathlib.Path:
  return backbone_dir(cache_root, backbone, weights_hash) / dataset / split


def tail_init_path(split_cache: str | os.PathLike) -> pathlib.Path:
  """`tail_init.safetensors` of the backbone a split's cache (`split_dir`) belongs to: two
  levels up, beside the dataset folders."""
  return pathlib.Path(split_cache).parents[1] / TAIL_INIT


def atomic_save_npy(path: pathlib.Path, array: np.ndarray) -> None:
  """np.save to a temporary name, fsync, rename: readers never see a partial file."""
  if array.dtype == ml_dtypes.bfloat16:
    array = array.view(np.uint16)
  with atomic.replacing(path) as tmp, open(tmp, "wb") as f:
    np.save(f, array)
    atomic.sync(f)


def atomic_write_json(path: pathlib.Path, obj: Any) -> None:
  """The cache's JSON files (meta, items), one key per line, written atomically."""
  atomic.write_json(path, obj, indent=1)


def part_path(directory: pathlib.Path, name: str, chunk: int) -> pathlib.Path:
  return directory / f"{name}.part-{chunk:05d}.npy"


def concat_parts(directory: pathlib.Path, name: str, num_chunks: int) -> pathlib.Path:
  """Concatenates `<name>.part-*.npy` into `<name>.npy` (written via a temp name) and removes
  the parts. Streams through a memmap so peak memory is one part."""
  parts = [np.load(part_path(directory, name, k), mmap_mode="r") for k in range(num_chunks)]
  total = sum(p.shape[0] for p in parts)
  final = directory / f"{name}.npy"
  with atomic.replacing(final) as tmp:
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=parts[0].dtype,
                                    shape=(total,) + parts[0].shape[1:])
    row = 0
    for p in parts:
      out[row:row + p.shape[0]] = p
      row += p.shape[0]
    out.flush()
    del out
  for k in range(num_chunks):
    part_path(directory, name, k).unlink()
  return final


def remove_stale_temps(directory: pathlib.Path) -> int:
  """Deletes temporary files a killed run left behind; returns how many."""
  stale = list(directory.glob(".*.tmp-*"))
  for p in stale:
    p.unlink()
  return len(stale)


def is_complete(directory: pathlib.Path) -> bool:
  return (directory / META).exists()


def load_split(directory: str | os.PathLike, mmap: bool = True) -> dict[str, Any]:
  """Reads one split's cache.

  Returns:
    {"meta": dict, "items": dict, "<array name>": np.ndarray (memory-mapped if `mmap`)} with
    bf16 arrays viewed as `ml_dtypes.bfloat16`.

  Raises:
    CacheError: the directory holds no finished cache.
  """
  directory = pathlib.Path(directory)
  if not is_complete(directory):
    raise CacheError(f"no finished feature cache in '{directory}' (no {META}); run "
                     "`python -m jsds_jax.encode` with the same config first")
  meta = json.loads((directory / META).read_text())
  out: dict[str, Any] = {"meta": meta,
                         "items": json.loads((directory / ITEMS).read_text())}
  for name, spec in meta["arrays"].items():
    arr = np.load(directory / f"{name}.npy", mmap_mode="r" if mmap else None)
    if spec["dtype"] == _BF16:
      arr = arr.view(ml_dtypes.bfloat16)
    if list(arr.shape) != spec["shape"]:
      raise CacheError(f"'{directory / name}.npy' has shape {arr.shape}, meta.json says "
                       f"{spec['shape']}: the cache is damaged; delete the folder and re-encode")
    out[name] = arr
  return out


def check_matches(meta: Mapping[str, Any], *, backbone: str | None = None,
                  weights_hash: str | None = None, dataset: str | None = None) -> None:
  """Raises CacheError naming the field when a cache's metadata disagrees with what is asked."""
  for field, want in (("backbone", backbone), ("weights_hash", weights_hash),
                      ("dataset", dataset)):
    if want is not None and meta.get(field) != want:
      raise CacheError(f"feature cache {field} is '{meta.get(field)}', expected '{want}'")


def save_tail_init(path: pathlib.Path, tensors: Mapping[str, np.ndarray]) -> None:
  """Writes the tensors the trained tail starts from, atomically."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  with atomic.replacing(path) as tmp:
    safetensors.numpy.save_file({k: np.ascontiguousarray(v, np.float32)
                                 for k, v in tensors.items()}, str(tmp))


def load_tail_init(path: str | os.PathLike) -> dict[str, np.ndarray]:
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if not path.exists():
    raise CacheError(f"'{path}' does not exist: encode this backbone first")
  return safetensors.numpy.load_file(str(path))
