"""SVG -> RGB picture on white, with the `resvg-py` wheel (resvg, in Rust; no system library).

Pillow cannot rasterise SVG. `resvg-py` is one self-contained wheel (about 3 MB, manylinux and
macOS), so it installs without root where cairosvg would need libcairo and rsvg-convert a
Debian package; it is the `corpus` extra of setup.py. System fonts are not loaded: the icon and
emoji sets draw text as paths, and skipping the font scan saves ~0.1 s per call.
"""

import io

import numpy as np
from PIL import Image

from jsds_jax.data.split import BadItemError

INSTALL_HINT = "pip install 'jsds-jax[corpus]' (or: pip install resvg-py)"


class MissingRendererError(RuntimeError):
  """The SVG renderer is not installed; the message says how to install it."""


def _resvg():
  try:
    import resvg_py  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingRendererError(
        f"rendering SVG pictures needs the resvg-py package: {INSTALL_HINT}") from e
  return resvg_py


def render_svg(svg: str, size: int, name: str) -> np.ndarray:
  """Renders SVG markup to `(size, size, 3) uint8` RGB on white.

  The picture is scaled so that its longer side is `size` and centred on a white square, so
  strokes stay sharp (vector scaling, not resampling of a small raster).

  Args:
    svg: the SVG document's text.
    size: output side length in pixels.
    name: what to call the picture in error messages.

  Raises:
    BadItemError: the markup is not an SVG resvg can draw, or it draws nothing (zero size);
      the message names the picture.
    MissingRendererError: resvg-py is not installed.
  """
  resvg = _resvg()
  try:
    # resvg keeps the aspect ratio when given one side only: width first, and the height
    # instead for the (few) pictures taller than wide.
    options = dict(svg_string=svg, background=None, skip_system_fonts=True)
    png = resvg.svg_to_bytes(width=size, **options)
    with Image.open(io.BytesIO(png)) as image:
      image.load()
      rgba = image.convert("RGBA")
    if rgba.height > size:
      png = resvg.svg_to_bytes(height=size, **options)
      with Image.open(io.BytesIO(png)) as image:
        image.load()
        rgba = image.convert("RGBA")
    out_w, out_h = rgba.size
  except (ValueError, OSError, RuntimeError, SyntaxError) as e:
    raise BadItemError(f"cannot render SVG {name}: {type(e).__name__}: {e}") from e
  canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
  canvas.alpha_composite(rgba, ((size - out_w) // 2, (size - out_h) // 2))
  return np.asarray(canvas.convert("RGB"))
