"""Tests for jsds_jax/data/registry.py (the demo and coco_tfds cases live in their own files)."""

import ml_collections
import pytest

from jsds_jax.data import registry
from jsds_jax.data import synthetic


def test_synthetic_from_a_locked_config_dict_is_made_once(tmp_path):
  config = ml_collections.ConfigDict(
      {"name": "synthetic", "cache_dir": str(tmp_path), "num_images": 10,
       "captions_per_image": 2, "image_size": 16, "seed": 3})
  config.lock()
  splits = {s: registry.load_split(config, s) for s in ("train", "val", "test")}
  assert [splits[s].num_images for s in ("train", "val", "test")] == [8, 1, 1]
  assert splits["test"].dataset == "synthetic" and splits["test"].num_captions == 2
  json_path = registry.synthetic_json(config)
  assert json_path.parent.name == "n10_c2_s16_seed3"
  mtime = json_path.stat().st_mtime_ns
  registry.load_split(config, "val")
  assert json_path.stat().st_mtime_ns == mtime  # not regenerated


def test_karpathy_from_a_dict(tmp_path):
  json_path = synthetic.make_synthetic(tmp_path, num_images=10)
  split = registry.load_split({"name": "karpathy", "json": str(json_path),
                               "image_root": str(tmp_path / "images"), "dataset": "mine"},
                              "train")
  assert split.dataset == "mine" and split.num_images == 8
  assert split.load_image(0).shape == (64, 64, 3)


def test_unknown_name_and_missing_fields_are_explained(tmp_path):
  with pytest.raises(ValueError, match="unknown data source name='cifar'.*karpathy, coco_tfds, "
                                       "demo, corpus, synthetic"):
    registry.load_split({"name": "cifar"}, "train")
  with pytest.raises(ValueError, match="name='karpathy' needs the field 'image_root'"):
    registry.load_split({"name": "karpathy", "json": str(tmp_path / "x.json")}, "train")
  with pytest.raises(ValueError, match="needs the field 'name'"):
    registry.load_split({}, "train")


def test_train_splits_decide_restval(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  json_path = synthetic.make_synthetic(tmp_path, num_images=10)
  data = json.loads(json_path.read_text())
  for img in data["images"][:3]:  # three training images become restval
    if img["split"] == "train":
      img["split"] = "restval"
  data["dataset"] = "coco"
  json_path.write_text(json.dumps(data))
  base = {"name": "karpathy", "json": str(json_path), "image_root": str(tmp_path / "images")}
  n = lambda **kw: registry.load_split({**base, **kw}, "train").num_images
  restval = sum(img["split"] == "restval" for img in data["images"])
  assert restval > 0
  assert n() == n(train_splits=("train", "restval")) == 8  # a COCO file takes restval
  assert n(train_splits=("train",)) == n(include_restval=False) == 8 - restval
  # train_splits wins over include_restval when both are given.
  assert n(include_restval=False, train_splits=("train", "restval")) == 8
  with pytest.raises(ValueError, match=r"data.train_splits=\('val',\)"):
    n(train_splits=("val",))
