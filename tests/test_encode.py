"""`encode` end to end on the tiny backbone and generated data: cache contents, resume after a
crash, sharding, bad images, the last-block option."""

import json
import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest

from jsds_jax import encode
from jsds_jax import sharding
from jsds_jax.data import feature_cache
from jsds_jax.data import images as images_lib
from jsds_jax.data import registry
from jsds_jax.models.trunk import backbones
import testing_utils  # tests/testing_utils.py

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(tmp_path, **encode_overrides):
  config = testing_utils.load_config("tiny")
  config.data.cache_dir = str(tmp_path / "data")
  config.encode.cache_root = str(tmp_path / "features")
  for k, v in encode_overrides.items():
    config.encode[k] = v
  return config


@pytest.fixture(scope="module")
def tiny_backbone():
  import ml_collections  # pylint: disable=g-import-not-at-top
  return backbones.load_backbone(ml_collections.ConfigDict(
      {"name": "tiny", "max_text_len": 16, "seed": 0}))


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
  config = _config(tmp_path_factory.mktemp("split"))
  return registry.load_split(config.data, "train")


def _settings(**kw):
  base = dict(batch_size=8, chunk_size=16, dtype="float32", last_block=False, num_workers=2)
  base.update(kw)
  return encode.EncodeSettings(**base)


def _arrays(directory):
  out = feature_cache.load_split(directory, mmap=False)
  return {k: v for k, v in out.items() if isinstance(v, np.ndarray)}, out


def test_cache_contents_match_the_towers(tmp_path, tiny_backbone, tiny_split):
  meta = encode.encode_split(tiny_split, tiny_backbone, tmp_path / "c", _settings(),
                             progress=False)
  arrays, full = _arrays(tmp_path / "c")
  assert meta["num_images"] == tiny_split.num_images
  assert meta["num_captions"] == tiny_split.num_captions
  assert arrays["image_pooled"].shape == (tiny_split.num_images, 32)
  assert arrays["text_pooled"].shape == (tiny_split.num_captions, 32)
  np.testing.assert_array_equal(arrays["caption_image_index"], tiny_split.caption_image_index)
  assert full["items"]["captions"] == list(tiny_split.captions)
  # Row 5 of the cache is what the tower gives for caption 5 alone.
  ids, mask = tiny_backbone.tokenize([tiny_split.captions[5]])
  want = tiny_backbone.text_tower.apply(tiny_backbone.text_variables, ids, mask).pooled
  np.testing.assert_allclose(arrays["text_pooled"][5], np.asarray(want)[0], atol=1e-5)
  assert not list((tmp_path / "c").glob("*.part-*")), "chunk files must be gone"


def test_resume_after_crash_gives_identical_cache(tmp_path, tiny_backbone, tiny_split):
  settings = _settings()
  encode.encode_split(tiny_split, tiny_backbone, tmp_path / "whole", settings, progress=False)

  calls = []

  def crash_after_two(kind, chunk):
    calls.append((kind, chunk))
    if len(calls) == 2:
      raise KeyboardInterrupt("simulated kill")

  with pytest.raises(KeyboardInterrupt):
    encode.encode_split(tiny_split, tiny_backbone, tmp_path / "resumed", settings,
                        progress=False, on_chunk=crash_after_two)
  assert not feature_cache.is_complete(tmp_path / "resumed")
  # A file a kill left half-written is ignored and cleaned up.
  (tmp_path / "resumed" / ".image_pooled.part-00002.npy.tmp-999").write_bytes(b"\x93NUM")
  # A kill between a chunk's renames (features on disk, its bad-image list not yet): redone.
  (tmp_path / "resumed" / "bad_images.part-00001.json").unlink()
  redone = []
  encode.encode_split(tiny_split, tiny_backbone, tmp_path / "resumed", settings,
                      progress=False, on_chunk=lambda kind, chunk: redone.append((kind, chunk)))
  assert ("image", 0) not in redone and ("image", 1) in redone, redone
  whole, _ = _arrays(tmp_path / "whole")
  resumed, _ = _arrays(tmp_path / "resumed")
  assert whole.keys() == resumed.keys()
  for name in whole:
    np.testing.assert_array_equal(whole[name], resumed[name], err_msg=name)
  meta_a = json.loads((tmp_path / "whole" / "meta.json").read_text())
  meta_b = json.loads((tmp_path / "resumed" / "meta.json").read_text())
  meta_a.pop("encode_seconds"), meta_b.pop("encode_seconds")
  assert meta_a == meta_b


