r"""Retrieval latency on one CPU thread: exact sparse index, Seismic, dense brute force.

For each collection size it generates a synthetic learned-sparse collection
(`jsds_jax.index.synthetic`: Zipf-distributed terms, log1p(Exp(1)) weights) and a query set,
plus unit-norm 256-d float32 vectors for the dense baseline over the same number of documents,
and measures, one query at a time (the query arrives as the dense (V,) vector the model emits):

  exact    `ExactIndex` (uint8 per-term quantisation by default), exact top-k
  exact, query top-N terms   (--query-topk N) the same index, each query pruned to its N
           largest weights: approximate, recall@k against the unpruned search is reported
  exact, N threads   (--threads N) the same index, each query's documents split into N ranges
           searched in parallel threads (`search(..., threads=N)`): the one row that is not
           single-threaded; its results are checked to be bitwise those of one thread
  exact, numpy bincount   the same index arrays scored with numpy only (no numba), to show
           what the compiled kernel buys
  seismic  `SeismicIndex` (approximate; recall@k against exact is reported)
  numpy    dense brute force: (N, 256) @ (256,) then argpartition top-k — the baseline
  faiss    dense brute force with faiss IndexFlatIP, if faiss-cpu is installed

It reports queries/s (single-query loop), p50 / p99 latency, batch queries/s (all queries in
one `batch_search`), build time, index size, and each method's p50 speed-up over the numpy
baseline measured in the same run. Every search runs on one thread: the thread-count variables
below are set before numpy, numba or faiss are imported, faiss gets omp_set_num_threads(1), and
Seismic's batch_search num_threads=1 (only the Seismic index build uses all cores).

  .venv/bin/python bench/retrieval.py                         # 10k, 100k, 1M documents
  .venv/bin/python bench/retrieval.py --sizes 10000 --queries 100
  .venv/bin/python bench/retrieval.py --stats-from runs/demo/sparse_stats.json

`--stats-from` reads a JSON object with "doc_nnz_mean" and "query_nnz_mean" (and optionally
"zipf_exponent", "vocab_size"), e.g. the statistics of a trained model's vectors, or the
report.json that `python -m jsds_jax.eval` writes: its "sparsity" section gives
query_nnz_mean = caption_nnz and doc_nnz_mean = image_nnz (caption queries, image documents),
and when the eval's index/ (the image vectors) lies beside it, the synthetic collection takes
the trained vectors' per-term presence profile and weight distribution
(`synthetic.fit_profile`) instead of the Zipf law and log1p(Exp(1)) (`--profile zipf` keeps
those). Flags given on the command line win over the file.

  .venv/bin/python bench/retrieval.py --stats-from runs/demo/eval/report.json
"""

import os

# Seismic's Rayon pool is left alone (RAYON_NUM_THREADS=1 would also serialise its index build,
# 4x longer at 1M documents): its single-query search is sequential, and batch_search is
# given num_threads=1.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
  os.environ[_var] = "1"

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import pathlib
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from jsds_jax.index import exact
from jsds_jax.index import synthetic

DEFAULTS = dict(doc_nnz_mean=100.0, query_nnz_mean=40.0, zipf_exponent=1.0, vocab_size=30522)


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
  p.add_argument("--queries", type=int, default=200, help="queries per size")
  p.add_argument("--queries-large", type=int, default=100,
                 help="queries for sizes >= --large (the dense baseline is slow there)")
  p.add_argument("--large", type=int, default=1_000_000)
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--doc-nnz", type=float, help=f"mean non-zeros per document "
                 f"(default {DEFAULTS['doc_nnz_mean']})")
  p.add_argument("--query-nnz", type=float, help=f"mean non-zeros per query "
                 f"(default {DEFAULTS['query_nnz_mean']})")
  p.add_argument("--zipf", type=float, help=f"Zipf exponent of term frequencies "
                 f"(default {DEFAULTS['zipf_exponent']})")
  p.add_argument("--vocab", type=int, help=f"vocabulary size (default {DEFAULTS['vocab_size']})")
  p.add_argument("--stats-from", type=pathlib.Path,
                 help="JSON with doc_nnz_mean, query_nnz_mean[, zipf_exponent, vocab_size]")
  p.add_argument("--profile", choices=["auto", "zipf", "fitted"], default="auto",
                 help="term presence and weight laws: fitted from the eval index beside "
                 "--stats-from's report.json (auto: when there is one), or Zipf + log1p(Exp(1))")
  p.add_argument("--quantization", default="uint8", choices=["uint8", "uint16", "float32"])
  p.add_argument("--dense-df-fraction", type=float, default=0.1,
                 help="exact index: terms in >= this fraction of docs become dense rows "
                 "(<= 0 disables)")
  p.add_argument("--query-topk", type=int, nargs="*", default=[],
                 help="also time the exact index with each query pruned to its largest N "
                 "weights (approximate; recall against the unpruned exact search)")
  p.add_argument("--threads", type=int, nargs="*", default=[],
                 help="also time the exact index with each query split over this many threads")
  p.add_argument("--dense-dim", type=int, default=256)
  p.add_argument("--seismic-n-postings", type=int, default=3500)
  p.add_argument("--seismic-centroid-fraction", type=float, default=0.1)
  p.add_argument("--seismic-query-cut", type=int, default=20)
  p.add_argument("--seismic-heap-factor", type=float, default=0.9)
  p.add_argument("--seismic-build-threads", type=int, default=0,
                 help="threads for building the Seismic index only (0: all cores); "
                 "its searches use one")
  p.add_argument("--no-seismic", action="store_true")
  p.add_argument("--seismic-max-docs", type=int, default=None,
                 help="skip Seismic above this many documents (its build is slow on dense-ish "
                 "vectors)")
  p.add_argument("--no-numpy-taat", action="store_true",
                 help="skip the pure-numpy scoring of the exact index's arrays")
  p.add_argument("--numpy-taat-queries", type=int, default=50)
  p.add_argument("--no-faiss", action="store_true")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json-out", type=pathlib.Path, help="also write the rows as JSON here")
  return p.parse_args(argv)


