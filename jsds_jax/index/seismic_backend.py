"""Approximate retrieval with Seismic (`pip install pyseismic-lsr`), behind `SparseIndex`.

Seismic (Bruch et al., SIGIR 2024) prunes each posting list to its largest weights, clusters it
into blocks with a summary vector each, and at query time skips blocks whose summary cannot
beat the current top-k. It is approximate: recall against `ExactIndex` depends on `query_cut`
(query terms used) and `heap_factor` (how eagerly blocks are skipped), both fixed at build time
and overridable per search.

Its Python API names vector components by strings; we give it the term ids as decimal strings
("42") and the document rows as ids ("0", "1", ...), so results map straight back to rows. It
keeps weights at reduced precision internally, and it skips documents with no non-zero weight.
The directory holds Seismic's own serialised index (`index.index.seismic`, read whole on load:
it is not memory-mapped) and meta.json.
"""

import contextlib
import os
import pathlib
from typing import Any

import numpy as np

from jsds_jax.index import base
from jsds_jax.index import inputs
from jsds_jax.index import pruning
from jsds_jax.index import storage

_FILE_PREFIX = "index"
_FILE = _FILE_PREFIX + ".index.seismic"
_BUILD_DEFAULT = object()


def _seismic():
  try:
    import seismic  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the 'seismic' index backend needs pyseismic-lsr: "
                      "pip install 'jsds-jax[seismic]' (or pip install pyseismic-lsr)") from e
  return seismic


@contextlib.contextmanager
def _quiet_stdout(quiet: bool):
  """Silences Seismic's progress prints (Rust writes straight to file descriptor 1)."""
  if not quiet:
    yield
    return
  saved = os.dup(1)
  try:
    with open(os.devnull, "w") as devnull:
      os.dup2(devnull.fileno(), 1)
      yield
  finally:
    os.dup2(saved, 1)
    os.close(saved)


