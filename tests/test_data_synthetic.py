"""Tests for jsds_jax/data/synthetic.py: determinism, splits, captions that match the pictures."""

import numpy as np
import pytest

from jsds_jax.data import karpathy
from jsds_jax.data import synthetic


def _files(root):
  return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_arguments_same_bytes_and_seed_matters(tmp_path):
  a = synthetic.make_synthetic(tmp_path / "a", num_images=12, captions_per_image=3, seed=5)
  b = synthetic.make_synthetic(tmp_path / "b", num_images=12, captions_per_image=3, seed=5)
  c = synthetic.make_synthetic(tmp_path / "c", num_images=12, captions_per_image=3, seed=6)
  assert _files(a.parent) == _files(b.parent)
  assert a.read_bytes() != c.read_bytes()
  assert not [name for name in _files(a.parent) if ".tmp-" in name]


def test_splits_captions_and_pictures_agree(tmp_path):
  json_path = synthetic.make_synthetic(tmp_path, num_images=30, captions_per_image=2,
                                       image_size=32, seed=0)
  image_root = tmp_path / synthetic.IMAGES_DIR
  sizes = {}
  for split_name in ("train", "val", "test"):
    split = karpathy.load_karpathy(json_path, image_root, split_name)
    sizes[split_name] = split.num_images
    assert split.dataset == "synthetic"
    assert split.num_captions == 2 * split.num_images
    for c, caption in enumerate(split.captions):
      image = split.load_image(int(split.caption_image_index[c]))
      assert image.shape == (32, 32, 3)
      colors = [name for name in synthetic.COLORS if f" {name} " in f" {caption} "]
      shapes = [name for name in synthetic.SHAPES if name in caption]
      assert len(colors) == 1 and len(shapes) == 1, caption
      # The named colour is drawn (PNG is lossless, so exactly), and no other shape colour is.
      drawn = [name for name, rgb in synthetic.COLORS.items()
               if np.all(image == np.array(rgb, np.uint8), axis=-1).sum() > 3]
      assert drawn == colors, (caption, drawn)
      background = [name for name in synthetic.BACKGROUNDS if name in caption]
      if background:
        np.testing.assert_array_equal(image[0, 0], synthetic.BACKGROUNDS[background[0]])
  assert sizes == {"train": 24, "val": 3, "test": 3}


def test_the_smallest_dataset_has_every_split(tmp_path):
  json_path = synthetic.make_synthetic(tmp_path, num_images=3, captions_per_image=1)
  for split_name in ("train", "val", "test"):
    assert karpathy.load_karpathy(json_path, tmp_path / "images", split_name).num_images == 1
  with pytest.raises(ValueError, match="num_images"):
    synthetic.make_synthetic(tmp_path, num_images=2)
  with pytest.raises(ValueError, match="captions_per_image"):
    synthetic.make_synthetic(tmp_path, captions_per_image=9)
