"""Train-step time: our sharded JSDS step against a PyTorch re-creation of the official one.

  python bench/train_step.py                    # CPU: fp32 vs fp32, 1 step × 8 rounds, input path
  python bench/train_step.py --dtype bfloat16 --torch-cpu-dtype bfloat16 --epoch-steps 0
  python bench/train_step.py                    # GPU: ours bf16 vs fp16 autocast, 50 steps × 5

Both sides train the same tail on the same device from inputs already there: two dense tails
(Linear 768 → 256, L2 normalise), one shared sparse head (Linear 256 → 768, LayerNorm, the
tied E (|V| × 768) matmul + bias c, log1p(relu)), a learnable τ, the JSDS loss (InfoNCE on
S_d, S_s and S_int, self-KD, L1 regulariser), AdamW in the official two groups (LayerNorm + E + c
at 5e-5 without decay; W_s, the projections and τ at 1e-3 with decay 0.05), a linear
warm-up/decay schedule and a global gradient-norm clip at 1.0. (The official head has no
vocab bias; both sides here have one, as our default `model.use_vocab_bias` does.)

  official  PyTorch eager as holi-lab/mm-sparse-retrieval trains it (`lightning_model.py`,
            `loss.py`, Lightning's "16-mixed" precision): `torch.autocast` fp16 and a GradScaler
            (unscale, clip, step, update) on CUDA. CPU autocast fp16 is not what anyone trains
            with, so on a CPU it runs float32 by default (`--torch-cpu-dtype bfloat16` for bf16
            autocast, no scaler; `--torch-cpu-dtype float16` for the recipe as written, fp16
            autocast + GradScaler, whose fp16 matmuls are slow on a CPU without fp16 units). Its loss keeps the official quirks (teacher not stopped, the
            image-row teacher for both directions, S_int's InfoNCE computed twice): same cost
            class, and it is what the official step computes. Lightning's own per-step
            overhead (logging, hooks) is not included, so this is a lower bound on its time.
  ours      `train_step.make_train_step` on a one-device mesh, exactly as training runs it: the
            batch gathered from an on-device feature cache inside the step, the state donated;
            the tail computes in `--dtype` (bfloat16 on a GPU, float32 on a CPU by default).
  plain     (`--plain`) a bare `jax.jit` of the same math (no shard_map, batch passed in).

Timing: after warm-up (compilation), `--rounds` rounds, each running `--steps` steps of every
implementation in turn (who goes first alternates), so a noisy machine slows them alike; ms/step
is the median over rounds, the ratio ours/official the median of the per-round ratios, and the
ratio of the fastest rounds is printed beside it. On a CPU shared with other work one step per
round (the default there) keeps each pair close in time, and the process CPU time (all
threads, user + system) is printed too: it moves less with the machine's load than wall time.

Input-path check (`--epoch-steps`): a synthetic COCO-sized cache (566,435 captions and 113,287
images, 768-d float32) on the device; one epoch's order is drawn and put on the device
(`input_pipeline.epoch_order` / `device_order`), then the step loop runs over it. Its time is
compared with steps × the isolated step time (the same step on a cache of just one batch, where
gathering costs nothing). The two are timed in alternation over a few rounds (median
ratio printed). `--epoch-steps -1` (the GPU default) runs the whole epoch (113,287 // B steps);
a positive value (4 on a CPU) runs that many steps and extrapolates: the per-epoch fixed cost
(the order and its transfer) is measured in full and the loop's per-step time multiplied out;
the printout says when it extrapolated.
"""

import argparse
import statistics
import time

import numpy as np

COCO_CAPTIONS, COCO_IMAGES = 566_435, 113_287


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--vocab", type=int, default=30524)
  p.add_argument("--dim", type=int, default=768, help="cached feature and word-embedding width")
  p.add_argument("--embed-dim", type=int, default=256, help="dense embedding width P")
  p.add_argument("--steps", type=int, default=None, help="steps per round (default 50 GPU, 1 CPU)")
  p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5 GPU, 8 CPU)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                 help="ours: the tail's computation dtype (`model.dtype`; default bfloat16 on "
                      "GPU, float32 on CPU)")
  p.add_argument("--torch-cpu-dtype", choices=["float32", "bfloat16", "float16"],
                 default="float32",
                 help="official on CPU: float32, bf16 autocast, or the recipe as written (fp16 "
                      "autocast + GradScaler)")
  p.add_argument("--plain", action="store_true", help="also time a bare jax.jit of the math")
  p.add_argument("--no-torch", action="store_true", help="ours only (no ratio)")
  p.add_argument("--epoch-steps", type=int, default=None,
                 help="input-path check: steps to run of a COCO-sized epoch; -1 = all, 0 = skip "
                      "(default: -1 GPU, 4 CPU)")
  p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
  return p.parse_args()