def _stats(args) -> dict:
  """The generator's statistics; "presence" / "weight_quantiles" arrays when fitted."""
  stats = dict(DEFAULTS)
  if args.stats_from:
    loaded = json.loads(args.stats_from.read_text())
    if "sparsity" in loaded:  # An eval report.json: caption queries against image documents.
      loaded = dict(doc_nnz_mean=loaded["sparsity"]["image_nnz"],
                    query_nnz_mean=loaded["sparsity"]["caption_nnz"])
    stats.update({k: loaded[k] for k in DEFAULTS if k in loaded})
    index_dir = args.stats_from.parent / "index"
    if args.profile == "fitted" or (args.profile == "auto" and index_dir.is_dir()):
      trained = exact.ExactIndex.load(index_dir)
      fit = synthetic.fit_profile(trained.dequantized())
      stats.update(presence=fit["presence"], weight_quantiles=fit["weight_quantiles"],
                   vocab_size=trained.vocab_size,
                   fitted_from=dict(path=str(index_dir), num_vectors=trained.num_docs,
                                    nnz_mean=fit["nnz_mean"],
                                    active_terms=int((fit["presence"] > 0).sum()),
                                    terms_in_every_vector=int((fit["presence"] >= 1).sum()),
                                    weight_quantiles_5=[float(fit["weight_quantiles"][i])
                                                        for i in (0, 250, 500, 750, 1000)]))
  elif args.profile == "fitted":
    raise SystemExit("--profile fitted needs --stats-from an eval report.json with index/")
  for key, flag in (("doc_nnz_mean", args.doc_nnz), ("query_nnz_mean", args.query_nnz),
                    ("zipf_exponent", args.zipf), ("vocab_size", args.vocab)):
    if flag is not None:
      stats[key] = flag
  stats["vocab_size"] = int(stats["vocab_size"])
  return stats


def _printable(stats: dict) -> dict:
  return {k: v for k, v in stats.items() if k not in ("presence", "weight_quantiles")}


def _generate(num_rows: int, mean_nnz: float, stats: dict, seed: int):
  return synthetic.random_sparse(num_rows, stats["vocab_size"], mean_nnz,
                                 stats["zipf_exponent"], seed=seed,
                                 presence=stats.get("presence"),
                                 weight_quantiles=stats.get("weight_quantiles"))


def _latencies(search, queries) -> tuple[np.ndarray, list]:
  """Per-query wall-clock seconds of `search(q)` over `queries`, after two warm-up calls."""
  for q in queries[:2]:
    search(q)
  times, results = [], []
  for q in queries:
    t0 = time.perf_counter()
    results.append(search(q))
    times.append(time.perf_counter() - t0)
  return np.asarray(times), results


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def _dir_mb(path: pathlib.Path) -> float:
  return sum(f.stat().st_size for f in path.iterdir()) / 2**20


def _row(method, n, times, batch_s, num_queries, build_s, size_mb, recall=None):
  return dict(method=method, docs=n, qps=num_queries / times.sum(),
              p50_ms=1e3 * float(np.percentile(times, 50)),
              p99_ms=1e3 * float(np.percentile(times, 99)),
              batch_qps=num_queries / batch_s if batch_s else None,
              build_s=build_s, size_mb=size_mb, recall=recall)


def _dense_topk(scores: np.ndarray, k: int) -> np.ndarray:
  top = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
  order = np.argsort(-np.take_along_axis(scores, top, -1), axis=-1)
  return np.take_along_axis(top, order, -1)


