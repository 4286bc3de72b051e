"""The feature cache's on-disk format: atomic writes, parts, bf16 round trip, damage detection."""


import ml_dtypes
import numpy as np
import pytest

from jsds_jax.data import feature_cache


def _finish(d, arrays):
  specs = {}
  for name, arr in arrays.items():
    feature_cache.atomic_save_npy(d / f"{name}.npy", arr)
    dtype = "bfloat16" if arr.dtype == ml_dtypes.bfloat16 else str(arr.dtype)
    specs[name] = {"shape": list(arr.shape), "dtype": dtype}
  feature_cache.atomic_write_json(d / feature_cache.ITEMS, {"image_ids": [], "captions": []})
  feature_cache.atomic_write_json(d / feature_cache.META, {"arrays": specs, "backbone": "x",
                                                           "weights_hash": "h", "dataset": "d"})


def test_round_trip_with_bf16(tmp_path):
  rng = np.random.default_rng(0)
  f32 = rng.normal(size=(5, 3)).astype(np.float32)
  bf16 = rng.normal(size=(5, 2, 3)).astype(ml_dtypes.bfloat16)
  _finish(tmp_path, {"a": f32, "b": bf16})
  out = feature_cache.load_split(tmp_path)
  np.testing.assert_array_equal(out["a"], f32)
  assert out["b"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(out["b"].view(np.uint16), bf16.view(np.uint16))
  assert isinstance(out["a"], np.memmap)


def test_incomplete_cache_is_refused(tmp_path):
  feature_cache.atomic_save_npy(tmp_path / "a.npy", np.zeros(3))
  with pytest.raises(feature_cache.CacheError, match="no finished feature cache"):
    feature_cache.load_split(tmp_path)


def test_damaged_array_is_named(tmp_path):
  _finish(tmp_path, {"a": np.zeros((4, 2), np.float32)})
  np.save(tmp_path / "a.npy", np.zeros((3, 2), np.float32))
  with pytest.raises(feature_cache.CacheError, match="a.npy"):
    feature_cache.load_split(tmp_path)


def test_concat_parts_and_stale_temps(tmp_path):
  parts = [np.full((k + 1, 2), k, np.float32) for k in range(3)]
  for k, p in enumerate(parts):
    feature_cache.atomic_save_npy(feature_cache.part_path(tmp_path, "x", k), p)
  (tmp_path / ".x.part-00003.npy.tmp-123").write_bytes(b"half")
  assert feature_cache.remove_stale_temps(tmp_path) == 1
  final = feature_cache.concat_parts(tmp_path, "x", 3)
  np.testing.assert_array_equal(np.load(final), np.concatenate(parts))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_check_matches_names_the_field():
  meta = {"backbone": "lit", "weights_hash": "abc", "dataset": "demo"}
  feature_cache.check_matches(meta, backbone="lit", dataset="demo")
  with pytest.raises(feature_cache.CacheError, match="backbone is 'lit', expected 'blip'"):
    feature_cache.check_matches(meta, backbone="blip")


def test_tail_init_round_trip(tmp_path):
  t = {"word_embeddings": np.arange(6, dtype=np.float32).reshape(3, 2)}
  feature_cache.save_tail_init(tmp_path / "t.safetensors", t)
  np.testing.assert_array_equal(feature_cache.load_tail_init(tmp_path / "t.safetensors")
                                ["word_embeddings"], t["word_embeddings"])
  with pytest.raises(feature_cache.CacheError):
    feature_cache.load_tail_init(tmp_path / "missing.safetensors")
