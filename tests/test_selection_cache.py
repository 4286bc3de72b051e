"""A corpus selection's feature cache gathered from the whole corpus's (feature_cache.gather_rows,
feature_cache.write_gathered, and the path through `encode.encode`)."""

import json
import logging

import ml_dtypes
import numpy as np
import pytest

from jsds_jax import atomic
from jsds_jax import encode
from jsds_jax.data import corpus
from jsds_jax.data import feature_cache
from jsds_jax.data import registry
from jsds_jax.models.trunk import backbones
import testing_utils  # tests/testing_utils.py
from test_data_corpus import _fake_demo  # pylint: disable=g-bad-import-order
from test_data_corpus import _place_packages


def _items(image_ids, captions):
  """items + caption_image_index from [(image id, caption), ...]."""
  return {"image_ids": list(image_ids), "image_sources": [f"/img/{i}.png" for i in image_ids],
          "captions": [c for _, c in captions],
          "caption_image_index": [list(image_ids).index(i) for i, _ in captions]}


# Two donor splits; "b/1" is captioned "same" twice (the k-th maps to the k-th).
_DONORS = [
    _items(["a/0", "a/1", "b/0"], [("a/0", "zero"), ("a/1", "one"), ("a/0", "nil"),
                                   ("b/0", "bee")]),
    _items(["b/1", "c/0"], [("b/1", "same"), ("c/0", "sea"), ("b/1", "same")]),
]


def test_gather_rows_finds_every_item_in_the_donors():
  want = _items(["b/1", "a/0", "c/0"], [("c/0", "sea"), ("a/0", "nil"), ("b/1", "same"),
                                        ("a/0", "zero"), ("b/1", "same")])
  image_rows, caption_rows = feature_cache.gather_rows(want, _DONORS)
  assert image_rows.tolist() == [[1, 0], [0, 0], [1, 1]]
  assert caption_rows.tolist() == [[1, 1], [0, 2], [1, 0], [0, 0], [1, 2]]
  assert image_rows.dtype == caption_rows.dtype == np.int64


def test_gather_rows_names_what_is_missing():
  # An unknown image, a known image's unknown caption, and a third "same" of b/1.
  want = _items(["a/0", "z/9", "b/1"], [("a/0", "zero"), ("z/9", "zed"), ("a/0", "other"),
                                        ("b/1", "same"), ("b/1", "same"), ("b/1", "same")])
  with pytest.raises(feature_cache.MissingRowsError,
                     match=r"1 of 3 images and 3 of 6 captions are in no donor cache; "
                     r"images 'z/9'; captions .*\('z/9', 'zed', 0\), \('a/0', 'other', 0\), "
                     r"\('b/1', 'same', 2\)"):
    feature_cache.gather_rows(want, _DONORS)
  # The same caption text under another image is another caption.
  with pytest.raises(feature_cache.MissingRowsError, match="0 of 1 images and 1 of 1"):
    feature_cache.gather_rows(_items(["a/1"], [("a/1", "zero")]), _DONORS)


def _write_donor(directory, items, rng):
  """A finished cache written with feature_cache's writers: pooled rows, bf16 token states,
  token ids."""
  n_img, n_cap = len(items["image_ids"]), len(items["captions"])
  arrays = {"image_pooled": rng.normal(size=(n_img, 5)).astype(np.float32),
            "image_last_block_input": rng.normal(size=(n_img, 3, 4)).astype(ml_dtypes.bfloat16),
            "text_pooled": rng.normal(size=(n_cap, 6)).astype(np.float32),
            feature_cache.TOKEN_IDS: rng.integers(-1, 100, size=(n_cap, 7)).astype(np.int32),
            "caption_image_index": np.asarray(items["caption_image_index"], np.int64)}
  directory.mkdir(parents=True)
  for name, arr in arrays.items():
    feature_cache.atomic_save_npy(directory / f"{name}.npy", arr)
  feature_cache.atomic_write_json(directory / feature_cache.ITEMS, {
      k: items[k] for k in ("image_ids", "image_sources", "captions")})
  feature_cache.atomic_write_json(directory / feature_cache.META, {"arrays": {
      name: {"shape": list(arr.shape),
             "dtype": "bfloat16" if arr.dtype == ml_dtypes.bfloat16 else str(arr.dtype)}
      for name, arr in arrays.items()}})
  return arrays


_NAMES = ["image_pooled", "image_last_block_input", "text_pooled", feature_cache.TOKEN_IDS]


