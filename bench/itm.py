r"""Per-query latency of BLIP-base's ITM cross-encoder: the cost a reranker is compared with.

BLIP reranks a query's top k candidates by running its text encoder in multimodal mode over
every (caption, image) pair: 12 BERT-base layers whose cross-attention reads the image's 577
token states (ViT-B/16 at 384 px), then `itm_head`. This times our jitted Flax `BlipItm`
(jsds_jax/models/trunk/blip_itm.py) with random weights, 35 text tokens (BLIP's eval length),
for one query against N candidates:

  t2i  one caption against N images: N different image-token sets (the expensive direction:
       every layer projects N x 577 image tokens to keys and values)
  i2t  one image against N captions: one image's tokens, projected once and shared

With `--torch`, Hugging Face's `BlipForImageTextRetrieval` text encoder + `itm_head` (PyTorch
eager, `inference_mode`, the same shapes and inputs) is timed in the same run as the baseline,
and the ratio printed. Timing alternates between the implementations; each number is the
median of the timed calls (ours compiled ahead of time, Hugging Face after one warm-up call).

  .venv/bin/python bench/itm.py --chunk 64                       # t2i, N = 16, 64, 256, CPU
  .venv/bin/python bench/itm.py --candidates 16 --direction both --torch
  .venv/bin/python bench/itm.py --dtype bfloat16 --attention cudnn          # on a GPU

`time_itm` is the timing function `bench/cmc.py` imports, so that CMC and the cross-encoder are
measured by the same code on the same device in one run.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from jsds_jax.models.trunk import blip_itm

IMAGE_TOKENS = 577  # ViT-B/16 at 384 px: 24 x 24 patches + [CLS]
TEXT_TOKENS = 35  # BLIP's retrieval eval pads captions to 35 tokens
IMAGE_WIDTH = 768


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds per query of one setting: the median and every timed call."""

  direction: str
  candidates: int
  seconds: float
  runs: tuple[float, ...]

  @property
  def ms(self) -> float:
    return 1e3 * self.seconds


