r"""CMC reranking latency and memory as the number of candidates K grows, on one CPU thread.

For each K it measures, one query at a time:

  first stage, sparse   `ExactIndex.search(q, K)` over a synthetic learned-sparse collection of
                        --docs documents (`jsds_jax.index.synthetic`; 40 / 100 non-zeros per
                        query / document): what produces the K candidates
  first stage, dense    numpy brute force (N, 256) @ (256,) then argpartition top-K
  CMC                   our jitted `CMC` (2 gated post-LN layers, 4 heads, FFN --mlp-dim, 256-d
                        inputs by default) scoring the query against its K candidate
                        embeddings, random weights, float32
  CMC, PyTorch          (unless --no-torch, for K <= --torch-max-k) the official layer stack
                        (`nn.TransformerEncoder` of the gated `nn.TransformerEncoderLayer`, eval
                        mode, `inference_mode`) on the same inputs: what the paper's code costs

With --itm N [N ...] it also times, in the same run on the same thread, BLIP-base's ITM
cross-encoder (`bench/itm.py`'s `time_itm`: 384 px, 577 image tokens, 35 text tokens, random
weights, t2i) over N candidates per query, and prints every CMC(K) / ITM(N) ratio: the paper's
claim is that CMC over ~10K candidates costs about what a cross-encoder pays for 16.

and prints the median latency, the CMC / sparse-first-stage ratio (the stage's overhead, both
measured in this run), CMC's cost per candidate, its analytic FLOPs (and the share of
attention's K² terms), the rate reached (GFLOP/s), and XLA's compiled memory (arguments +
temporaries). Above --block-from candidates CMC attends in query blocks of --block
(`CMC.attention_block`, the same scores in O(block·K) memory).

Everything runs on one thread: the thread-count variables are set and the process is pinned to
one core before numpy, jax or torch are imported, and XLA's CPU backend is told to use one
thread.

  .venv/bin/python bench/cmc.py                                # K = 16 .. 10,000
  .venv/bin/python bench/cmc.py --ks 16 64 256 1000 --mlp-dim 512
  .venv/bin/python bench/cmc.py --ks 16 1000 10000 --no-torch --itm 16 64 --itm-chunk 16
"""

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
  os.environ[_var] = "1"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--ks", type=int, nargs="+", default=[16, 64, 256, 1000, 4000, 10000])
  p.add_argument("--docs", type=int, default=100_000, help="first-stage collection size")
  p.add_argument("--dim", type=int, default=256, help="CMC input width D")
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--mlp-dim", type=int, default=2048)
  p.add_argument("--block", type=int, default=128, help="query block of the attention")
  p.add_argument("--block-from", type=int, default=2048,
                 help="attend in blocks from this many candidates on (0 = never)")
  p.add_argument("--queries", type=int, default=20, help="timed queries per K (>= 3)")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--torch-max-k", type=int, default=4000)
  p.add_argument("--cpu", type=int, default=None, help="core to pin to (default: the first "
                 "this process may use)")
  p.add_argument("--json", type=str, default="", help="also write the rows here")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--itm", type=int, nargs="*", default=[],
                 help="also time BLIP-base ITM over these candidate counts (e.g. 16 64 256)")
  p.add_argument("--itm-chunk", type=int, default=None,
                 help="ITM candidates per compiled call (bounds memory; see bench/itm.py)")
  p.add_argument("--itm-repeats", type=int, default=3)
  return p.parse_args(argv)


def _pin(cpu):
  allowed = sorted(os.sched_getaffinity(0))
  cpu = allowed[0] if cpu is None else cpu
  os.sched_setaffinity(0, {cpu})
  return cpu


def _median_ms(fn, inputs) -> float:
  """Median wall-clock ms of fn(x) over `inputs`, after two warm-up calls."""
  for x in inputs[:2]:
    fn(x)
  times = []
  for x in inputs:
    t0 = time.perf_counter()
    fn(x)
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def _gemm_rate(d: int, mlp_dim: int, reps: int = 20) -> float:
  """GFLOP/s of one numpy float32 matmul of CMC's FFN shape at K = 1000, best of `reps`: how
  fast this core is right now (other processes share it), to read the CMC rows against."""
  a = np.random.default_rng(0).normal(size=(1001, d)).astype(np.float32)
  b = np.random.default_rng(1).normal(size=(d, mlp_dim)).astype(np.float32)
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - t0)
  return 2 * 1001 * d * mlp_dim / best / 1e9


