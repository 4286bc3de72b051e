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

A split whose items all sit in other finished caches of the same backbone and settings (a corpus
selection's, in the full corpus's) is gathered from them instead of encoded: `gather_rows`
finds each item's row, `write_gathered` writes the split's cache from those rows.
"""

import collections
from collections.abc import Mapping, Sequence
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


class MissingRowsError(CacheError):
  """Some items of a split are in none of the caches it was to be gathered from."""


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


# ----------------------------------------------------------------------------------------------
# A split gathered from other splits' caches.

# How many missing items `gather_rows`'s error names before it only counts them.
_SHOW_MISSING = 3


def _caption_keys(items: Mapping[str, Sequence]) -> list[tuple[str, str, int]]:
  """(image id, caption text, k) of every caption: its k-th caption with that text (so an image
  captioned twice alike still maps one to one)."""
  seen: collections.Counter = collections.Counter()
  keys = []
  for text, i in zip(items["captions"], items["caption_image_index"]):
    key = (items["image_ids"][int(i)], text)
    keys.append((*key, seen[key]))
    seen[key] += 1
  return keys


def _locate(wanted: Sequence[Any], donor_keys: Sequence[Sequence[Any]]) -> tuple[np.ndarray,
                                                                                   list[Any]]:
  """((len(wanted), 2) int64 [donor, row] of each wanted key, -1 where absent; the absent keys)."""
  where: dict[Any, tuple[int, int]] = {}
  for d, keys in enumerate(donor_keys):
    for r, key in enumerate(keys):
      where.setdefault(key, (d, r))
  rows = np.asarray([where.get(k, (-1, -1)) for k in wanted], np.int64).reshape(-1, 2)
  return rows, [k for k, (d, _) in zip(wanted, rows) if d < 0]


def gather_rows(items: Mapping[str, Sequence],
                donors: Sequence[Mapping[str, Sequence]]) -> tuple[np.ndarray, np.ndarray]:
  """Where each image and caption of a split sits in other splits' caches (`donors`).

  Args:
    items: the split: {"image_ids": (N_images,) str, "captions": (N_captions,) str,
      "caption_image_index": (N_captions,) int}.
    donors: the same for each donor cache (its items.json and caption_image_index.npy).

  Returns:
    (image_rows (N_images, 2) int64, caption_rows (N_captions, 2) int64): [donor, row] of each
    image, found by its id, and of each caption, found by its image's id and its text (the
    first donor that holds an item wins).

  Raises:
    MissingRowsError: some image or caption is in no donor; the message counts them and names
      the first few.
  """
  image_rows, missing_images = _locate(list(items["image_ids"]),
                                       [list(d["image_ids"]) for d in donors])
  caption_rows, missing_captions = _locate(_caption_keys(items),
                                           [_caption_keys(d) for d in donors])
  if missing_images or missing_captions:
    show = lambda keys: ", ".join(map(repr, keys[:_SHOW_MISSING])) + (
        ", ..." if len(keys) > _SHOW_MISSING else "")
    raise MissingRowsError(
        f"{len(missing_images)} of {len(image_rows)} images and {len(missing_captions)} of "
        f"{len(caption_rows)} captions are in no donor cache"
        + (f"; images {show(missing_images)}" if missing_images else "")
        + (f"; captions (image id, text, k) {show(missing_captions)}"
           if missing_captions else ""))
  return image_rows, caption_rows


def _gather_array(path: pathlib.Path, sources: Sequence[np.ndarray], rows: np.ndarray,
                  block: int = 4096) -> None:
  """Writes `sources[d][r]` for each [d, r] of `rows` (N, 2) into the .npy `path`, atomically, a
  block of rows at a time (the `last_block` arrays are larger than memory)."""
  with atomic.replacing(path) as tmp:
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=sources[0].dtype,
                                    shape=(len(rows),) + sources[0].shape[1:])
    for start in range(0, len(rows), block):
      chunk = rows[start:start + block]
      for d, source in enumerate(sources):
        picked = np.flatnonzero(chunk[:, 0] == d)
        if picked.size:
          out[start + picked] = source[chunk[picked, 1]]
    out.flush()
    del out


def write_gathered(out_dir: pathlib.Path, donor_dirs: Sequence[pathlib.Path],
                   names: Sequence[str], image_rows: np.ndarray, caption_rows: np.ndarray,
                   items: Mapping[str, Sequence], meta: Mapping[str, Any]) -> dict[str, Any]:
  """Writes a split's cache from rows of finished caches; meta.json last.

  Args:
    out_dir: the split's cache folder.
    donor_dirs: the finished caches `image_rows` / `caption_rows` point into.
    names: the arrays to gather ("image_*" by image row, "text_*" by caption row); every donor
      must hold them, with the same dtype and row shape.
    image_rows, caption_rows: (N_images, 2), (N_captions, 2) int64 [donor, row] (`gather_rows`).
    items: the split's "image_ids", "image_sources", "captions" and "caption_image_index"
      (N_captions,) int, in its own order.
    meta: meta.json's fields but "arrays", which is filled in here.

  Returns:
    The meta written.

  Raises:
    CacheError: a donor lacks an array, or holds it with another dtype or row shape.
  """
  out_dir.mkdir(parents=True, exist_ok=True)
  donor_metas = [json.loads((d / META).read_text()) for d in donor_dirs]
  specs = {}
  for name in names:
    spec = None
    for d, m in zip(donor_dirs, donor_metas):
      got = m["arrays"].get(name)
      if got is None:
        raise CacheError(f"'{d}' has no {name} array")
      spec = spec or got
      if (got["dtype"], got["shape"][1:]) != (spec["dtype"], spec["shape"][1:]):
        raise CacheError(f"'{d}' holds {name} as {got['dtype']} rows of {got['shape'][1:]}, "
                         f"'{donor_dirs[0]}' as {spec['dtype']} rows of {spec['shape'][1:]}")
    rows = image_rows if name.startswith("image") else caption_rows
    # Raw .npy contents (bf16 stays its uint16 bit pattern), gathered as stored.
    _gather_array(out_dir / f"{name}.npy",
                  [np.load(d / f"{name}.npy", mmap_mode="r") for d in donor_dirs], rows)
    specs[name] = {"shape": [len(rows)] + spec["shape"][1:], "dtype": spec["dtype"]}
  index = np.asarray(items["caption_image_index"], np.int64)
  atomic_save_npy(out_dir / "caption_image_index.npy", index)
  specs["caption_image_index"] = {"shape": list(index.shape), "dtype": str(index.dtype)}
  atomic_write_json(out_dir / ITEMS, {k: list(items[k]) for k in
                                      ("image_ids", "image_sources", "captions")})
  meta = {**meta, "arrays": specs}
  atomic_write_json(out_dir / META, meta)
  return meta