def _train_config():
  """The base config's `train`: blip_coco's loss weights and the two official AdamW groups."""
  from jsds_jax import config_base  # pylint: disable=g-import-not-at-top
  return config_base.base_config().train


# ----------------------------------------------------------------------------------------------
# The official recipe, re-created in PyTorch.


def _torch_official(args, device: str, total_steps: int):
  """Returns step(h_img, h_txt) -> loss tensor; one optimizer step of the official recipe."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  train = _train_config()
  w = train.loss
  torch.manual_seed(0)

  class Tail(nn.Module):
    """RetrievalProjModel's trained parts plus the Lightning module's temperature."""

    def __init__(self):
      super().__init__()
      self.text_proj = nn.Linear(args.dim, args.embed_dim)
      self.vision_proj = nn.Linear(args.dim, args.embed_dim)
      self.single_proj = nn.Linear(args.embed_dim, args.dim)
      self.single_vocab_layer_norm = nn.LayerNorm(args.dim)
      self.single_vocab_projector = nn.Linear(args.dim, args.vocab)  # E (tied) and c
      self.temp = nn.Parameter(0.07 * torch.ones([]))

    def encode(self, h, proj):
      e = F.normalize(proj(h), dim=-1)
      z = torch.log1p(torch.relu(self.single_vocab_projector(
          self.single_vocab_layer_norm(self.single_proj(e)))))
      return e, z

  model = Tail().to(device)
  embed = (list(model.single_vocab_layer_norm.parameters())
           + list(model.single_vocab_projector.parameters()))
  head = (list(model.single_proj.parameters()) + list(model.text_proj.parameters())
          + list(model.vision_proj.parameters()) + [model.temp])
  opt = torch.optim.AdamW([
      {"params": embed, "lr": train.pretrained.lr, "weight_decay": 0.0},
      {"params": head, "lr": train.projections.lr},
  ], eps=train.eps, betas=(train.b1, train.b2), weight_decay=train.projections.weight_decay)
  warm = int(train.warmup_fraction * total_steps)
  sched = torch.optim.lr_scheduler.LambdaLR(
      opt, lambda t: t / max(1, warm) if t < warm
      else max(0.0, (total_steps - t) / max(1, total_steps - warm)))
  on_cuda = device == "cuda"
  amp_dtype = torch.float16 if on_cuda else {
      "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.torch_cpu_dtype]
  scaler = torch.amp.GradScaler(device) if amp_dtype == torch.float16 else None
  ce = nn.CrossEntropyLoss()
  reg_t = {"t": 0}
  params = [p for g in opt.param_groups for p in g["params"]]

  def info_nce(s, idx):
    return 0.5 * (ce(s, idx) + ce(s.t(), idx))

  def distill(s, p_teacher):
    return -(p_teacher * torch.log_softmax(s, dim=1)).sum(dim=1).mean()

  def loss_fn(h_img, h_txt):
    with torch.no_grad():
      model.temp.clamp_(0.001, 0.5)
    e_t, z_t = model.encode(h_txt, model.text_proj)
    e_i, z_i = model.encode(h_img, model.vision_proj)
    idx = torch.arange(h_img.shape[0], device=device)
    s_d = e_i @ e_t.t() / model.temp
    s_s = z_i @ z_t.t()
    s_int = w.w1 * s_d + w.w2 * s_s
    p = torch.softmax(s_int, dim=1)  # the official teacher: not stopped, image rows both ways
    l_sup = (w.lam1 * info_nce(s_d, idx) + w.lam2 * info_nce(s_s, idx)
             + 0.5 * (info_nce(s_int, idx) + info_nce(s_int, idx))) / 2
    l_kd = (w.lam1 * 0.5 * (distill(s_d, p) + distill(s_d.t(), p))
            + w.lam2 * 0.5 * (distill(s_s, p) + distill(s_s.t(), p))) / 2
    # L1 with the warm-up weight (t/T)², outside autocast as the official regulariser runs.
    t_reg = max(1, int(train.loss.reg_warmup_fraction * total_steps))
    frac = min(1.0, reg_t["t"] / t_reg) ** 2
    with torch.autocast(device, enabled=False):
      reg = 0.5 * (torch.abs(z_t.float() * (w.eta_text * frac)).sum(dim=1).mean()
                   + torch.abs(z_i.float() * (w.eta_image * frac)).sum(dim=1).mean())
    reg_t["t"] += 1
    return 0.5 * (l_sup + l_kd) + reg

  def step(h_img, h_txt):
    opt.zero_grad(set_to_none=True)
    if amp_dtype is not None:
      with torch.autocast(device, dtype=amp_dtype):
        loss = loss_fn(h_img, h_txt)
    else:
      loss = loss_fn(h_img, h_txt)
    if scaler is not None:
      scaler.scale(loss).backward()
      scaler.unscale_(opt)
      torch.nn.utils.clip_grad_norm_(params, 1.0)
      scaler.step(opt)
      scaler.update()
    else:
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, 1.0)
      opt.step()
    sched.step()
    return loss

  return step


# ----------------------------------------------------------------------------------------------
# Ours.


def _ours(args, total_steps: int, features_np, mesh):
  """Returns (run(k) -> None that takes step k of the epoch order, block() -> None, step fn)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jsds_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from jsds_jax import optim  # pylint: disable=g-import-not-at-top
  from jsds_jax import train_step  # pylint: disable=g-import-not-at-top
  from jsds_jax.models.tail import jsds  # pylint: disable=g-import-not-at-top

  train = _train_config()
  train.batch_size = args.batch
  module = jsds.JSDSTail(embed_dim=args.embed_dim, vocab_size=args.vocab, word_dim=args.dim,
                         dtype=jnp.dtype(args.dtype))
  params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, args.dim)),
                                jnp.zeros((1, args.dim)))["params"]
  tx = optim.make_optimizer(train, total_steps)
  state = {"s": train_step.create_train_state(params, tx, jax.random.key(1), mesh)}
  step = train_step.make_train_step(module, tx, train, total_steps, mesh)
  image, text, cap_img = features_np
  features = input_pipeline.device_features(image, text, cap_img, mesh)
  order = input_pipeline.device_order(
      input_pipeline.epoch_order(0, 0, cap_img, args.batch), mesh)
  n_rows = order.shape[0]
  last = {}

  def run(k):
    state["s"], last["m"] = step(state["s"], features, order, k % n_rows)

  def block():
    jax.block_until_ready((state["s"], last.get("m")))

  return run, block, step, state, module, tx, train


