"""JSDS on CLIP ViT-B/16 (OpenAI weights) on COCO Karpathy splits; not a run from the paper.

  python -m jsds_jax.main --config configs/clip_coco.py --workdir runs/clip_coco \
      --config.data.json=/data/coco/dataset_coco.json --config.data.image_root=/data/coco
  python -m jsds_jax.main --config configs/clip_coco.py:runlocal ...   # minutes: a smoke test

The paper trains BLIP and ALBEF only, so there is no published row for CLIP: this config reuses
`blip_coco`'s (lr 5e-5 for both AdamW groups with weight decay 0.05, w1 0.1, w2 0.1, λ1 0.9,
λ2 0.3, η_text 5e-4, η_image 3e-5, batch 256, 20% warm-up, clip 1.0, no vocab bias), the
same epoch count (200 official epochs = 200 · 5 of ours) and validation every 5 epochs with
patience 20; configs/blip_coco.py says why. CLIP differs in the backbone: 768-d image and
512-d text (EOS) states, bias-free 512-d projections (the dense tails start from them), and E
from its 49,408 BPE token embeddings (512-d), so the sparse vectors live in CLIP's vocabulary.
"""

from jsds_jax import config_base

OFFICIAL_EPOCHS = 200
CAPTIONS_PER_IMAGE = 5  # COCO Karpathy train + restval: 566,435 captions / 113,287 images
PATIENCE = 20           # validations (official epochs) without a better sparse R@1


def get_config(arg=None):
  """Args: arg: "" / None (the paper run) or "runlocal" (tiny batch, one epoch)."""
  runlocal = _parse_arg(arg)
  c = config_base.base_config()
  c.backbone.name = "clip"
  c.backbone.checkpoint = "openai/clip-vit-base-patch16"
  c.backbone.max_text_len = 77  # CLIP's context length
  c.data.name = "karpathy"
  c.data.include_restval = True
  c.encode.batch_size = 256

  c.train.mode = "jsds"
  c.train.batch_size = 256
  c.train.num_epochs = OFFICIAL_EPOCHS * CAPTIONS_PER_IMAGE
  c.train.warmup_fraction = 0.2
  c.train.clip_norm = 1.0
  c.train.b1, c.train.b2, c.train.eps = 0.9, 0.999, 1e-8
  for group in (c.train.embed, c.train.head):  # blip_coco's single group
    group.lr = 5e-5
    group.weight_decay = 0.05
  c.train.loss.update(w1=0.1, w2=0.1, lam1=0.9, lam2=0.3, eta_text=5e-4, eta_image=3e-5,
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
