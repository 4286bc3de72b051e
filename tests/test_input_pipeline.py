"""The on-device input path: epoch order (distinct images, determinism), placement, gathers."""

import jax
import numpy as np
import pytest

from jsds_jax import input_pipeline
from jsds_jax import train_data
from jsds_jax.data import feature_cache

# Images with 1 to 4 captions each, in no particular order in the caption table.
_COUNTS = np.random.default_rng(0).integers(1, 5, size=50)
CAP_IMG = np.random.default_rng(1).permutation(np.repeat(np.arange(50), _COUNTS))
B = 8


def _mesh(n=4):
  return jax.sharding.Mesh(np.asarray(jax.devices()[:n]), ("data",))


def test_epoch_order_rows_hold_distinct_images_once_per_epoch():
  order = input_pipeline.epoch_order(3, 0, CAP_IMG, B)
  assert order.dtype == np.int32 and order.shape == (50 // B, B)
  images = CAP_IMG[order]
  for row in images:
    assert len(set(row.tolist())) == B, "two captions of one image in a batch"
  assert len(set(images.ravel().tolist())) == order.size, "an image twice in an epoch"
  assert len(set(order.ravel().tolist())) == order.size


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
  a = input_pipeline.epoch_order(3, 5, CAP_IMG, B)
  np.testing.assert_array_equal(a, input_pipeline.epoch_order(3, 5, CAP_IMG, B))
  assert not np.array_equal(a, input_pipeline.epoch_order(3, 6, CAP_IMG, B))
  assert not np.array_equal(a, input_pipeline.epoch_order(4, 5, CAP_IMG, B))


def test_every_caption_of_an_image_gets_picked():
  # Over many epochs each caption of a 4-caption image is drawn about 1/4 of the time.
  seen = np.zeros(len(CAP_IMG))
  for epoch in range(200):
    order = input_pipeline.epoch_order(0, epoch, CAP_IMG, 50)  # one row: every image
    seen[order.ravel()] += 1
  assert np.all(seen > 0)
  per_image_total = np.bincount(CAP_IMG, weights=seen)
  np.testing.assert_array_equal(per_image_total, np.full(50, 200.0))
  four = np.flatnonzero(_COUNTS[CAP_IMG] == 4)
  assert 0.15 < seen[four].mean() / 200 < 0.35 and seen[four].min() > 20


def test_a_batch_larger_than_the_training_set_says_what_fits():
  with pytest.raises(ValueError) as info:
    input_pipeline.steps_per_epoch(2, 64)
  message = str(info.value)
  assert "train.batch_size 64 exceeds the 2 training images" in message
  assert "--config.train.batch_size=1 or less" in message and "skip_bad" in message
  assert input_pipeline.steps_per_epoch(2, 1) == 2
  with pytest.raises(ValueError, match="batch_size=32 or less"):
    input_pipeline.steps_per_epoch(100, 128)
  assert input_pipeline.steps_per_epoch(100, 32) == 3


def test_epoch_order_errors():
  with pytest.raises(ValueError, match="exceeds"):
    input_pipeline.epoch_order(0, 0, CAP_IMG, 64)
  with pytest.raises(ValueError, match="no caption"):
    input_pipeline.epoch_order(0, 0, np.array([0, 0, 2, 2]), 1)


def test_features_replicated_order_sharded_and_gather(tmp_path):
  rng = np.random.default_rng(2)
  image = rng.normal(size=(50, 6)).astype(np.float32)
  text = rng.normal(size=(len(CAP_IMG), 5)).astype(np.float32)
  mesh = _mesh()
  features = input_pipeline.device_features(image, text, CAP_IMG, mesh)
  for arr in (features.image_pooled, features.text_pooled, features.caption_image_index):
    assert arr.sharding.is_fully_replicated and len(arr.sharding.device_set) == 4
  assert features.caption_image_index.dtype == np.int32
  order = input_pipeline.epoch_order(0, 1, CAP_IMG, B)
  dev_order = input_pipeline.device_order(order, mesh)
  # Each device holds its own quarter of every step's batch.
  shard = dev_order.addressable_shards[1]
  np.testing.assert_array_equal(np.asarray(shard.data), order[:, 2:4])
  h_img, h_txt, img = jax.jit(input_pipeline.gather_batch)(features, dev_order[2])
  np.testing.assert_array_equal(np.asarray(img), CAP_IMG[order[2]])
  np.testing.assert_array_equal(np.asarray(h_txt), text[order[2]])
  np.testing.assert_array_equal(np.asarray(h_img), image[CAP_IMG[order[2]]])
  with pytest.raises(ValueError, match="caption_image_index"):
    input_pipeline.device_features(image[:10], text, CAP_IMG, mesh)


def test_load_device_features_from_a_cache(tmp_path):
  rng = np.random.default_rng(3)
  arrays = {"image_pooled": rng.normal(size=(4, 3)).astype(np.float32),
            "text_pooled": rng.normal(size=(6, 2)).astype(np.float32),
            "caption_image_index": np.array([0, 0, 1, 2, 3, 3], np.int64)}
  for name, arr in arrays.items():
    feature_cache.atomic_save_npy(tmp_path / f"{name}.npy", arr)
  feature_cache.atomic_write_json(tmp_path / feature_cache.ITEMS, {})
  feature_cache.atomic_write_json(tmp_path / feature_cache.META, {"arrays": {
      k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()}})
  features = input_pipeline.load_device_features(tmp_path, _mesh(2), dtype="bfloat16")
  assert features.num_images == 4 and features.num_captions == 6
  assert features.text_pooled.dtype == np.dtype("bfloat16")
  np.testing.assert_allclose(np.asarray(features.image_pooled, np.float32),
                             arrays["image_pooled"], rtol=1e-2)


def test_data_position_resumes_at_the_next_batch():
  # The position is the step's alone: a resumed run needs nothing else to read the next batch.
  assert train_data.position(23, steps_per_epoch=10) == (2, 3)
  assert train_data.position(24, 10) == (2, 4)
  assert train_data.position(29, 10) == (2, 9) and train_data.position(30, 10) == (3, 0)


def test_train_features_dtype_from_the_config(tmp_path):
  """`train.features_dtype` reaches the devices through TrainData, in both layouts."""
  rng = np.random.default_rng(4)
  arrays = {"image_pooled": rng.normal(size=(8, 3)).astype(np.float32),
            "text_pooled": rng.normal(size=(8, 2)).astype(np.float32),
            "caption_image_index": np.arange(8, dtype=np.int64)}
  for name, arr in arrays.items():
    feature_cache.atomic_save_npy(tmp_path / f"{name}.npy", arr)
  feature_cache.atomic_write_json(tmp_path / feature_cache.ITEMS, {})
  feature_cache.atomic_write_json(tmp_path / feature_cache.META, {"arrays": {
      k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()}})
  cache = feature_cache.load_split(tmp_path)
  for layout in ("replicated", "sharded"):
    kept = train_data.TrainData(tmp_path, cache, _mesh(2), seed=0, batch_size=2, layout=layout)
    assert kept.features.image_pooled.dtype == np.float32
    half = train_data.TrainData(tmp_path, cache, _mesh(2), seed=0, batch_size=2, layout=layout,
                                dtype="bfloat16")
    assert half.features.image_pooled.dtype == np.dtype("bfloat16")
  with pytest.raises(ValueError, match="train.features_dtype must be one of"):
    train_data.TrainData(tmp_path, cache, _mesh(2), seed=0, batch_size=2, layout="replicated",
                         dtype="float16")