class SeismicIndex(base.SparseIndex):
  """Approximate top-k by dot product with the Seismic inverted index."""
  backend = "seismic"

  def __init__(self, index, meta: dict[str, Any]):
    """Wraps a `seismic.SeismicIndex`; use `build` or `load`."""
    self._index = index
    self.vocab_size = int(meta["vocab_size"])
    self.num_docs = int(meta["num_docs"])
    self.options = dict(meta["options"])
    self.query_topk = meta["query_topk"]
    self.model = dict(meta.get("model") or {})
    self._string = _seismic().get_seismic_string()

  @classmethod
  def build(cls, docs, *, n_postings: int = 3500, centroid_fraction: float = 0.1,
            summary_energy: float = 0.4, doc_cut: int = 15, max_fraction: float = 1.5,
            query_cut: int = 20, heap_factor: float = 0.9, query_topk: int | None = None,
            num_threads: int = 1, verbose: bool = False,
            model: dict[str, Any] | None = None) -> "SeismicIndex":
    """Indexes documents with Seismic.

    Args:
      docs: (N, V) non-negative weights: dense array or scipy sparse matrix.
      n_postings: average postings kept per term (Seismic's λ); longer lists are pruned.
      centroid_fraction: fraction of a list's postings that become block centroids.
      summary_energy: fraction of a block's weight mass its summary keeps (α).
      doc_cut: document terms used when clustering a list into blocks.
      max_fraction: cap of a list's length, in units of n_postings.
      query_cut: default number of a query's largest terms Seismic scans.
      heap_factor: default block-skipping factor in (0, 1]; larger is more exact.
      query_topk: default pruning of each query to its largest weights before Seismic sees it.
      num_threads: threads for building and `batch_search` (0: all cores).
      verbose: let Seismic print its build progress.
      model: metadata of the model that produced `docs` (see `SparseIndex.model`).
    """
    seismic = _seismic()
    query_topk = base.check_topk_option(query_topk, "query_topk")
    csr = inputs.to_sparse(docs, layout="csr", name="docs")
    num_docs, vocab_size = csr.shape
    dataset = seismic.SeismicDataset(dim=vocab_size)
    dataset.add_documents_by_id([str(i) for i in range(num_docs)],
                                csr.indices.astype(np.int64), csr.data.astype(np.float32),
                                csr.indptr.astype(np.int64))
    del csr
    with _quiet_stdout(not verbose):
      index = seismic.SeismicIndex.build_from_dataset(
          dataset, n_postings=n_postings, centroid_fraction=centroid_fraction,
          summary_energy=summary_energy, max_fraction=max_fraction, doc_cut=doc_cut,
          num_threads=num_threads)
    options = dict(n_postings=n_postings, centroid_fraction=centroid_fraction,
                   summary_energy=summary_energy, doc_cut=doc_cut, max_fraction=max_fraction,
                   query_cut=query_cut, heap_factor=heap_factor, num_threads=num_threads)
    meta = dict(vocab_size=vocab_size, num_docs=num_docs, options=options,
                query_topk=query_topk,
                model=storage.json_normalise(dict(model or {}), "model metadata"))
    return cls(index, meta)

  def meta(self) -> dict[str, Any]:
    """What `save` writes to meta.json (besides the format fields)."""
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return dict(backend=self.backend, vocab_size=self.vocab_size, num_docs=self.num_docs,
                options=self.options, query_topk=self.query_topk,
                seismic_version=metadata.version("pyseismic-lsr"),
                model=storage.json_normalise(self.model, "model metadata"))

  def save(self, path: str | os.PathLike, overwrite: bool = False) -> pathlib.Path:
    meta = self.meta()

    def write(tmp: pathlib.Path) -> None:
      with _quiet_stdout(True):
        self._index.save(str(tmp / _FILE_PREFIX))
      storage.write_meta(tmp, meta)

    return storage.write_atomically(path, write, overwrite=overwrite)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "SeismicIndex":
    meta = storage.read_meta(path)
    if meta.get("backend") != cls.backend:
      raise storage.IndexFormatError(
          f"{path} holds a {meta.get('backend')!r} index, not {cls.backend!r}")
    f = pathlib.Path(path).expanduser() / _FILE
    if not f.is_file():
      raise storage.IndexFormatError(f"{path} is missing {_FILE}")
    with _quiet_stdout(True):
      index = _seismic().SeismicIndex.load(str(f))
    return cls(index, meta)

  def _prepare(self, rows: inputs.CsrRows, k, query_topk):
    k = base.check_k(k)
    if query_topk is _BUILD_DEFAULT:
      query_topk = self.query_topk
    rows = pruning.prune_rows(rows, base.check_topk_option(query_topk, "query_topk"))
    return rows, k

  def _results(self, hits, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(k,) ids and scores from Seismic's [(query_id, score, doc_id), ...], padded."""
    ids = np.full(k, -1, np.int64)
    scores = np.full(k, -np.inf, np.float32)
    hits = [(s, int(d)) for _, s, d in hits if s > 0][:k]
    # Seismic returns best first; sorting again fixes the tie order to (score desc, id asc).
    hits.sort(key=lambda h: (-h[0], h[1]))
    for r, (s, d) in enumerate(hits):
      scores[r], ids[r] = s, d
    return ids, scores

  def search(self, query, k: int, query_cut: int | None = None,
             heap_factor: float | None = None, query_topk=_BUILD_DEFAULT) -> base.SearchResult:
    """Top-k of one query; `query_cut` / `heap_factor` override the build defaults."""
    rows, k = self._prepare(inputs.query_rows(query, self.vocab_size, single=True), k,
                            query_topk)
    if len(rows.indices) == 0:
      return base.SearchResult(*self._results([], k))
    hits = self._index.search(
        "0", rows.indices.astype(self._string), rows.data.astype(np.float32), k=k,
        query_cut=query_cut or self.options["query_cut"],
        heap_factor=heap_factor or self.options["heap_factor"])
    return base.SearchResult(*self._results(hits, k))

  def batch_search(self, queries, k: int, query_cut: int | None = None,
                   heap_factor: float | None = None, query_topk=_BUILD_DEFAULT,
                   num_threads: int | None = None) -> base.SearchResult:
    """Top-k of each row of a (Q, V) batch, on `num_threads` threads (build default)."""
    rows, k = self._prepare(inputs.query_rows(queries, self.vocab_size, single=False), k,
                            query_topk)
    ids = np.full((rows.num_rows, k), -1, np.int64)
    scores = np.full((rows.num_rows, k), -np.inf, np.float32)
    todo = np.flatnonzero(np.diff(rows.indptr) > 0)  # Seismic is not asked about empty rows.
    if len(todo):
      spans = [(rows.indptr[r], rows.indptr[r + 1]) for r in todo]
      hits = self._index.batch_search(
          np.array([str(r) for r in todo], dtype=self._string),
          [rows.indices[a:b].astype(self._string) for a, b in spans],
          [rows.data[a:b].astype(np.float32) for a, b in spans], k=k,
          query_cut=query_cut or self.options["query_cut"],
          heap_factor=heap_factor or self.options["heap_factor"],
          num_threads=self.options["num_threads"] if num_threads is None else num_threads)
      # Results do not come back in query order: each hit names its query.
      for row_hits in hits:
        if row_hits:
          r = int(row_hits[0][0])
          ids[r], scores[r] = self._results(row_hits, k)
    return base.SearchResult(ids, scores)
