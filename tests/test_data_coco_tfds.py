"""Tests for jsds_jax/data/coco_tfds.py on a real, tiny, locally prepared `coco_captions/2014`.

Why not `tfds.testing.mock_data`: for coco_captions it only works when no decoder is passed. With
any decoder (we pass `SkipDecoding` for the image) tfds encodes its random examples, and those are
invalid for this builder (the "captions" id and text lists get independent random lengths, the
boxes have min > max), so every read raises. Instead the fixture runs the real builder's
`download_and_prepare` on a fake COCO 2014 + Karpathy split download (seven 10 px images), which
writes real ArrayRecord files that `tfds.data_source` then reads exactly as it reads real COCO.
"""

import importlib.util
import json
import sys

import numpy as np
from PIL import Image
import pytest

# find_spec, not importorskip: importing TensorFlow eagerly would cost seconds at collection.
if importlib.util.find_spec("tensorflow") is None:
  pytest.skip("TensorFlow is not installed; the tfds path needs the extra: pip install -e .[tfds]",
              allow_module_level=True)
tfds = pytest.importorskip("tensorflow_datasets",
                           reason="the tfds path needs the extra: pip install -e .[tfds]")

# pylint: disable=g-import-not-at-top,wrong-import-position
from jsds_jax.data import coco_tfds
from jsds_jax.data import registry
from jsds_jax.data.split import BadItemError

# (coco id, COCO folder, Karpathy split, grey level of its image)
IMAGES = [(11, "train2014", "train", 20), (12, "train2014", "train", 40),
          (13, "train2014", "train", 60), (21, "val2014", "val", 80),
          (22, "val2014", "test", 100), (23, "val2014", "restval", 120),
          (24, "val2014", "test", 140)]
EMPTY_CAPTION_ID = 21  # its second caption is blank, to test skip_bad


def _captions(coco_id):
  second = "   " if coco_id == EMPTY_CAPTION_ID else f"caption 1 of {coco_id}."
  return [f"caption 0 of {coco_id}.", second]


def _fake_download(root):
  """Writes what the builder's download step would extract; returns {url key: folder}."""
  categories = [{"id": i + 1, "name": f"category{i}", "supercategory": "x"} for i in range(80)]
  karpathy, infos = [], {"train2014": [], "val2014": []}
  for n, (coco_id, folder, split, grey) in enumerate(IMAGES):
    filename = f"COCO_{folder}_{coco_id:012d}.jpg"
    (root / "zips" / folder).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8 + n, 10, 3), grey, np.uint8)).save(
        root / "zips" / folder / filename, quality=95)
    infos[folder].append({"id": coco_id, "file_name": filename, "height": 8 + n, "width": 10})
    karpathy.append({"filepath": folder, "filename": filename, "split": split, "imgid": n,
                     "cocoid": coco_id,
                     "sentences": [{"raw": text, "sentid": 10 * coco_id + s, "tokens": []}
                                   for s, text in enumerate(_captions(coco_id))]})
  (root / "annotations" / "annotations").mkdir(parents=True)
  for folder, info in infos.items():
    (root / "annotations" / "annotations" / f"instances_{folder}.json").write_text(
        json.dumps({"categories": categories, "images": info, "annotations": []}))
  (root / "karpathy").mkdir()
  (root / "karpathy" / "dataset_coco.json").write_text(json.dumps({"images": karpathy}))
  folders = {"train_images": "zips", "validation_images": "zips", "test_images": "zips",
             "test2015_images": "zips", "train_annotations": "annotations",
             "validation_annotations": "annotations", "test_annotations": "annotations",
             "test2015_annotations": "annotations", "karpathy_and_li_splits": "karpathy"}
  return {key: str(root / folder) for key, folder in folders.items()}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  if importlib.util.find_spec("importlib_resources") is None:
    pytest.fail("tensorflow-datasets 4.9.10 needs the importlib_resources package to prepare any "
                "dataset (dataset_builder.code_path imports it even on Python >= 3.9); the tfds "
                "extra must install it")
  root = tmp_path_factory.mktemp("coco_raw")
  extracted = _fake_download(root)
  data_dir = tmp_path_factory.mktemp("tfds")
  builder = tfds.builder(coco_tfds.DATASET, data_dir=str(data_dir), file_format="array_record")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tfds.download.DownloadManager, "download_and_extract",
                  lambda self, urls: {key: extracted[key] for key in urls})
    builder.download_and_prepare()
  return str(data_dir)


def _by_id(split):
  out = {}
  for c, caption in enumerate(split.captions):
    out.setdefault(split.image_ids[split.caption_image_index[c]], []).append(caption)
  return out


def test_test_split_ids_captions_and_images(data_dir):
  split = coco_tfds.load_coco_tfds("test", data_dir=data_dir)
  assert split.dataset == "coco" and split.split == "test"
  assert sorted(split.image_ids) == ["22", "24"]
  assert _by_id(split) == {"22": _captions(22), "24": _captions(24)}
  assert split.caption_image_index.dtype == np.int64
  greys = {coco_id: grey for coco_id, _, _, grey in IMAGES}
  for i, image_id in enumerate(split.image_ids):
    assert split.image_sources[i] == f"tfds:{image_id}"
    image = split.load_image(i)
    assert image.dtype == np.uint8 and image.shape[1:] == (10, 3)
    assert np.abs(image.astype(int) - greys[int(image_id)]).max() <= 3


def test_train_is_train_plus_restval_unless_karpathy_is_false(data_dir):
  assert sorted(coco_tfds.load_coco_tfds("train", data_dir=data_dir).image_ids) == [
      "11", "12", "13", "23"]
  assert sorted(coco_tfds.load_coco_tfds("train", data_dir=data_dir, karpathy=False).image_ids
                ) == ["11", "12", "13"]
  assert coco_tfds.load_coco_tfds("restval", data_dir=data_dir).image_ids == ["23"]


def test_empty_caption_raises_or_is_skipped(data_dir):
  with pytest.raises(BadItemError, match=r"record 0 \(image id 21\) has an empty caption"):
    coco_tfds.load_coco_tfds("val", data_dir=data_dir)
  split = coco_tfds.load_coco_tfds("val", data_dir=data_dir, skip_bad=True)
  assert list(split.captions) == ["caption 0 of 21."] and split.image_ids == ["21"]
  assert split.load_image(0).shape == (11, 10, 3)


def test_registry_dispatch(data_dir):
  split = registry.load_split({"name": "coco_tfds", "data_dir": data_dir}, "test")
  assert sorted(split.image_ids) == ["22", "24"]


def test_unprepared_data_dir_and_bad_split_are_explained(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build coco_captions"):
    coco_tfds.load_coco_tfds("test", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="'testing'"):
    coco_tfds.load_coco_tfds("testing", data_dir=str(tmp_path))


def test_missing_tensorflow_gives_install_hint(monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "tensorflow" else find_spec(name, *a))
  with pytest.raises(ImportError, match=r'pip install -e "\.\[tfds\]" \(TensorFlow is not'):
    coco_tfds.load_coco_tfds("test")
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
  with pytest.raises(ImportError, match=r'pip install -e "\.\[tfds\]"'):
    coco_tfds.load_coco_tfds("test")
