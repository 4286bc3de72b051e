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


def get_config(arg=None):
  """Args: arg: "" / None (the paper run) or "runlocal" (tiny batch, one epoch)."""
  return config_base.paper_config(
      arg, backbone="clip", checkpoint="openai/clip-vit-base-patch16",
      max_text_len=77,  # CLIP's context length
      include_restval=True, lr=5e-5,
      w1=0.1, w2=0.1, lam1=0.9, lam2=0.3, eta_text=5e-4, eta_image=3e-5)