def _inputs(num_candidates: int, direction: str, seed: int = 0):
  """Random caption ids / mask (N, L) and image tokens ((N or 1), S, D) float32 numpy."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, 30000, (num_candidates, TEXT_TOKENS)).astype(np.int32)
  ids[:, 0] = 101
  mask = np.ones_like(ids)
  n_img = num_candidates if direction == "t2i" else 1
  images = rng.normal(size=(n_img, IMAGE_TOKENS, IMAGE_WIDTH)).astype(np.float32)
  if direction == "t2i":
    ids[:] = ids[:1]  # one caption against N images
  return ids, mask, images


def _median_time(call: Callable[[], Any], repeats: int, budget_s: float) -> tuple[float, ...]:
  """Times `call` (which must block until done) up to `repeats` times within `budget_s`
  (at least once)."""
  runs = []
  start = time.perf_counter()
  while len(runs) < repeats and (not runs or time.perf_counter() - start < budget_s):
    t = time.perf_counter()
    call()
    runs.append(time.perf_counter() - t)
  return tuple(runs)


def make_itm_call(num_candidates: int, direction: str = "t2i", *, dtype: Any = jnp.float32,
                  attention_impl: Optional[str] = None, seed: int = 0,
                  chunk: Optional[int] = None) -> Callable[[], Any]:
  """A compiled call scoring one query against `num_candidates` candidates with BLIP-base's
  ITM (random weights); the call blocks until the logits are ready.

  `chunk`: score the candidates `chunk` at a time (one compiled call per chunk, run one after
  another) to bound memory: 256 t2i candidates in one call need ~13 GB on a CPU.
  """
  config = blip_itm.blip_base_itm_config()
  module = blip_itm.BlipItm(config, dtype=dtype, attention_impl=attention_impl)
  params = jax.device_put(blip_itm.random_itm_params(config, IMAGE_WIDTH, seed))
  size = num_candidates if not chunk or chunk >= num_candidates else chunk
  if num_candidates % size:
    raise ValueError(f"--chunk {chunk} must divide {num_candidates} candidates")
  ids, mask, images = _inputs(num_candidates, direction, seed)
  pieces = []
  for s in range(0, num_candidates, size):
    img = images if direction == "i2t" else images[s:s + size]
    img = jax.device_put(img)
    if dtype != jnp.float32:
      img = img.astype(dtype)  # the cache holds bf16 tokens; no float32 copy on device
    pieces.append((jax.device_put(ids[s:s + size]), jax.device_put(mask[s:s + size]), img))
  fn = jax.jit(lambda p, i, m, x: module.apply({"params": p}, i, m, x)[:, 1])
  # Compiled ahead of time: no untimed run (minutes for 256 candidates on a CPU).
  compiled = fn.lower(params, *pieces[0]).compile()

  def call():
    outs = [compiled(params, *piece) for piece in pieces]
    return [o.block_until_ready() for o in outs]

  return call


def time_itm(num_candidates: int, direction: str = "t2i", *, dtype: Any = jnp.float32,
             attention_impl: Optional[str] = None, repeats: int = 3,
             budget_s: float = 60.0, chunk: Optional[int] = None) -> Timing:
  """Seconds per query of BLIP-base ITM over `num_candidates` candidates (median of up to
  `repeats` calls, compiled beforehand, stopping early past `budget_s`)."""
  call = make_itm_call(num_candidates, direction, dtype=dtype, attention_impl=attention_impl,
                       chunk=chunk)
  runs = _median_time(call, repeats, budget_s)
  return Timing(direction, num_candidates, statistics.median(runs), runs)


def make_torch_itm_call(num_candidates: int, direction: str = "t2i") -> Callable[[], Any]:
  """The baseline: Hugging Face BLIP text encoder (multimodal) + itm_head, PyTorch eager."""
  import torch
  import transformers
  config = transformers.BlipConfig(
      vision_config=dict(image_size=384, patch_size=16),
      text_config=dict(vocab_size=30524))
  torch.manual_seed(0)
  model = transformers.BlipForImageTextRetrieval(config).eval()
  ids, mask, images = _inputs(num_candidates, direction)
  ids, mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
  images = torch.from_numpy(images)
  if direction == "i2t":
    images = images.expand(num_candidates, -1, -1)  # Hugging Face takes one row per pair
  image_mask = torch.ones(images.shape[:2], dtype=torch.long)

  def call():
    with torch.inference_mode():
      out = model.text_encoder(input_ids=ids, attention_mask=mask,
                               encoder_hidden_states=images,
                               encoder_attention_mask=image_mask)
      return model.itm_head(out[0][:, 0, :])[:, 1]

  call()
  return call


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--candidates", type=int, nargs="+", default=[16, 64, 256])
  parser.add_argument("--direction", choices=["t2i", "i2t", "both"], default="t2i")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--attention", default=None, help="xla (default) or cudnn")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--chunk", type=int, default=None,
                      help="candidates per compiled call (bounds memory; default: all at once)")
  parser.add_argument("--budget", type=float, default=60.0,
                      help="seconds of timed calls per setting before stopping early")
  parser.add_argument("--torch", action="store_true",
                      help="also time Hugging Face's PyTorch ITM (baseline) and print ratios")
  parser.add_argument("--json", default="", help="also write the rows to this file")
  args = parser.parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  directions = ["t2i", "i2t"] if args.direction == "both" else [args.direction]
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.1f}; "
        f"BLIP-base ITM, {IMAGE_TOKENS} image tokens, {TEXT_TOKENS} text tokens, {args.dtype}")
  header = f"{'dir':4s} {'N':>5s} {'ms/query':>10s} {'pairs/s':>9s}"
  if args.torch:
    header += f" {'torch ms':>10s} {'ours/torch':>10s}"
  print(header)
  rows = []
  for direction in directions:
    for n in args.candidates:
      ours_call = make_itm_call(n, direction, dtype=dtype, attention_impl=args.attention,
                                chunk=args.chunk)
      torch_call = make_torch_itm_call(n, direction) if args.torch else None
      ours_runs, torch_runs = [], []
      start = time.perf_counter()
      # Alternate, so a change in machine load hits both alike.
      while len(ours_runs) < args.repeats and (
          not ours_runs or time.perf_counter() - start < args.budget):
        ours_runs += _median_time(ours_call, 1, 0)
        if torch_call is not None:
          torch_runs += _median_time(torch_call, 1, 0)
      ours = statistics.median(ours_runs)
      row = {"direction": direction, "candidates": n, "ms_per_query": 1e3 * ours,
             "pairs_per_s": n / ours, "runs": len(ours_runs), "dtype": args.dtype,
             "chunk": args.chunk,
             "device": jax.devices()[0].device_kind}
      line = f"{direction:4s} {n:5d} {1e3 * ours:10.1f} {n / ours:9.1f}"
      if torch_runs:
        theirs = statistics.median(torch_runs)
        row.update(torch_ms_per_query=1e3 * theirs, ratio=ours / theirs)
        line += f" {1e3 * theirs:10.1f} {ours / theirs:10.2f}"
      print(line, flush=True)
      rows.append(row)
      del ours_call, torch_call
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
