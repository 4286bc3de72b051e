"""Encode throughput: our Flax BLIP towers against Hugging Face PyTorch, same weights, same device.

  python bench/encode.py                                  # CPU defaults (small batch, fp32)
  python bench/encode.py --batch 256 --dtype bfloat16 --attention cudnn   # on a GPU

Builds a randomly initialised `transformers.BlipForImageTextRetrieval` of BLIP's real size
(ViT-B/16 or ViT-L/16 at `--image-size`, BERT-base text encoder, |V| = 30524), converts its
weights with our converter, and times the image path (vision tower + `vision_proj`) and the text
path (unimodal text encoder + `text_proj`) of both implementations on identical inputs. PyTorch
runs eager under `torch.inference_mode`, with `torch.autocast` for bf16 (the usual recipe);
ours runs the jitted Flax modules with `dtype`. Prints items/s of each and the ratio ours/PyTorch.
"""

import argparse
import os
import time

import numpy as np


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--arch", choices=["base", "large"], default="base")
  p.add_argument("--image-size", type=int, default=384)
  p.add_argument("--batch", type=int, default=None, help="default: 256 on GPU, 4 on CPU")
  p.add_argument("--text-len", type=int, default=35)
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                 help="default: bfloat16 on GPU, float32 on CPU")
  p.add_argument("--attention", choices=["xla", "cudnn"], default="xla")
  p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 GPU, 3 CPU)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
  return p.parse_args()


def _blip_config(arch: str, image_size: int):
  import transformers  # pylint: disable=g-import-not-at-top
  vision = dict(image_size=image_size, patch_size=16, hidden_size=768, num_hidden_layers=12,
                num_attention_heads=12, intermediate_size=3072)
  if arch == "large":
    vision.update(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096)
  text = dict(vocab_size=30524, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
              intermediate_size=3072, encoder_hidden_size=vision["hidden_size"])
  return transformers.BlipConfig(vision_config=vision, text_config=text,
                                 image_text_hidden_size=256)


def _time(fn, steps: int, warmup: int) -> float:
  """Seconds per call, after `warmup` untimed calls; `fn` must block until done."""
  for _ in range(warmup):
    fn()
  t0 = time.perf_counter()
  for _ in range(steps):
    fn()
  return (time.perf_counter() - t0) / steps


def main():
  args = _parse()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from jsds_jax.models.trunk import blip  # pylint: disable=g-import-not-at-top

  on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
  batch = args.batch or (256 if on_gpu else 4)
  dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
  steps = args.steps or (20 if on_gpu else 3)
  if args.threads:
    torch.set_num_threads(args.threads)
  device = "cuda" if on_gpu else "cpu"

  torch.manual_seed(0)
  hf_config = _blip_config(args.arch, args.image_size)
  model = transformers.BlipForImageTextRetrieval(hf_config).eval().to(device)
  state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
  ours = blip.convert_blip(state, blip.BlipConfig.from_hf(hf_config))
  config = blip.BlipConfig.from_hf(hf_config)
  impl = None if args.attention == "xla" else "cudnn"
  jdtype = jnp.dtype(dtype)
  vision = blip.vit.VisionTransformer(config.vision, dtype=jdtype, attention_impl=impl)
  text = blip.bert.BertEncoder(config.text, pooling="cls", dtype=jdtype, attention_impl=impl)

  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(batch, args.image_size, args.image_size, 3)).astype(np.float32)
  ids = rng.integers(1000, 30000, size=(batch, args.text_len)).astype(np.int32)
  mask = np.ones_like(ids)

  @jax.jit
  def jax_image(params, proj, x):
    h = vision.apply({"params": params}, x).pooled
    return h.astype(jnp.float32) @ proj["kernel"] + proj["bias"]

  @jax.jit
  def jax_text(params, proj, i, m):
    h = text.apply({"params": params}, i, m).pooled
    return h.astype(jnp.float32) @ proj["kernel"] + proj["bias"]

  put = lambda t: jax.device_put(jax.tree_util.tree_map(jnp.asarray, t))
  vp, tp = put(ours["vision"]), put(ours["text"])
  vproj, tproj = put(ours["vision_proj"]), put(ours["text_proj"])
  x_j, i_j, m_j = put(pixels), put(ids), put(mask)
  x_t = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(device)
  i_t, m_t = torch.from_numpy(ids).long().to(device), torch.from_numpy(mask).long().to(device)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
  sync = torch.cuda.synchronize if on_gpu else (lambda: None)

  def torch_image():
    with torch.inference_mode(), autocast:
      h = model.vision_model(pixel_values=x_t).last_hidden_state[:, 0]
      model.vision_proj(h)
    sync()

  def torch_text():
    with torch.inference_mode(), autocast:
      # No encoder_hidden_states: the unimodal path, as use_itm_head=False runs it.
      h = model.text_encoder(input_ids=i_t, attention_mask=m_t).last_hidden_state[:, 0]
      model.text_proj(h)
    sync()

  rows = []
  for name, jfn, tfn in (
      ("images", lambda: jax_image(vp, vproj, x_j).block_until_ready(), torch_image),
      ("captions", lambda: jax_text(tp, tproj, i_j, m_j).block_until_ready(), torch_text)):
    t_ours = _time(jfn, steps, args.warmup)
    t_torch = _time(tfn, steps, args.warmup)
    rows.append((name, batch / t_ours, batch / t_torch, t_torch / t_ours))

  dev = jax.devices()[0].device_kind
  print(f"\nBLIP {args.arch} @ {args.image_size}px, batch {batch}, {dtype}, attention "
        f"{args.attention}, device {dev} ({os.cpu_count()} CPUs), {steps} timed steps\n")
  print("| path | jsds-jax (Flax, jit) /s | HF PyTorch eager /s | ratio |")
  print("|---|---|---|---|")
  for name, a, b, r in rows:
    print(f"| {name} | {a:,.1f} | {b:,.1f} | {r:.2f}x |")


if __name__ == "__main__":
  main()