def _plain(args, total_steps: int, module, tx, train, h_img, h_txt):
  """A bare `jax.jit` of the same forward, loss and update (no shard_map, no gather)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jsds_jax import train_step  # pylint: disable=g-import-not-at-top

  settings = train_step.LossSettings.from_config(train, total_steps)
  image_idx = jnp.arange(args.batch, dtype=jnp.int32)

  @jax.jit
  def update(params, opt_state, step, h_img, h_txt):
    def loss_fn(p):
      out = module.apply({"params": p}, h_img, h_txt)
      return train_step.loss_from_outputs(out, image_idx, step, settings)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, step + 1, loss

  params = jax.jit(module.init)(jax.random.key(0), h_img[:1], h_txt[:1])["params"]
  box = {"v": (params, tx.init(params), jnp.zeros((), jnp.int32))}
  last = {}

  def run(_):
    p, o, s = box["v"]
    *box["v"], last["loss"] = update(p, o, s, h_img, h_txt)

  def block():
    jax.block_until_ready((box["v"], last.get("loss")))

  return run, block


# ----------------------------------------------------------------------------------------------


def _synthetic(n_images: int, n_captions: int, dim: int, seed: int = 0):
  """Features and a caption -> image index with every image captioned (COCO-like: ~5 each)."""
  rng = np.random.default_rng(seed)
  image = rng.standard_normal((n_images, dim), dtype=np.float32)
  text = rng.standard_normal((n_captions, dim), dtype=np.float32)
  cap_img = np.concatenate([np.arange(n_images),
                            rng.integers(0, n_images, n_captions - n_images)]).astype(np.int32)
  return image, text, cap_img


def _time_rounds(impls: dict, steps: int, rounds: int, warmup: int):
  """Per round and implementation: wall ms/step and process CPU ms/step (all threads).

  Args:
    impls: name -> (run(k), block()).

  Returns:
    ({name: [wall ms/step of each round]}, {name: [CPU ms/step of each round]}).
  """
  for run, block in impls.values():
    for k in range(warmup):
      run(k)
    block()
  wall, cpu = {n: [] for n in impls}, {n: [] for n in impls}
  for r in range(rounds):
    names = list(impls) if r % 2 == 0 else list(reversed(impls))  # alternate who goes first
    for name in names:
      run, block = impls[name]
      t0, c0 = time.perf_counter(), time.process_time()
      for k in range(steps):
        run(k)
      block()
      wall[name].append(1e3 * (time.perf_counter() - t0) / steps)
      cpu[name].append(1e3 * (time.process_time() - c0) / steps)
  return wall, cpu


def _input_path_check(args, on_gpu, mesh, step, state, isolated):
  """A COCO-sized epoch (or a measured part of it) against steps × the isolated step time.

  Args:
    args, on_gpu, mesh: as in `main`.
    step, state: our step function and its state box ({"s": TrainState}).
    isolated: (run(k), block()) of the same step on a one-batch cache.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jsds_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  epoch_steps = args.epoch_steps if args.epoch_steps is not None else (-1 if on_gpu else 4)
  if epoch_steps == 0:
    return
  image, text, cap_img = _synthetic(COCO_IMAGES, COCO_CAPTIONS, args.dim, seed=1)
  t0 = time.perf_counter()
  features = input_pipeline.device_features(image, text, cap_img, mesh)
  jax.block_until_ready(features)
  print(f"synthetic COCO cache on the device: {image.nbytes / 2**20:.0f} MiB images + "
        f"{text.nbytes / 2**20:.0f} MiB captions, put there in {time.perf_counter() - t0:.1f} s "
        "(once per run, not per epoch)")
  del image, text
  total = input_pipeline.steps_per_epoch(COCO_IMAGES, args.batch)
  n = total if epoch_steps < 0 else min(epoch_steps, total)
  rounds = 3  # odd, so the median is one of them

  def epoch(epoch_idx):
    """(seconds for the epoch's order: host + transfer, seconds for n steps over it)."""
    jax.block_until_ready(state["s"])
    t0 = time.perf_counter()
    order = input_pipeline.device_order(
        input_pipeline.epoch_order(0, epoch_idx, cap_img, args.batch), mesh)
    t1 = time.perf_counter()
    metrics = None
    for k in range(n):
      state["s"], metrics = step(state["s"], features, order, k)
    jax.block_until_ready((state["s"], metrics))
    return t1 - t0, time.perf_counter() - t1

  def isolated_steps():
    run, block = isolated
    block()
    t0 = time.perf_counter()
    for k in range(n):
      run(k)
    block()
    return time.perf_counter() - t0

  epoch(0)  # warm: the cache's first touch
  ratios, parts = [], []
  for r in range(rounds):  # interleaved, who goes first alternating
    if r % 2:
      iso_s = isolated_steps()
      order_s, loop_s = epoch(r + 1)
    else:
      order_s, loop_s = epoch(r + 1)
      iso_s = isolated_steps()
    epoch_s = order_s + loop_s * total / n
    budget_s = iso_s * total / n
    ratios.append(epoch_s / budget_s)
    parts.append((epoch_s, budget_s, order_s, loop_s / n, iso_s / n))
  mid = ratios.index(statistics.median(ratios))
  epoch_s, budget_s, order_s, loop_step, iso_step = parts[mid]
  how = "the whole epoch timed" if n == total else (
      f"EXTRAPOLATED: the order timed in full, {n} of {total} steps timed and the loop's "
      "per-step time multiplied out")
  print(f"epoch over the COCO-sized cache: {total} steps in {epoch_s:.2f} s ({how}); order "
        f"{1e3 * order_s:.0f} ms + {1e3 * loop_step:.2f} ms/step")
  print(f"steps × isolated step time: {total} × {1e3 * iso_step:.2f} ms = {budget_s:.2f} s")
  print(f"epoch / (steps × step) = {ratios[mid]:.3f}, the median round  (per round: "
        + ", ".join(f"{x:.3f}" for x in ratios) + "; target <= 1.2)")