def test_sharded_over_four_devices_equals_one(tmp_path, tiny_backbone, tiny_split):
  assert jax.local_device_count() >= 4, "conftest sets 4 fake CPU devices"
  one = jax.sharding.Mesh(np.asarray(jax.local_devices()[:1]), ("data",))
  encode.encode_split(tiny_split, tiny_backbone, tmp_path / "one", _settings(), mesh=one,
                      progress=False)
  encode.encode_split(tiny_split, tiny_backbone, tmp_path / "four", _settings(),
                      mesh=sharding.local_data_mesh(), progress=False)
  a, _ = _arrays(tmp_path / "one")
  b, _ = _arrays(tmp_path / "four")
  for name in a:
    np.testing.assert_allclose(a[name], b[name], atol=1e-5, err_msg=name)


def test_batch_size_must_divide_over_devices(tmp_path, tiny_backbone, tiny_split):
  with pytest.raises(ValueError, match="multiple of the 4 devices"):
    encode.encode_split(tiny_split, tiny_backbone, tmp_path / "x", _settings(batch_size=6),
                        mesh=sharding.local_data_mesh(), progress=False)


def test_corrupt_image_fails_or_is_skipped(tmp_path, tiny_backbone):
  config = _config(tmp_path)
  split = registry.load_split(config.data, "val")
  bad_file = pathlib.Path(split.image_sources[3])
  bad_file.write_bytes(b"not an image")
  with pytest.raises(Exception, match=bad_file.name):
    encode.encode_split(split, tiny_backbone, tmp_path / "fail", _settings(), progress=False)
  meta = encode.encode_split(split, tiny_backbone, tmp_path / "skip",
                             _settings(skip_bad=True), progress=False)
  assert meta["skipped_images"] == 1
  assert meta["num_images"] == split.num_images - 1
  per_image = split.num_captions // split.num_images
  assert meta["num_captions"] == split.num_captions - per_image
  arrays, full = _arrays(tmp_path / "skip")
  assert split.image_ids[3] not in full["items"]["image_ids"]
  # The caption map still points every caption at its own image.
  for c, i in enumerate(arrays["caption_image_index"]):
    src_caption = full["items"]["captions"][c]
    orig = list(split.captions).index(src_caption)
    assert split.image_ids[split.caption_image_index[orig]] == full["items"]["image_ids"][i]


