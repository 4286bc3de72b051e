"""Tests: a tiny random backbone on generated data; every stage runs in seconds on a CPU.

  python -m jsds_jax.encode --config configs/tiny.py --config.encode.cache_root=/tmp/c
"""

from jsds_jax import config_base


def get_config(arg=None):
  del arg
  c = config_base.base_config()
  c.backbone.name = "tiny"
  c.backbone.max_text_len = 16
  c.data.name = "synthetic"
  c.data.cache_dir = "/tmp/jsds_jax_tiny_data"
  c.encode.batch_size = 8
  c.encode.chunk_size = 16
  c.encode.num_workers = 2
  return c
