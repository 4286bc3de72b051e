"""The paper's `albef_coco` run: ALBEF ViT-B (LAVIS COCO retrieval weights) on COCO Karpathy.

  python -m jsds_jax.main --config configs/albef_coco.py --workdir runs/albef_coco \
      --config.backbone.checkpoint=/ckpt/albef_coco_retrieval \
      --config.data.json=/data/coco/dataset_coco.json --config.data.image_root=/data/coco
  python -m jsds_jax.main --config configs/albef_coco.py:runlocal ...   # a smoke test

The ALBEF checkpoint is a local folder (jsds_jax/models/trunk/albef.py): LAVIS's `albef_retrieval`
weights for model_type "coco" (the `.pth` LAVIS downloads for it), with ALBEF's
`config_bert.json` and the bert-base-uncased tokenizer files beside it; pass its path.

Hyperparameters: DESIGN.md §3's table row `albef_coco` (= holi-lab/mm-sparse-retrieval
`training_config/albef-coco.json`): lr 5e-5, w1 0.2, w2 0.5, λ1 0.9, λ2 0.3,
η_text 1e-5, η_image 3e-5. The rest, and why: configs/blip_coco.py (the lr column is the
official single AdamW group's, so both of our groups get it with weight decay 0.05;
`num_epochs` is 200 · captions per image; validation every 5 epochs, patience 20).
"""

from jsds_jax import config_base


def get_config(arg=None):
  """Args: arg: "" / None (the paper run) or "runlocal" (tiny batch, one epoch)."""
  return config_base.paper_config(
      arg, backbone="albef", checkpoint="",
      max_text_len=30,  # ALBEF retrieval's text length
      include_restval=True, lr=5e-5,
      w1=0.2, w2=0.5, lam1=0.9, lam2=0.3, eta_text=1e-5, eta_image=3e-5)