def cmc_flops(k: int, d: int, layers: int, mlp_dim: int) -> tuple[float, float]:
  """(total, attention's K² part) multiply-add FLOPs (×2) of one query with K candidates."""
  l = k + 1
  linear = 2 * l * (3 * d * d + d * d + 2 * d * mlp_dim)  # q/k/v, out, FFN
  attention = 2 * 2 * l * l * d                              # QKᵀ and weights·V
  score = 2 * k * d
  return layers * (linear + attention) + score, layers * attention


def _torch_stack(params_np, d, heads, layers, mlp_dim):
  """The official gated layer stack (yc-song/cmc retriever.py) with our weights."""
  import torch
  torch.set_num_threads(1)

  class Gated(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.encoder_layer = torch.nn.TransformerEncoderLayer(d, heads, dim_feedforward=mlp_dim,
                                                            batch_first=True)
      self.weight = torch.nn.Parameter(torch.tensor([-5.0]))

    @property
    def self_attn(self):  # read by torch >= 2.1's TransformerEncoder.forward
      return self.encoder_layer.self_attn

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
      del is_causal
      out1 = self.encoder_layer(src, src_mask, src_key_padding_mask)
      w = torch.sigmoid(self.weight)
      return w * out1 + (1 - w) * src

  stack = torch.nn.TransformerEncoder(Gated(), layers, enable_nested_tensor=False).eval()

  def run(x):
    with torch.inference_mode():
      out = stack(x)
      return torch.bmm(out[:, :1], out[:, 1:].transpose(2, 1))

  del params_np  # the cost does not depend on the values
  return run


def main(argv=None):
  args = _parse(argv)
  cpu = _pin(args.cpu)
  import jax
  import jax.numpy as jnp
  from jsds_jax.index import exact
  from jsds_jax.index import synthetic
  from jsds_jax.models.tail import cmc

  rng = np.random.default_rng(args.seed)
  n, d = args.docs, args.dim
  gemm = _gemm_rate(d, args.mlp_dim)
  print(f"this core's float32 GEMM rate now (numpy, (1001, {d}) @ ({d}, {args.mlp_dim})): "
        f"{gemm:.1f} GFLOP/s: the ceiling CMC's matmuls can reach on it", flush=True)
  print(f"one thread (core {cpu}), {platform.processor() or platform.machine()}, "
        f"jax {jax.__version__}; first stage over {n} synthetic documents", flush=True)
  docs = synthetic.random_sparse(n, 30522, 100.0, 1.0, seed=args.seed)
  queries_sp = synthetic.random_sparse(args.queries, 30522, 40.0, 1.0,
                                       seed=args.seed + 1).tocsr().toarray()
  with tempfile.TemporaryDirectory() as tmp:
    index = exact.ExactIndex.build(docs, quantization="uint8")
    index = exact.ExactIndex.load(index.save(pathlib.Path(tmp) / "exact"))
    dense_docs = rng.normal(size=(n, d)).astype(np.float32)
    dense_docs /= np.linalg.norm(dense_docs, axis=1, keepdims=True)
    dense_q = dense_docs[rng.integers(0, n, args.queries)]

    module_plain = cmc.CMC(args.layers, args.heads, args.mlp_dim)
    params = cmc.init_cmc(jax.random.key(args.seed), module_plain, d)
    torch_run = None if args.no_torch else _torch_stack(params, d, args.heads, args.layers,
                                                        args.mlp_dim)
    rows = []
    for k in args.ks:
      k_eff = min(k, n)
      blocked = args.block_from and k_eff + 1 > args.block_from
      module = cmc.CMC(args.layers, args.heads, args.mlp_dim,
                       attention_block=args.block if blocked else 0)
      fn = jax.jit(lambda p, q, c, module=module: module.apply({"params": p}, q, c))
      q0 = jnp.zeros((1, d), jnp.float32)
      c0 = jnp.zeros((1, k_eff, d), jnp.float32)
      compiled = fn.lower(params, q0, c0).compile()
      mem = compiled.memory_analysis()
      mem_mb = None
      if mem is not None:
        mem_mb = (mem.argument_size_in_bytes + mem.temp_size_in_bytes
                  + mem.output_size_in_bytes) / 2 ** 20
      cands = [(jnp.asarray(dense_q[i:i + 1]),
                jnp.asarray(dense_docs[rng.integers(0, n, k_eff)][None]))
               for i in range(args.queries)]
      cmc_ms = _median_ms(lambda x: compiled(params, *x).block_until_ready(), cands)
      sparse_ms = _median_ms(lambda q: index.search(q, k_eff), list(queries_sp))

      def dense_first(q):
        s = dense_docs @ q
        return np.argpartition(-s, k_eff - 1)[:k_eff] if k_eff < n else np.argsort(-s)

      dense_ms = _median_ms(dense_first, list(dense_q))
      torch_ms = None
      if torch_run is not None and k_eff <= args.torch_max_k:
        import torch
        xs = [torch.from_numpy(np.concatenate([np.asarray(q)[:, None], np.asarray(c)], 1))
              for q, c in cands[:max(3, min(args.queries, 10))]]
        torch_ms = _median_ms(torch_run, xs)
      flops, attn = cmc_flops(k_eff, d, args.layers, args.mlp_dim)
      row = {"K": k_eff, "first_sparse_ms": sparse_ms, "first_dense_ms": dense_ms,
             "cmc_ms": cmc_ms, "cmc_over_sparse": cmc_ms / sparse_ms,
             "us_per_candidate": 1e3 * cmc_ms / k_eff, "gflop": flops / 1e9,
             "attention_share": attn / flops, "gflops_per_s": flops / 1e9 / (cmc_ms / 1e3),
             "memory_mb": mem_mb, "blocked": bool(blocked), "torch_ms": torch_ms}
      rows.append(row)
      print(json.dumps(row), flush=True)
  print(f"\nnumpy GEMM on this core: {gemm:.1f} GFLOP/s (best of 20)")
  print(f"CMC: {args.layers} layers, {args.heads} heads, FFN {args.mlp_dim}, D = {d}; "
        f"first stage over {n} documents; median of {args.queries} queries, one thread\n")
  print("| K | first stage sparse ms | first stage dense ms | CMC ms | CMC / sparse | "
        "µs per candidate | GFLOP | attention share | GFLOP/s | XLA memory MB | "
        "official PyTorch ms |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    mem = f"{r['memory_mb']:.0f}" if r["memory_mb"] is not None else "n/a"
    tms = f"{r['torch_ms']:.1f}" if r["torch_ms"] is not None else "not run"
    print(f"| {r['K']}{'¹' if r['blocked'] else ''} | {r['first_sparse_ms']:.2f} | "
          f"{r['first_dense_ms']:.2f} | {r['cmc_ms']:.2f} | {r['cmc_over_sparse']:.2f} | "
          f"{r['us_per_candidate']:.1f} | {r['gflop']:.2f} | {100 * r['attention_share']:.0f}% | "
          f"{r['gflops_per_s']:.1f} | {mem} | {tms} |")
  if any(r["blocked"] for r in rows):
    print(f"\n¹ attention in query blocks of {args.block}.")
  itm_rows = _itm_ratios(args, rows) if args.itm else []
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({"cmc": rows, "itm": itm_rows}, indent=1)
                                       if itm_rows else json.dumps(rows, indent=1))


def _itm_ratios(args, rows):
  """Times BLIP-base ITM (t2i) over each --itm candidate count on this thread and prints
  CMC(K) / ITM(N) for every measured K: below 1, CMC over K costs less than ITM over N."""
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
  import itm as itm_bench  # bench/itm.py
  itm_rows = []
  for n in args.itm:
    t = itm_bench.time_itm(n, "t2i", repeats=args.itm_repeats, chunk=args.itm_chunk)
    itm_rows.append({"N": n, "itm_ms": 1e3 * t.seconds, "runs_ms": [1e3 * r for r in t.runs]})
    print(json.dumps(itm_rows[-1]), flush=True)
  print("\nCMC over K candidates / BLIP-base ITM over N (t2i), same thread, same run:\n")
  print("| K | CMC ms | " + " | ".join(f"/ ITM over {r['N']} ({r['itm_ms']:.0f} ms)"
                                      for r in itm_rows) + " |")
  print("|---|---|" + "---|" * len(itm_rows))
  for r in rows:
    print(f"| {r['K']} | {r['cmc_ms']:.2f} | " +
          " | ".join(f"{r['cmc_ms'] / i['itm_ms']:.3f}" for i in itm_rows) + " |")
  return itm_rows


if __name__ == "__main__":
  main()