def _numpy_taat(index: exact.ExactIndex, k: int):
  """The pure-numpy formulation over the same index arrays, for comparison with the kernel:
  one np.bincount over the concatenated postings of the query's terms, dense rows added as
  vectors, then argpartition."""
  slot = np.full(index.vocab_size, -1)
  slot[index.dense_terms] = np.arange(len(index.dense_terms))
  offsets, doc_ids, weights, scales = (np.asarray(index.offsets), np.asarray(index.doc_ids),
                                       np.asarray(index.weights), np.asarray(index.scales))

  def search(q):
    terms = np.flatnonzero(q)
    values = q[terms] * scales[terms]
    lists = [(offsets[t], offsets[t + 1], v) for t, v in zip(terms, values) if slot[t] < 0]
    ids = np.concatenate([doc_ids[a:b] for a, b, _ in lists] + [np.zeros(0, np.int32)])
    contrib = np.concatenate([weights[a:b] * v for a, b, v in lists] + [np.zeros(0)])
    acc = np.bincount(ids, weights=contrib, minlength=index.num_docs).astype(np.float32)
    for t, v in zip(terms, values):
      if slot[t] >= 0:
        acc += v * index.dense_rows[slot[t]]
    top = np.argpartition(-acc, k - 1)[:k]
    return top[np.argsort(-acc[top], kind="stable")]

  return search


