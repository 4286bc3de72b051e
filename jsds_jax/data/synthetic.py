"""A tiny generated Karpathy dataset: coloured shapes with captions that name them.

For tests and smoke runs that need real files on disk in the real format, with no download.
Each image is one filled shape (circle, square, triangle, ...) of one colour, at a random place
and size, on a plain background; its captions name the colour, the shape, its size and the
background ("a small red circle on a white background"), so the task is learnable: a
retrieval model can in principle match every caption to its image.

The same arguments always give the same files (PNG, so no encoder differences) and JSON.
"""

import os
import pathlib

import numpy as np
from PIL import Image
from PIL import ImageDraw

from jsds_jax import atomic
from jsds_jax.data.karpathy import make_record
from jsds_jax.data.karpathy import write_karpathy

JSON_NAME = "synthetic.json"
IMAGES_DIR = "images"
DATASET = "synthetic"

COLORS = {
    "red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220),
    "yellow": (240, 210, 20), "purple": (140, 40, 170), "orange": (250, 130, 0),
    "black": (10, 10, 10), "pink": (250, 120, 190),
}
BACKGROUNDS = {"white": (255, 255, 255), "gray": (150, 150, 150)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
_TEMPLATES = (
    "a {size} {color} {shape} on a {background} background",
    "a picture of a {color} {shape}",
    "one {color} {shape}, {size}, on {background}",
    "a {shape} colored {color}",
    "a {background} image with a {size} {color} {shape} in it",
)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
  if shape == "triangle":
    return [(cx, cy - r), (cx + r * 0.87, cy + r * 0.5), (cx - r * 0.87, cy + r * 0.5)]
  if shape == "diamond":
    return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
  w = r / 3  # cross: the outline of a plus sign with arms of width 2w
  return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
          (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
          (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]


def draw_shape(shape: str, color: str, background: str, size: str, image_size: int,
               rng: np.random.Generator) -> Image.Image:
  """One `image_size`² RGB picture of a filled shape; `size` is "small" or "large"."""
  image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[background])
  draw = ImageDraw.Draw(image)
  fraction = rng.uniform(0.12, 0.2) if size == "small" else rng.uniform(0.3, 0.42)
  r = fraction * image_size
  cx, cy = rng.uniform(r, image_size - r, size=2)
  fill = COLORS[color]
  if shape == "circle":
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
  elif shape == "square":
    s = r * 0.8
    draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
  else:
    draw.polygon(_polygon(shape, cx, cy, r), fill=fill)
  return image


def make_synthetic(root: str | os.PathLike, num_images: int = 40, captions_per_image: int = 2,
                   image_size: int = 64, seed: int = 0) -> pathlib.Path:
  """Writes the generated dataset under `root` and returns its Karpathy JSON.

  Args:
    root: output folder; receives `images/<split>/<n>.png` and `synthetic.json`.
    num_images: at least 3; a tenth (at least 1) go to "val" and to "test", the rest to "train".
    captions_per_image: 1 to 5, each from a different template.
    image_size: side of the square images in pixels.
    seed: everything (attributes, positions, split assignment) derives from it.

  Returns:
    The JSON path; load it with `load_karpathy(path, root / "images", split)`.
  """
  if num_images < 3:
    raise ValueError(f"num_images must be >= 3 so that every split has an image, got {num_images}")
  if not 1 <= captions_per_image <= len(_TEMPLATES):
    raise ValueError(f"captions_per_image must be in [1, {len(_TEMPLATES)}], "
                     f"got {captions_per_image}")
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  n_holdout = max(1, num_images // 10)
  splits = np.array(["train"] * (num_images - 2 * n_holdout) + ["val"] * n_holdout
                    + ["test"] * n_holdout)
  splits = splits[rng.permutation(num_images)]
  records = []
  for i in range(num_images):
    attributes = dict(
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=list(COLORS)[rng.integers(len(COLORS))],
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        size=("small", "large")[rng.integers(2)])
    image = draw_shape(image_size=image_size, rng=rng, **attributes)
    split = str(splits[i])
    filename = f"{i:05d}.png"
    out = root / IMAGES_DIR / split / filename
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(out) as tmp:
      image.save(tmp, format="PNG")
    templates = rng.permutation(len(_TEMPLATES))[:captions_per_image]
    captions = [_TEMPLATES[t].format(**attributes) for t in templates]
    records.append(make_record(filename, split, captions, imgid=i,
                               first_sentid=i * captions_per_image, filepath=split))
  return write_karpathy(root / JSON_NAME, records, dataset=DATASET)
