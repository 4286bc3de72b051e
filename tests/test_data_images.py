"""Tests for jsds_jax/data/images.py: reading, compositing, resizing, normalising."""

import numpy as np
from PIL import Image
import pytest

from jsds_jax.data import images
from jsds_jax.data.split import BadItemError


def _save(array_or_image, path, **kwargs):
  image = (array_or_image if isinstance(array_or_image, Image.Image)
           else Image.fromarray(array_or_image))
  image.save(path, **kwargs)
  return path


def test_rgba_is_composited_on_white(tmp_path):
  rgba = np.zeros((4, 6, 4), np.uint8)
  rgba[0, 0] = (200, 10, 20, 255)   # opaque: kept
  rgba[0, 1] = (200, 10, 20, 0)     # fully transparent: white, whatever the colour
  rgba[0, 2] = (0, 0, 0, 128)       # half transparent black on white: mid grey
  out = images.read_image(_save(rgba, tmp_path / "a.png"))
  assert out.shape == (4, 6, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0, 0], (200, 10, 20))
  np.testing.assert_array_equal(out[0, 1], (255, 255, 255))
  np.testing.assert_allclose(out[0, 2], (127, 127, 127), atol=1)
  np.testing.assert_array_equal(out[3, 5], (255, 255, 255))


def test_la_and_palette_transparency_and_grayscale(tmp_path):
  la = np.zeros((3, 3, 2), np.uint8)
  la[..., 0] = 40
  la[1, 1, 1] = 255
  out = images.read_image(_save(Image.fromarray(la), tmp_path / "la.png"))
  np.testing.assert_array_equal(out[1, 1], (40, 40, 40))
  np.testing.assert_array_equal(out[0, 0], (255, 255, 255))

  palette = Image.new("P", (2, 1))
  palette.putpalette([0, 0, 255, 255, 0, 0] + [0] * (256 * 3 - 6))
  palette.putpixel((0, 0), 0)
  palette.putpixel((1, 0), 1)
  palette.save(tmp_path / "p.png", transparency=0)  # index 0 (blue) is transparent
  out = images.read_image(tmp_path / "p.png")
  np.testing.assert_array_equal(out[0], [(255, 255, 255), (255, 0, 0)])

  gray = images.read_image(_save(np.full((2, 5), 77, np.uint8), tmp_path / "g.jpg"))
  assert gray.shape == (2, 5, 3)
  assert np.all(np.abs(gray.astype(int) - 77) <= 1)

  sixteen = Image.fromarray(np.full((2, 2), 65535, np.uint16))
  out = images.read_image(_save(sixteen, tmp_path / "16.png"))
  np.testing.assert_array_equal(out, np.full((2, 2, 3), 255))


def test_bad_files_raise_bad_item_error_naming_the_file(tmp_path):
  with pytest.raises(BadItemError, match="nothere.jpg"):
    images.read_image(tmp_path / "nothere.jpg")
  (tmp_path / "garbage.jpg").write_bytes(b"this is not an image at all")
  with pytest.raises(BadItemError, match="garbage.jpg"):
    images.read_image(tmp_path / "garbage.jpg")
  rng = np.random.default_rng(0)
  _save(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), tmp_path / "full.jpg", quality=95)
  data = (tmp_path / "full.jpg").read_bytes()
  (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
  with pytest.raises(BadItemError, match="cut.jpg.*truncated"):
    images.read_image(tmp_path / "cut.jpg")
  with pytest.raises(BadItemError, match="tfds:7"):
    images.decode_image(b"\x89PNG broken", "tfds:7")


def test_preprocess_normalises_in_unit_range():
  mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
  batch = np.stack([np.full((10, 30, 3), 255, np.uint8), np.zeros((10, 30, 3), np.uint8)])
  out = images.preprocess(batch, 8, mean, std)
  assert out.shape == (2, 8, 8, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out[0], np.broadcast_to([1.0, 3.0, 1.0], (8, 8, 3)), atol=1e-6)
  np.testing.assert_allclose(out[1], np.broadcast_to([-1.0, -1.0, 0.0], (8, 8, 3)), atol=1e-6)


def _three_stripes(height, width):
  """Left third red, middle third green, right third blue."""
  image = np.zeros((height, width, 3), np.uint8)
  third = width // 3
  image[:, :third, 0] = 255
  image[:, third:2 * third, 1] = 255
  image[:, 2 * third:, 2] = 255
  return image


def test_shorter_crop_keeps_the_centre_and_squash_keeps_everything():
  wide = _three_stripes(30, 90)  # the centre square is exactly the green stripe
  tall = np.transpose(_three_stripes(30, 90), (1, 0, 2)).copy()
  crop = images.preprocess([wide, tall], 12, (0, 0, 0), (1, 1, 1), resize="shorter_crop")
  assert crop.shape == (2, 12, 12, 3)
  # Bicubic overshoot aside, only green survives the centre crop.
  assert crop[0, :, 2:-2, 1].min() > 0.95 and crop[0, :, 2:-2, [0, 2]].max() < 0.05
  assert crop[1, 2:-2, :, 1].min() > 0.95
  squash = images.preprocess([wide], 12, (0, 0, 0), (1, 1, 1), resize="squash")
  assert squash[0, :, 0, 0].min() > 0.95 and squash[0, :, -1, 2].min() > 0.95


def test_shorter_crop_output_size_for_odd_shapes():
  for shape in [(7, 13, 3), (13, 7, 3), (5, 5, 3), (300, 17, 3)]:
    out = images.resize_image(np.zeros(shape, np.uint8), 9, "shorter_crop")
    assert out.shape == (9, 9, 3)
  with pytest.raises(ValueError, match="resize"):
    images.resize_image(np.zeros((4, 4, 3), np.uint8), 2, "stretch")
  with pytest.raises(ValueError, match="uint8"):
    images.resize_image(np.zeros((4, 4, 3), np.float32), 2)


def test_pad_keeps_the_whole_picture_on_white():
  image = np.zeros((10, 20, 3), np.uint8)
  image[..., 0] = 200
  out = images.resize_image(image, 16, resize="pad")
  assert out.shape == (16, 16, 3)
  np.testing.assert_array_equal(out[0], 255)       # padding rows above
  np.testing.assert_array_equal(out[-1], 255)      # and below
  np.testing.assert_array_equal(out[8, :, 0], 200)  # full width kept