def _recall(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
  """Mean over queries with results of |approx ∩ exact| / |exact| (padding excluded)."""
  hits = [len(set(a[a >= 0]) & set(e[e >= 0])) / (e >= 0).sum()
          for a, e in zip(approx_ids, exact_ids) if (e >= 0).any()]
  return float(np.mean(hits))


def bench_size(n: int, args, stats: dict, workdir: pathlib.Path) -> list[dict]:
  """All methods on one collection of n documents; returns one row per method."""
  rng = np.random.default_rng(args.seed + n)
  num_queries = args.queries_large if n >= args.large else args.queries
  k = args.k
  docs, gen_s = _timed(lambda: _generate(n, stats["doc_nnz_mean"], stats, args.seed + n))
  queries = _generate(num_queries, stats["query_nnz_mean"], stats, args.seed + n + 1).tocsr()
  dense_queries = queries.toarray()
  print(f"\n[{n} docs] generated in {gen_s:.1f}s: {docs.nnz / n:.1f} nnz/doc, "
        f"{queries.nnz / num_queries:.1f} nnz/query", flush=True)
  rows = []

  fraction = args.dense_df_fraction if args.dense_df_fraction > 0 else None
  index, build_s = _timed(lambda: exact.ExactIndex.build(
      docs, quantization=args.quantization, dense_df_fraction=fraction))
  path = index.save(workdir / f"exact-{n}")
  del index
  index = exact.ExactIndex.load(path)  # Searched memory-mapped, as a deployment would.
  times, results = _latencies(lambda q: index.search(q, k), dense_queries)
  exact_ids = np.stack([r.ids for r in results])
  _, batch_s = _timed(lambda: index.batch_search(queries, k))
  rows.append(_row("exact", n, times, batch_s, num_queries, build_s, _dir_mb(path)))
  print(f"  exact: built in {build_s:.1f}s, {index.meta()['num_dense_terms']} dense rows, "
        f"{index.meta()['num_postings'] / 1e6:.1f}M postings", flush=True)
  for qt in args.query_topk:
    times, results = _latencies(lambda q, qt=qt: index.search(q, k, query_topk=qt),
                                dense_queries)
    recall = _recall(np.stack([r.ids for r in results]), exact_ids)
    _, batch_s = _timed(lambda qt=qt: index.batch_search(queries, k, query_topk=qt))
    rows.append(_row(f"exact, query top-{qt} terms", n, times, batch_s, num_queries, build_s,
                     _dir_mb(path), recall))
  for nt in args.threads:
    times, results = _latencies(lambda q, nt=nt: index.search(q, k, threads=nt), dense_queries)
    ids = np.stack([r.ids for r in results])
    if not np.array_equal(ids, exact_ids):
      raise AssertionError(f"{nt} threads returned other documents than one thread")
    _, batch_s = _timed(lambda nt=nt: index.batch_search(queries, k, threads=nt))
    rows.append(_row(f"exact, {nt} threads", n, times, batch_s, num_queries, build_s,
                     _dir_mb(path)))
  if not args.no_numpy_taat:
    times, results = _latencies(_numpy_taat(index, k), dense_queries[:args.numpy_taat_queries])
    recall = _recall(np.stack(results), exact_ids[:args.numpy_taat_queries])
    rows.append(_row("exact, numpy bincount", n, times, None, len(times), build_s,
                     _dir_mb(path), recall))
  del index

  if not args.no_seismic and args.seismic_max_docs is not None and n > args.seismic_max_docs:
    print(f"  seismic skipped: {n} > --seismic-max-docs {args.seismic_max_docs}")
  elif not args.no_seismic:
    from jsds_jax.index import seismic_backend
    try:
      csr = docs.tocsr()
      sindex, build_s = _timed(lambda: seismic_backend.SeismicIndex.build(
          csr, n_postings=args.seismic_n_postings,
          centroid_fraction=args.seismic_centroid_fraction,
          query_cut=args.seismic_query_cut, heap_factor=args.seismic_heap_factor,
          num_threads=args.seismic_build_threads))
      del csr
      sindex.options["num_threads"] = 1
      spath = sindex.save(workdir / f"seismic-{n}")
      times, results = _latencies(lambda q: sindex.search(q, k), dense_queries)
      recall = _recall(np.stack([r.ids for r in results]), exact_ids)
      _, batch_s = _timed(lambda: sindex.batch_search(queries, k, num_threads=1))
      rows.append(_row("seismic", n, times, batch_s, num_queries, build_s, _dir_mb(spath),
                       recall))
      print(f"  seismic: built in {build_s:.1f}s, recall@{k} {recall:.3f}", flush=True)
      del sindex
    except ImportError as e:
      print(f"  seismic skipped: {e}")
  del docs

  emb = rng.standard_normal((n, args.dense_dim), dtype=np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  q_emb = rng.standard_normal((num_queries, args.dense_dim), dtype=np.float32)
  q_emb /= np.linalg.norm(q_emb, axis=1, keepdims=True)
  times, _ = _latencies(lambda q: _dense_topk(emb @ q, k), q_emb)

  def dense_batch():
    for a in range(0, num_queries, 32):  # Bounds the (Q, N) score matrix at 1M documents.
      _dense_topk(q_emb[a:a + 32] @ emb.T, k)

  _, batch_s = _timed(dense_batch)
  rows.append(_row("numpy dense", n, times, batch_s, num_queries, 0.0, emb.nbytes / 2**20))

  if not args.no_faiss:
    try:
      import faiss
      faiss.omp_set_num_threads(1)
      findex = faiss.IndexFlatIP(args.dense_dim)
      _, build_s = _timed(lambda: findex.add(emb))
      times, _ = _latencies(lambda q: findex.search(q[None], k), q_emb)
      _, batch_s = _timed(lambda: findex.search(q_emb, k))
      rows.append(_row("faiss flat IP", n, times, batch_s, num_queries, build_s,
                       emb.nbytes / 2**20))
      del findex
    except ImportError:
      print("  faiss skipped: pip install faiss-cpu")
  return rows


def _table(rows: list[dict], k: int) -> str:
  out = ["| docs | method | queries/s | p50 ms | p99 ms | p50 speed-up vs numpy dense | "
         f"batch queries/s | recall@{k} vs exact | build s | index MB |",
         "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    base = next(b for b in rows if b["docs"] == r["docs"] and b["method"] == "numpy dense")
    fmt = lambda v, f: "–" if v is None else format(v, f)
    out.append(
        f"| {r['docs']:,} | {r['method']} | {r['qps']:,.0f} | {r['p50_ms']:.2f} | "
        f"{r['p99_ms']:.2f} | {base['p50_ms'] / r['p50_ms']:.1f}x | "
        f"{fmt(r['batch_qps'], ',.0f')} | {fmt(r['recall'], '.3f')} | {r['build_s']:.1f} | "
        f"{r['size_mb']:,.0f} |")
  return "\n".join(out)


def main(argv=None):
  args = _parse(argv)
  stats = _stats(args)
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"stats: {_printable(stats)}; k={args.k}; quantization={args.quantization}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {load:.2f} at start", flush=True)
  workdir = pathlib.Path(tempfile.mkdtemp(prefix="jsds-bench-retrieval-"))
  rows = []
  t0 = time.perf_counter()
  try:
    for n in args.sizes:
      rows += bench_size(n, args, stats, workdir)
      print(_table([r for r in rows if r["docs"] == n], args.k), flush=True)
      if args.json_out:  # After every size, so that a later size's failure loses nothing.
        args.json_out.write_text(json.dumps(
            dict(stats=_printable(stats), args=sys.argv[1:], rows=rows), indent=2))
      shutil.rmtree(workdir)
      workdir.mkdir()
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(f"\ntotal {time.perf_counter() - t0:.0f}s; load average {load:.2f} at end\n")
  print(_table(rows, args.k))
  if args.json_out:
    args.json_out.write_text(json.dumps(dict(stats=_printable(stats), args=sys.argv[1:], rows=rows), indent=2))


if __name__ == "__main__":
  main()