def main():
  args = _parse()
  import jax  # pylint: disable=g-import-not-at-top

  on_gpu = jax.default_backend() == "gpu"
  steps = args.steps or (50 if on_gpu else 1)
  rounds = args.rounds or (5 if on_gpu else 8)
  args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  total_steps = 10_000  # schedules only; the timed steps sit in the warm-up either way
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), batch {args.batch}, "
        f"|V| {args.vocab}, {args.dim}-d inputs, {steps} steps × {rounds} rounds; ours computes "
        f"in {args.dtype}")

  # One batch's worth of cache: ours gathers from it, the others read it directly.
  small = _synthetic(args.batch, args.batch, args.dim)
  small = (small[0], small[1], np.arange(args.batch, dtype=np.int32))
  run, block, step, state, module, tx, train = _ours(args, total_steps, small, mesh)
  impls = {"ours": (run, block)}

  if args.plain:
    h_img = jax.device_put(small[0], jax.devices()[0])
    h_txt = jax.device_put(small[1], jax.devices()[0])
    impls["plain jit"] = _plain(args, total_steps, module, tx, train, h_img, h_txt)

  official_desc = None
  with_torch = not args.no_torch
  if with_torch and on_gpu:
    import torch  # pylint: disable=g-import-not-at-top
    if not torch.cuda.is_available():
      # Timing PyTorch on the CPU against JAX on the GPU would be a meaningless ratio.
      print("JAX runs on the GPU but this torch has no CUDA: the official step is skipped "
            "(install a CUDA build of torch for the ratio)")
      with_torch = False
  if with_torch:
    import torch  # pylint: disable=g-import-not-at-top
    if args.threads:
      torch.set_num_threads(args.threads)
    device = "cuda" if on_gpu else "cpu"
    t_img = torch.as_tensor(small[0], device=device)
    t_txt = torch.as_tensor(small[1], device=device)
    t_step = _torch_official(args, device, total_steps)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def t_run(_):
      t_step(t_img, t_txt)

    impls["official"] = (t_run, sync)
    if device == "cuda":
      official_desc = "fp16 autocast + GradScaler"
    else:
      cpu_mode = {"float32": "float32", "bfloat16": "bf16 autocast",
                  "float16": "fp16 autocast + GradScaler"}[args.torch_cpu_dtype]
      official_desc = f"{cpu_mode}, {torch.get_num_threads()} threads"

  times, cpu = _time_rounds(impls, steps, rounds, args.warmup)
  show_cpu = not on_gpu  # on a shared CPU, CPU time is the steadier of the two
  for name, ts in times.items():
    extra = f"  [{official_desc}]" if name == "official" and official_desc else ""
    cpu_s = f", CPU {statistics.median(cpu[name]):.0f} ms/step" if show_cpu else ""
    print(f"{name:>10}: {statistics.median(ts):9.2f} ms/step{cpu_s}  (rounds: "
          + ", ".join(f"{t:.1f}" for t in ts) + ")" + extra)
  for other in ("ours", "plain jit"):
    if "official" in times and other in times:
      ratios = [o / t for o, t in zip(times[other], times["official"])]
      note = f"fastest rounds {min(times[other]) / min(times['official']):.3f}"
      if show_cpu:
        cpu_ratio = statistics.median(cpu[other]) / statistics.median(cpu["official"])
        note += f"; CPU time {cpu_ratio:.3f}"
      print(f"{other} / official = {statistics.median(ratios):.3f}  (per round: "
            + ", ".join(f"{r:.3f}" for r in ratios) + f"; {note})")

  _input_path_check(args, on_gpu, mesh, step, state, impls["ours"])


if __name__ == "__main__":
  main()
