"""The paper's `albef_flickr` run: ALBEF ViT-B (LAVIS Flickr30k retrieval weights) on Flickr30k.

  python -m jsds_jax.main --config configs/albef_flickr.py --workdir runs/albef_flickr \
      --config.backbone.checkpoint=/ckpt/albef_flickr_retrieval \
      --config.data.json=/data/flickr30k/dataset_flickr30k.json \
      --config.data.image_root=/data/flickr30k/flickr30k-images
  python -m jsds_jax.main --config configs/albef_flickr.py:runlocal ...   # a smoke test

The checkpoint folder is as for configs/albef_coco.py, with LAVIS's `albef_retrieval` weights
for model_type "flickr". Hyperparameters: DESIGN.md §3's table row `albef_flickr` (= holi-lab/
mm-sparse-retrieval `training_config/albef-flickr.json`): lr 1e-5, w1 0.1, w2 0.2, λ1 0.3,
λ2 0.3, η_text 1e-4, η_image 2e-5; the rest as configs/blip_coco.py says.
"""

from jsds_jax import config_base


def get_config(arg=None):
  """Args: arg: "" / None (the paper run) or "runlocal" (tiny batch, one epoch)."""
  return config_base.paper_config(
      arg, backbone="albef", checkpoint="",
      max_text_len=30,  # ALBEF retrieval's text length
      include_restval=False, lr=1e-5,
      w1=0.1, w2=0.2, lam1=0.3, lam2=0.3, eta_text=1e-4, eta_image=2e-5)
