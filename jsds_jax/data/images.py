"""Reading images into RGB uint8 arrays and turning them into normalised model inputs.

numpy and Pillow only: this runs in data-loading code on hosts, where nothing should need JAX or
TensorFlow. Transparent pictures (the demo stamps are RGBA / LA / palette-with-transparency) are
composited on white, because a tower's RGB input has no alpha and black would turn every
transparent background into a dark one the model never saw in training.
"""

from collections.abc import Sequence
import io
import os

import numpy as np
from PIL import Image

from jsds_jax.data.split import BadItemError

WHITE = (255, 255, 255)
RESIZE_MODES = ("squash", "shorter_crop", "pad")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
  """Returns `image` as an 8-bit RGB Pillow image, transparency composited on `background`.

  Handles RGBA, LA, PA, palette and RGB images with a transparency key, grayscale (L, 1, I;16,
  I, F) and CMYK.
  """
  if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
    # Pillow's convert("L") clips 16/32-bit values instead of rescaling them.
    array = np.asarray(image, dtype=np.float64)
    peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
    gray = np.clip(np.round(array / peak * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
  has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
  if not has_alpha:
    return image.convert("RGB")
  rgba = image.convert("RGBA")
  canvas = Image.new("RGBA", rgba.size, background + (255,))
  return Image.alpha_composite(canvas, rgba).convert("RGB")


def decode_image(data: bytes, name: str) -> np.ndarray:
  """Decodes encoded image bytes (JPEG, PNG, ...) to `(H, W, 3) uint8` RGB.

  Args:
    data: the encoded file contents.
    name: what to call the image in error messages (a path, "tfds:<id>").

  Raises:
    BadItemError: the bytes are not a readable image (corrupt, truncated, unknown format).
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # Pillow is lazy: truncation only shows when the pixels are read.
      return np.asarray(to_rgb(image), dtype=np.uint8)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadItemError(f"cannot read image {name}: {type(e).__name__}: {e}") from e


def read_image(path: str | os.PathLike) -> np.ndarray:
  """Reads an image file as `(H, W, 3) uint8` RGB, transparency composited on white.

  Raises:
    BadItemError: the file does not exist, or is corrupt, truncated or not an image; the
      message names the file.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError as e:
    raise BadItemError(f"image file not found: {os.fspath(path)}") from e
  except OSError as e:
    raise BadItemError(f"cannot read image {os.fspath(path)}: {e}") from e
  return decode_image(data, os.fspath(path))


def resize_image(image: np.ndarray, size: int, resize: str = "squash") -> np.ndarray:
  """Resizes one `(H, W, 3) uint8` image to `(size, size, 3) uint8` with Pillow bicubic.

  Args:
    image: `(H, W, 3) uint8`.
    size: output side length.
    resize: "squash" resizes both sides to `size` ignoring aspect ratio (what BLIP/ALBEF eval
      transforms do); "shorter_crop" resizes the shorter side to `size` and takes the centre
      square (the CLIP / timm eval transform); "pad" resizes the longer side to `size` and
      centres the picture on a white square (for cut-out pictures such as the demo's stamps,
      whose edges a crop would lose).
  """
  if resize not in RESIZE_MODES:
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
  pil = Image.fromarray(image)
  height, width = image.shape[:2]
  if resize == "squash":
    if (height, width) != (size, size):
      pil = pil.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(pil)
  if resize == "pad":
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    if (new_h, new_w) != (height, width):
      pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(pil, ((size - new_w) // 2, (size - new_h) // 2))
    return np.asarray(canvas)
  scale = size / min(height, width)
  new_w = max(size, round(width * scale))
  new_h = max(size, round(height * scale))
  if (new_h, new_w) != (height, width):
    pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
  left = (new_w - size) // 2
  top = (new_h - size) // 2
  return np.asarray(pil.crop((left, top, left + size, top + size)))


def preprocess(images_uint8: np.ndarray | Sequence[np.ndarray], size: int,
               mean: Sequence[float], std: Sequence[float],
               resize: str = "squash") -> np.ndarray:
  """Resizes and normalises a batch of images for an image tower.

  Args:
    images_uint8: `(B, H, W, 3) uint8`, or a sequence of B `(H_b, W_b, 3) uint8` arrays of
      different sizes.
    size: output side length.
    mean: per-channel mean in 0-1 units, e.g. (0.48145466, 0.4578275, 0.40821073).
    std: per-channel standard deviation in 0-1 units.
    resize: "squash" or "shorter_crop", see `resize_image`.

  Returns:
    `(B, size, size, 3) float32`: (pixel / 255 - mean) / std.
  """
  mean = np.asarray(mean, dtype=np.float32).reshape(3)
  std = np.asarray(std, dtype=np.float32).reshape(3)
  out = np.empty((len(images_uint8), size, size, 3), dtype=np.float32)
  for b, image in enumerate(images_uint8):
    resized = resize_image(np.asarray(image), size, resize)
    out[b] = (resized.astype(np.float32) / 255.0 - mean) / std
  return out