def test_last_block_states_are_bf16(tmp_path, tiny_backbone, tiny_split):
  encode.encode_split(tiny_split, tiny_backbone, tmp_path / "lb", _settings(last_block=True),
                      progress=False)
  arrays, _ = _arrays(tmp_path / "lb")
  n_tokens = (32 // 8) ** 2 + 1
  assert arrays["image_last_block_input"].shape == (tiny_split.num_images, n_tokens, 32)
  assert arrays["image_last_block_input"].dtype == ml_dtypes.bfloat16
  assert arrays["text_last_block_input"].shape == (tiny_split.num_captions, 16, 32)
  assert arrays["text_attention_mask"].shape == (tiny_split.num_captions, 16)


def test_image_tokens_for_the_cross_encoder(tmp_path, tiny_backbone, tiny_split):
  """Opt-in, bf16, memory-mapped, equal to the tower's final token states, and resumable."""
  settings = _settings(image_tokens=True)
  assert settings.key(tiny_backbone) != _settings().key(tiny_backbone)
  calls = []

  def crash_after_one(kind, chunk):
    calls.append((kind, chunk))
    if len(calls) == 1:
      raise KeyboardInterrupt("simulated kill")

  with pytest.raises(KeyboardInterrupt):
    encode.encode_split(tiny_split, tiny_backbone, tmp_path / "t", settings, progress=False,
                        on_chunk=crash_after_one)
  assert feature_cache.part_path(tmp_path / "t", encode.IMAGE_TOKENS, 0).exists()
  redone = []
  meta = encode.encode_split(tiny_split, tiny_backbone, tmp_path / "t", settings,
                             progress=False, on_chunk=lambda *a: redone.append(a))
  assert ("image", 0) not in redone and ("image", 1) in redone, redone
  assert meta["image_tokens"] and meta["arrays"]["image_tokens"]["dtype"] == "bfloat16"
  mapped = feature_cache.load_split(tmp_path / "t")["image_tokens"]
  assert isinstance(mapped.base, np.memmap) or isinstance(mapped, np.memmap)
  n_tokens = (32 // 8) ** 2 + 1
  assert mapped.shape == (tiny_split.num_images, n_tokens, 32)
  assert mapped.dtype == ml_dtypes.bfloat16
  # Row 17 (second chunk) is the tower's output for image 17 alone, rounded to bf16.
  pixels = images_lib.preprocess([tiny_split.load_image(17)], tiny_backbone.image_size,
                                 tiny_backbone.image_mean, tiny_backbone.image_std,
                                 resize=tiny_backbone.image_resize)
  want = tiny_backbone.image_tower.apply(tiny_backbone.image_variables, pixels).tokens
  np.testing.assert_allclose(np.asarray(mapped[17], np.float32), np.asarray(want)[0],
                             atol=0.02, rtol=0.01)
  # Off by default: no token states in the plain cache.
  encode.encode_split(tiny_split, tiny_backbone, tmp_path / "plain", _settings(),
                      progress=False)
  assert "image_tokens" not in feature_cache.load_split(tmp_path / "plain")


def test_encode_all_splits_and_tail_init(tmp_path):
  config = _config(tmp_path)
  dirs = encode.encode(config, progress=False)
  assert set(dirs) == {"train", "val", "test"}
  backbone = backbones.load_backbone(config.backbone)
  tail = feature_cache.load_tail_init(encode.tail_init_path(config, backbone))
  assert tail["word_embeddings"].shape == (30522, 32)
  np.testing.assert_array_equal(tail["image_proj.kernel"], backbone.image_proj["kernel"])
  summary = encode.describe(dirs)
  assert "image_pooled" in summary and str(dirs["test"]) in summary

  # Finished: found again from encode's note, without loading the backbone.
  assert encode.cached_dirs(config, ["train", "test"]) == {s: dirs[s] for s in ("train", "test")}
  config.backbone.max_text_len = 8  # another tokenisation: another cache, not built yet
  assert encode.cached_dirs(config, ["train"]) is None


def test_cached_dirs_falls_back_when_the_weight_files_change(tmp_path, tiny_backbone):
  import dataclasses  # pylint: disable=g-import-not-at-top
  config = _config(tmp_path)
  weights = tmp_path / "weights.bin"
  weights.write_bytes(b"v1")
  backbone = dataclasses.replace(tiny_backbone, weight_files=(str(weights),))
  out = encode.encode(config, splits=["val"], progress=False, backbone=backbone)
  assert encode.cached_dirs(config, ["val"]) == out
  assert encode.cached_dirs(config, ["val", "test"]) is None  # test was never encoded
  weights.write_bytes(b"v2, a new file of another size")
  assert encode.cached_dirs(config, ["val"]) is None


def test_sigkill_then_rerun_gives_identical_cache(tmp_path):
  """A real `python -m jsds_jax.encode` killed with SIGKILL mid-split, then run again."""
  import os  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  overrides = [f"--config.data.cache_dir={tmp_path / 'data'}", "--config.data.num_images=160",
               "--config.data.splits=('train',)", "--config.encode.chunk_size=8"]
  env = dict(os.environ, XLA_FLAGS=testing_utils.xla_flags(1))
  cmd = [sys.executable, "-m", "jsds_jax.encode", f"--config={_ROOT / 'configs' / 'tiny.py'}"]
  killed = tmp_path / "killed"
  proc = subprocess.Popen(cmd + overrides + [f"--config.encode.cache_root={killed}"], env=env,
                          cwd=_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while time.time() < deadline and not list(killed.rglob("image_pooled.part-00002.npy")):
    assert proc.poll() is None, "encode ended before it could be killed"
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  (split_dir,) = [p.parent for p in killed.rglob("image_pooled.part-00000.npy")]
  assert not feature_cache.is_complete(split_dir), "the kill came too late to test anything"

  def run_to_end(cache_root):
    done = subprocess.run(cmd + overrides + [f"--config.encode.cache_root={cache_root}"],
                          env=env, cwd=_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

  run_to_end(killed)
  whole = tmp_path / "whole"
  run_to_end(whole)
  (whole_dir,) = [p.parent for p in whole.rglob("meta.json")]
  a, _ = _arrays(split_dir)
  b, _ = _arrays(whole_dir)
  for name in b:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_dataset_key_tells_apart_a_train_split_without_restval(tmp_path):
  from jsds_jax import config_base  # pylint: disable=g-import-not-at-top
  data = config_base.base_config().data
  data.name, data.json = "karpathy", str(tmp_path / "dataset_coco.json")
  default = encode.dataset_key(data)
  assert default.startswith("karpathy-dataset_coco-") and len(default.split("-")[-1]) == 8
  data.train_splits = ("train", "restval")  # the default set, spelled out: the same cache
  assert encode.dataset_key(data) == default
  data.train_splits = ("train",)
  assert encode.dataset_key(data) == default + encode.TRAIN_ONLY_SUFFIX
  data.train_splits = ()
  data.include_restval = False
  assert encode.dataset_key(data) == default + encode.TRAIN_ONLY_SUFFIX
  tfds = config_base.base_config().data
  tfds.name = "coco_tfds"
  assert encode.dataset_key(tfds) == "coco_tfds"
  tfds.train_splits = ("train",)
  assert encode.dataset_key(tfds) == "coco_tfds" + encode.TRAIN_ONLY_SUFFIX
  demo = config_base.base_config().data  # no restval there: the name alone, whatever is set
  demo.train_splits = ("train",)
  assert encode.dataset_key(demo) == "demo"
