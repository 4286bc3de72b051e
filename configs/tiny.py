"""Tests: a tiny random backbone on generated data; every stage runs in seconds on a CPU.

  python -m jsds_jax.encode --config configs/tiny.py --config.encode.cache_root=/tmp/c
  python -m jsds_jax.train --config configs/tiny.py --config.encode.cache_root=/tmp/c \
      --workdir /tmp/tiny_run
"""

from jsds_jax import config_base


def get_config(arg=None):
  """Args: arg: none taken (`config_base.parse_arg` refuses any)."""
  config_base.parse_arg(arg)
  c = config_base.base_config()
  c.backbone.name = "tiny"
  c.backbone.max_text_len = 16
  c.data.name = "synthetic"
  c.data.cache_dir = "/tmp/jsds_jax_tiny_data"
  c.encode.batch_size = 8
  c.encode.chunk_size = 16
  c.encode.num_workers = 2
  # 32 training images: 4 steps of 8 per epoch; the tail is 16-d (the tiny projections).
  c.train.batch_size = 8
  c.train.num_epochs = 3
  c.train.log_every = 2
  c.train.eval_every_epochs = 1
  c.train.checkpoint_every = 4
  c.train.keep_checkpoints = 2
  c.train.progress = False
  return c
