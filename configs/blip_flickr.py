"""The paper's `blip_flickr` run: BLIP ViT-B (Flickr30k retrieval checkpoint) on Flickr30k.

  python -m jsds_jax.main --config configs/blip_flickr.py --workdir runs/blip_flickr \
      --config.data.json=/data/flickr30k/dataset_flickr30k.json \
      --config.data.image_root=/data/flickr30k/flickr30k-images
  python -m jsds_jax.main --config configs/blip_flickr.py:runlocal ...   # a smoke test

Hyperparameters: DESIGN.md §3's table row `blip_flickr` (= holi-lab/mm-sparse-retrieval
`training_config/blip-flickr.json`): lr 1e-5, w1 0.1, w2 0.2, λ1 0.7, λ2 0.7,
η_text 1e-4, η_image 2e-5. The rest, and why: configs/blip_coco.py (the lr column is the
official single AdamW group's, so both of our groups get it with weight decay 0.05;
`num_epochs` is 200 · captions per image; validation every 5 epochs, patience 20).
"""

from jsds_jax import config_base


def get_config(arg=None):
  """Args: arg: "" / None (the paper run) or "runlocal" (tiny batch, one epoch)."""
  return config_base.paper_config(
      arg, backbone="blip", checkpoint="Salesforce/blip-itm-base-flickr",
      max_text_len=35,  # BLIP retrieval's text length
      include_restval=False, lr=1e-5,
      w1=0.1, w2=0.2, lam1=0.7, lam2=0.7, eta_text=1e-4, eta_image=2e-5)
