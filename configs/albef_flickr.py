"""The paper's `albef_flickr` run: ALBEF ViT-B (LAVIS Flickr30k retrieval weights) on Flickr30k.

  python -m jsds_jax.main --config configs/albef_flickr.py --workdir runs/albef_flickr \
      --config.backbone.checkpoint=/ckpt/albef_flickr_retrieval \
      --config.data.json=/data/flickr30k/dataset_flickr30k.json \
      --config.data.image_root=/data/flickr30k/flickr30k-images
  python -m jsds_jax.main --config configs/albef_flickr.py:runlocal ...   # a smoke test

The ALBEF checkpoint is a local folder (jsds_jax/models/albef.py): LAVIS's `albef_retrieval`
weights for model_type "flickr" (the `.pth` LAVIS downloads for it), with ALBEF's
`config_bert.json` and the bert-base-uncased tokenizer files beside it; pass its path.

Hyperparameters: DESIGN.md §3's table row `albef_flickr` (= holi-lab/mm-sparse-retrieval
`training_config/albef-flickr.json`): lr 1e-5, w1 0.1, w2 0.2, λ1 0.3, λ2 0.3,
η_text 1e-4, η_image 2e-5. The rest, and why: configs/blip_coco.py (the lr column is the
official single AdamW group's, so both of our groups get it with weight decay 0.05;
`num_epochs` is 200 · captions per image; validation every 5 epochs, patience 20).
"""

from jsds_jax import config_base

OFFICIAL_EPOCHS = 200
CAPTIONS_PER_IMAGE = 5  # Flickr30k Karpathy train: 145,000 captions / 29,000 images
PATIENCE = 20           # validations (official epochs) without a better sparse R@1


def get_config(arg=None):
  """Args: arg: "" / None (the paper run) or "runlocal" (tiny batch, one epoch)."""
  runlocal = _parse_arg(arg)
  c = config_base.base_config()
  c.backbone.name = "albef"
  c.backbone.checkpoint = ""    # required: a local folder, see the docstring
  c.backbone.max_text_len = 30  # ALBEF retrieval's text length
  c.data.name = "karpathy"
  c.encode.batch_size = 256

  c.train.mode = "jsds"
  c.train.batch_size = 256
  c.train.num_epochs = OFFICIAL_EPOCHS * CAPTIONS_PER_IMAGE
  c.train.warmup_fraction = 0.2
  c.train.clip_norm = 1.0
  c.train.b1, c.train.b2, c.train.eps = 0.9, 0.999, 1e-8
  for group in (c.train.embed, c.train.head):  # one official group: see the docstring
    group.lr = 1e-5
    group.weight_decay = 0.05
  c.train.loss.update(w1=0.1, w2=0.2, lam1=0.3, lam2=0.3, eta_text=1e-4, eta_image=2e-5,
                      regularizer="l1", reg_warmup_fraction=0.2)
  # Validate once per official epoch's worth of steps, so patience counts the same rounds.
  c.train.eval_every_epochs = CAPTIONS_PER_IMAGE
  c.train.patience = PATIENCE
  c.model.use_vocab_bias = False  # the official vocab projector is `nn.Linear(..., bias=False)`

  if runlocal:
    c.train.batch_size = 32
    c.train.num_epochs = 1
    c.train.eval_every_epochs = 1
    c.encode.batch_size = 8
    c.encode.num_workers = 2
  return c


def _parse_arg(arg) -> bool:
  if arg in (None, ""):
    return False
  if arg == "runlocal":
    return True
  raise ValueError(f"unknown config arg {arg!r}: use '' or 'runlocal'")