def test_write_gathered_takes_the_donors_rows(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  dirs = [tmp_path / "corpus" / s for s in ("val", "test")]
  donor_arrays = [_write_donor(d, items, rng) for d, items in zip(dirs, _DONORS)]
  want = _items(["b/1", "a/0", "c/0"], [("c/0", "sea"), ("a/0", "nil"), ("b/1", "same"),
                                        ("a/0", "zero"), ("b/1", "same")])
  image_rows, caption_rows = feature_cache.gather_rows(want, _DONORS)
  written = []
  replacing = atomic.replacing
  monkeypatch.setattr(atomic, "replacing", lambda path: (written.append(path.name),
                                                         replacing(path))[1])
  out = tmp_path / "selection" / "test"
  meta = feature_cache.write_gathered(out, dirs, _NAMES, image_rows, caption_rows, want,
                                      {"split": "test", "derived_from": "corpus/val+test"})
  assert written[-1] == feature_cache.META and written.count(feature_cache.META) == 1
  got = feature_cache.load_split(out, mmap=False)
  assert got["meta"] == meta and meta["derived_from"] == "corpus/val+test"
  for name in _NAMES:
    rows = image_rows if name.startswith("image") else caption_rows
    expected = np.stack([donor_arrays[d][name][r] for d, r in rows])
    assert got[name].dtype == expected.dtype, name
    np.testing.assert_array_equal(got[name], expected, err_msg=name)
  assert got["items"] == {k: want[k] for k in ("image_ids", "image_sources", "captions")}
  np.testing.assert_array_equal(got["caption_image_index"], want["caption_image_index"])
  # Every caption points at its own image in the new order: its text is the donor's.
  for c, i in enumerate(got["caption_image_index"]):
    d, r = caption_rows[c]
    donor = _DONORS[d]
    assert donor["image_ids"][donor["caption_image_index"][r]] == got["items"]["image_ids"][i]
    assert donor["captions"][r] == got["items"]["captions"][c]
  assert meta["arrays"]["image_last_block_input"] == {"shape": [3, 3, 4], "dtype": "bfloat16"}
  # A donor without one of the arrays: an error naming it, and no meta.json (not finished).
  (dirs[1] / "text_pooled.npy").unlink()
  meta_1 = json.loads((dirs[1] / feature_cache.META).read_text())
  del meta_1["arrays"]["text_pooled"]
  feature_cache.atomic_write_json(dirs[1] / feature_cache.META, meta_1)
  with pytest.raises(feature_cache.CacheError, match="test' has no text_pooled array"):
    feature_cache.write_gathered(tmp_path / "broken", dirs, _NAMES, image_rows, caption_rows,
                                 want, {})
  assert not feature_cache.is_complete(tmp_path / "broken")


# ----------------------------------------------------------------------------------------------
# Through `encode.encode`: the tiny backbone on the fixture corpus of test_data_corpus.


@pytest.fixture
def corpus_config(tmp_path):
  cache = tmp_path / "data"
  _place_packages(cache / "corpus" / "download")
  _fake_demo(cache)
  corpus.build_corpus(cache / "corpus", tuxpaint_cache=cache, image_size=32, verbose=False)
  config = testing_utils.load_config("tiny")
  config.data.name = "corpus"
  config.data.cache_dir = str(cache)
  config.encode.cache_root = str(tmp_path / "features")
  return config


def _no_backbone_run(*args, **kwargs):
  raise AssertionError("the backbone ran")


def test_encode_gathers_a_selection_from_the_whole_corpus(corpus_config, tmp_path, monkeypatch,
                                                          caplog):
  caplog.set_level(logging.INFO)
  full = encode.encode(corpus_config, progress=False)
  config = corpus_config
  config.data.sources = ",".join(s for s in corpus.ALL_SOURCES if s != "mdi")
  config.data.test_sources = "mdi"
  splits = ["train", "test"]  # the fixture's five other sources have no val picture
  with monkeypatch.context() as m:
    m.setattr(encode, "_make_tower_fn", _no_backbone_run)
    dirs = encode.encode(config, splits=splits, progress=False)
  name = encode.dataset_key(config.data)
  assert f"test split of {name}: " in caplog.text and "taken from the cache of corpus/" in (
      caplog.text)
  backbone = backbones.load_backbone(config.backbone)
  derived = {}
  for split_name in splits:
    split = registry.load_split(config.data, split_name)
    gathered = feature_cache.load_split(dirs[split_name], mmap=False)
    assert dirs[split_name].parent == full[split_name].parent.parent / name
    derived[split_name] = gathered["meta"]["derived_from"]
    assert gathered["meta"]["dataset"] == name and gathered["meta"]["split"] == split_name
    # What the backbone gives for the selection's split, encoded directly.
    encode.encode_split(split, backbone, tmp_path / "direct" / split_name,
                        encode.EncodeSettings.from_config(config), progress=False)
    direct = feature_cache.load_split(tmp_path / "direct" / split_name, mmap=False)
    assert gathered["items"] == direct["items"]
    assert gathered["meta"]["arrays"] == direct["meta"]["arrays"]
    for array in direct["meta"]["arrays"]:
      np.testing.assert_allclose(gathered[array], direct[array], atol=1e-5, err_msg=array)
    want = {k: direct["meta"][k] for k in direct["meta"] if k != "encode_seconds"}
    assert {k: gathered["meta"][k] for k in want} == want
  assert derived == {"train": "corpus/train",
                     "test": "corpus/val+test"}  # mdi's val pictures joined its test split

  # The whole corpus's test split unfinished: the selection's test split (mdi's val + test
  # pictures) is encoded with the backbone, and one line says why.
  caplog.clear()
  (full["test"] / feature_cache.META).unlink()
  config.data.max_test_images = 2  # another selection: not cached yet
  dirs = encode.encode(config, splits=["test"], progress=False)
  meta = feature_cache.load_split(dirs["test"])["meta"]
  assert "derived_from" not in meta and meta["num_images"] == 2
  assert "encoding it with the backbone" in caplog.text and "are in no donor cache" in (
      caplog.text)


def test_the_whole_corpus_and_other_datasets_are_encoded_as_before(corpus_config):
  assert encode._full_corpus(corpus_config.data) is None  # pylint: disable=protected-access
  corpus_config.data.test_sources = "mdi"
  full = encode._full_corpus(corpus_config.data)  # pylint: disable=protected-access
  assert encode.dataset_key(full) == "corpus"
  tiny = testing_utils.load_config("tiny")
  assert encode._full_corpus(tiny.data) is None  # pylint: disable=protected-access
