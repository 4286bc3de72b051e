"""Inverted-index retrieval: exact = brute force, storage, errors, Seismic recall."""

import json

import numpy as np
import pytest
import scipy.sparse as sp

from jsds_jax import index as ji
from jsds_jax.index import kernels
from jsds_jax.index import synthetic

VOCAB = 300
NUM_DOCS = 5000  # More than one 4096-document chunk of the kernel.


@pytest.fixture(scope="module")
def docs():
  return synthetic.random_sparse(NUM_DOCS, VOCAB, mean_nnz=20, exponent=1.0, seed=0).tocsr()


@pytest.fixture(scope="module")
def queries():
  q = synthetic.random_sparse(24, VOCAB, mean_nnz=8, exponent=1.0, seed=1).toarray()
  q[3] = 0  # An empty query.
  return q


def _reference_weights(dense: np.ndarray, dtype: str, scale: str) -> np.ndarray:
  """The documented scheme, re-implemented: ŵ = s_t · round(w / s_t), s_t = max / b."""
  if dtype == "float32":
    return dense.astype(np.float64)
  top = float(np.iinfo(dtype).max)
  m = dense.max(axis=0) if scale == "term" else np.full(dense.shape[1], dense.max())
  s = np.float32(m.astype(np.float64) / top).astype(np.float64)
  s[s == 0] = 1.0
  return np.clip(np.rint(dense.astype(np.float64) / s), 0, top) * s


def _reference_prune(dense: np.ndarray, topk) -> np.ndarray:
  """Keeps each row's topk largest entries, ties to the smaller column (a plain loop)."""
  if topk is None:
    return dense
  out = np.zeros_like(dense)
  for r, row in enumerate(dense):
    cols = np.flatnonzero(row)
    keep = cols[np.lexsort((cols, -row[cols]))[:topk]]
    out[r, keep] = row[keep]
  return out


def _assert_brute_force(result: ji.SearchResult, ref: np.ndarray, k: int, tol: float = 1e-5):
  """Result rows are the top-k of `ref` ((Q, N) scores) up to tie order, sorted, padded."""
  assert result.ids.shape == result.scores.shape == (ref.shape[0], k)
  assert result.ids.dtype == np.int64 and result.scores.dtype == np.float32
  for q, (ids, scores) in enumerate(zip(result.ids, result.scores)):
    positive = np.flatnonzero(ref[q] > 0)
    n = min(k, len(positive))
    assert (ids[:n] >= 0).all() and (ids[n:] == -1).all(), (q, ids)
    assert np.isneginf(scores[n:]).all()
    assert len(set(ids[:n].tolist())) == n
    # The returned scores are the documents' true scores, and they are the n best ones.
    np.testing.assert_allclose(scores[:n], ref[q, ids[:n]], rtol=tol, atol=tol)
    np.testing.assert_allclose(scores[:n], np.sort(ref[q, positive])[::-1][:n], rtol=tol,
                               atol=tol)
    for a in range(n - 1):  # Best first; equal scores by ascending id.
      assert scores[a] > scores[a + 1] or (scores[a] == scores[a + 1] and ids[a] < ids[a + 1])


@pytest.mark.parametrize("quantization,scale,dense,doc_topk,query_topk", [
    ("uint8", "term", 0.1, None, None),
    ("uint8", "global", None, None, None),
    ("uint16", "term", 0.05, None, None),
    ("float32", "term", 0.1, None, None),
    ("float32", "term", None, None, None),
    ("uint8", "term", 0.1, 10, 4),
    ("float32", "global", None, 5, None),
])
def test_exact_equals_brute_force(docs, queries, quantization, scale, dense, doc_topk,
                                  query_topk):
  index = ji.build_index(docs, quantization=quantization, scale=scale,
                         dense_df_fraction=dense, doc_topk=doc_topk, query_topk=query_topk)
  assert (index.meta()["num_dense_terms"] > 0) == (dense is not None)
  d = _reference_weights(_reference_prune(docs.toarray(), doc_topk), quantization, scale)
  np.testing.assert_allclose(index.dequantized().toarray(), d, rtol=1e-6, atol=1e-7)
  ref = _reference_prune(queries, query_topk).astype(np.float64) @ d.T
  for k in (1, 7, 100, NUM_DOCS + 3):
    batched = index.batch_search(queries, k)
    _assert_brute_force(batched, ref, k)
    for q in (0, 3, 5):  # One query at a time gives bitwise the same result.
      single = index.search(queries[q], k)
      np.testing.assert_array_equal(single.ids, batched.ids[q])
      np.testing.assert_array_equal(single.scores, batched.scores[q])
    # So does splitting the documents over threads (here two ranges of whole 4096-doc chunks).
    threaded = index.batch_search(queries, k, threads=3)
    np.testing.assert_array_equal(threaded.ids, batched.ids)
    np.testing.assert_array_equal(threaded.scores, batched.scores)
    single = index.search(queries[5], k, threads=2)
    np.testing.assert_array_equal(single.ids, batched.ids[5])


def test_float32_index_equals_float_brute_force(docs, queries):
  index = ji.build_index(docs, quantization="float32")
  ref = queries.astype(np.float64) @ docs.toarray().astype(np.float64).T
  _assert_brute_force(index.batch_search(queries, 20), ref, 20, tol=1e-5)


@pytest.mark.parametrize("quantization,scale", [("uint8", "term"), ("uint8", "global"),
                                                ("uint16", "term")])
def test_quantisation_error_within_documented_bound(docs, queries, quantization, scale):
  index = ji.build_index(docs, quantization=quantization, scale=scale)
  exact_scores = queries.astype(np.float64) @ docs.toarray().astype(np.float64).T
  error = np.abs(index.dequantized().toarray() @ queries.T - exact_scores.T).max(axis=0)
  bound = index.score_error_bound(queries)
  assert np.all(error <= bound * (1 + 1e-5) + 1e-6)
  assert bound.max() > 0 and error.max() > 0  # The bound is not vacuous here.
  if quantization == "uint16":
    assert bound.max() < 1e-3


def test_query_forms_agree(docs, queries):
  index = ji.build_index(docs)
  want = index.batch_search(queries, 10)
  for q in (0, 3, 7):
    for form in (queries[q], queries[q][None], sp.csr_matrix(queries[q][None]),
                 sp.coo_array(queries[q][None])):
      got = index.search(form, 10)
      np.testing.assert_array_equal(got.ids, want.ids[q])
      np.testing.assert_array_equal(got.scores, want.scores[q])
  got = index.batch_search(sp.csr_matrix(queries), 10)
  np.testing.assert_array_equal(got.ids, want.ids)
  # Explicit zeros stored in a sparse query are ignored like absent terms.
  coo = sp.coo_matrix(queries[:2])
  with_zeros = sp.csr_matrix((np.r_[coo.data, 0.0, 0.0], (np.r_[coo.row, 0, 1],
                              np.r_[coo.col, 299, 298])), shape=(2, VOCAB))
  got = index.batch_search(with_zeros, 10)
  np.testing.assert_array_equal(got.ids, want.ids[:2])


def test_dense_input_docs_and_query_pruning_override(docs, queries):
  a = ji.build_index(docs, query_topk=3)
  b = ji.build_index(docs.toarray())
  np.testing.assert_array_equal(a.batch_search(queries, 5, query_topk=None).ids,
                                b.batch_search(queries, 5).ids)
  np.testing.assert_array_equal(a.batch_search(queries, 5).ids,
                                b.batch_search(queries, 5, query_topk=3).ids)


def test_ties_resolve_to_smaller_doc_id():
  docs = np.zeros((9000, 5), np.float32)
  docs[:, 2] = 1.0
  docs[[8500, 10, 4100], 2] = 2.0
  index = ji.build_index(docs, quantization="float32")
  for threads in (1, 3):  # With 3 threads, each tied document is in another range.
    result = index.search(np.array([0, 0, 1, 0, 0], np.float32), 6, threads=threads)
    np.testing.assert_array_equal(result.ids, [10, 4100, 8500, 0, 1, 2])
    np.testing.assert_array_equal(result.scores, [2, 2, 2, 1, 1, 1])
  result = index.search(np.array([0, 1, 0, 0, 0], np.float32), 3)  # No document has term 1.
  np.testing.assert_array_equal(result.ids, [-1, -1, -1])


@pytest.mark.parametrize("num_docs,parts", [(5000, 3), (9000, 3), (100, 4), (40_000, 4),
                                             (8192, 2), (0, 2)])
def test_doc_ranges_cover_the_collection_in_whole_chunks(num_docs, parts):
  ranges = kernels.doc_ranges(num_docs, parts)
  chunks = -(-num_docs // kernels.CHUNK)
  assert len(ranges) == min(parts, chunks)
  if ranges:  # Contiguous, from 0 to N.
    assert [lo for lo, _ in ranges] == [0] + [hi for _, hi in ranges[:-1]]
    assert ranges[-1][1] == num_docs
  assert all(lo % kernels.CHUNK == 0 and hi > lo for lo, hi in ranges)


def test_threads_must_be_a_positive_integer(docs, queries):
  index = ji.build_index(docs)
  for bad in (0, -1, 1.5, None, True):
    with pytest.raises(ValueError, match="threads must be a positive integer"):
      index.search(queries[0], 5, threads=bad)


def test_save_load_round_trip_memory_mapped(tmp_path, docs, queries):
  model = {"backbone": "lit", "vocab_hash": "abc123", "checkpoint": 1000}
  index = ji.build_index(docs, quantization="uint8", doc_topk=15, model=model)
  want = index.batch_search(queries, 10)
  path = index.save(tmp_path / "idx")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # No temporary left behind.
  assert {p.name for p in path.iterdir()} == {
      "meta.json", "offsets.npy", "doc_ids.npy", "weights.npy", "scales.npy",
      "dense_terms.npy", "dense_rows.npy"}
  meta = json.loads((path / "meta.json").read_text())
  assert meta["backend"] == "exact" and meta["num_docs"] == NUM_DOCS
  assert meta["vocab_size"] == VOCAB and meta["model"] == model
  assert meta["quantization"]["dtype"] == "uint8" and meta["pruning"]["doc_topk"] == 15

  loaded = ji.load_index(path, expected_model={"backbone": "lit", "checkpoint": 1000})
  assert isinstance(loaded, ji.ExactIndex)
  for name in ("offsets", "doc_ids", "weights", "scales", "dense_rows"):
    assert isinstance(getattr(loaded, name), np.memmap), name
    np.testing.assert_array_equal(getattr(loaded, name), getattr(index, name))
  got = loaded.batch_search(queries, 10)
  np.testing.assert_array_equal(got.ids, want.ids)
  np.testing.assert_array_equal(got.scores, want.scores)
  np.testing.assert_array_equal(loaded.search(queries[0], 10).ids, want.ids[0])
  assert loaded.doc_topk == 15 and loaded.model == model

  with pytest.raises(FileExistsError):
    index.save(path)
  other = ji.build_index(docs[:100], model={"backbone": "other"})
  other.save(path, overwrite=True)
  assert ji.load_index(path).num_docs == 100
  assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_check_model_names_the_mismatched_field(docs):
  index = ji.build_index(docs[:50], model={"backbone": "lit", "vocab_hash": "abc",
                                           "dims": (1, 2)})
  ji.check_model(index, {"backbone": "lit", "dims": [1, 2]})
  with pytest.raises(ValueError, match="'vocab_hash' is 'abc', expected 'xyz'"):
    ji.check_model(index, {"backbone": "lit", "vocab_hash": "xyz"})
  with pytest.raises(ValueError, match="no field 'checkpoint'"):
    ji.check_model(index, {"checkpoint": 3})


def test_load_index_refuses_another_model(tmp_path, docs):
  path = ji.build_index(docs[:50], model={"backbone": "blip"}).save(tmp_path / "i")
  with pytest.raises(ValueError, match="'backbone' is 'blip', expected 'albef'"):
    ji.load_index(path, expected_model={"backbone": "albef"})


def test_bad_inputs(tmp_path, docs, queries):
  index = ji.build_index(docs)
  with pytest.raises(ValueError, match="vocabulary size 301 != index vocabulary size 300"):
    index.search(np.ones(VOCAB + 1, np.float32), 5)
  with pytest.raises(ValueError, match="vocabulary size 30522 != index vocabulary size 300"):
    index.batch_search(sp.csr_matrix((2, 30522), dtype=np.float32), 5)
  with pytest.raises(ValueError, match=r"\(V,\) vector or a \(1, V\) row"):
    index.search(queries[:2], 5)
  with pytest.raises(ValueError, match=r"\(Q, V\) matrix"):
    index.batch_search(queries[0], 5)
  with pytest.raises(ValueError, match="negative"):
    index.search(-queries[0], 5)
  bad = queries[0].copy()
  bad[0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    index.search(bad, 5)
  for k in (0, -1, 2.5, True):
    with pytest.raises(ValueError, match="k must be a positive integer"):
      index.search(queries[0], k)
  with pytest.raises(ValueError, match="negative"):
    ji.build_index(-docs[:10])
  with pytest.raises(ValueError, match="2-D"):
    ji.build_index(np.ones(5))
  with pytest.raises(ValueError, match="quantization must be one of"):
    ji.build_index(docs, quantization="int4")
  with pytest.raises(ValueError, match="scale must be one of"):
    ji.build_index(docs, scale="row")
  with pytest.raises(ValueError, match="doc_topk"):
    ji.build_index(docs, doc_topk=0)
  with pytest.raises(ValueError, match="dense_df_fraction"):
    ji.build_index(docs, dense_df_fraction=1.5)
  with pytest.raises(ValueError, match="unknown index backend 'faiss'"):
    ji.build_index(docs, backend="faiss")
  with pytest.raises(ValueError, match="JSON-serialisable"):
    ji.build_index(docs[:10], model={"step": object()})
  with pytest.raises(ji.IndexFormatError, match="not an index directory"):
    ji.load_index(tmp_path)
  path = index.save(tmp_path / "i")
  (path / "weights.npy").unlink()
  with pytest.raises(ji.IndexFormatError, match="missing weights.npy"):
    ji.load_index(path)
  meta = json.loads((path / "meta.json").read_text())
  (path / "meta.json").write_text(json.dumps({**meta, "backend": "seismic"}))
  with pytest.raises(ji.IndexFormatError, match="not 'exact'"):
    ji.ExactIndex.load(path)


def test_synthetic_collection_statistics():
  a = synthetic.random_sparse(4000, 1000, mean_nnz=30, exponent=1.0, seed=3)
  b = synthetic.random_sparse(4000, 1000, mean_nnz=30, exponent=1.0, seed=3)
  assert (a != b).nnz == 0
  assert a.shape == (4000, 1000) and a.has_sorted_indices
  assert abs(a.nnz / 4000 - 30) < 1.0
  df = np.diff(a.indptr)
  assert df[:10].sum() > 10 * df[-100:].sum()  # Zipf: the head terms dominate.
  assert a.data.min() > 0


def test_seismic_recall_and_round_trip(tmp_path, docs, queries):
  pytest.importorskip("seismic", reason="pyseismic-lsr not installed (extra 'seismic')")
  exact_ids = ji.build_index(docs).batch_search(queries, 10).ids
  index = ji.build_index(docs, backend="seismic", query_cut=30, heap_factor=0.9,
                         model={"backbone": "lit"})
  assert isinstance(index, ji.SeismicIndex)
  got = index.batch_search(queries, 10)
  hits = [len(set(a[a >= 0]) & set(e[e >= 0])) / (e >= 0).sum()
          for a, e in zip(got.ids, exact_ids) if (e >= 0).any()]
  assert np.mean(hits) >= 0.9, np.mean(hits)
  assert (got.ids[3] == -1).all()  # The empty query.
  for q in range(len(queries)):  # Batched results land on their own queries' rows.
    single = index.search(queries[q], 10)
    np.testing.assert_array_equal(single.ids, got.ids[q])
    np.testing.assert_allclose(single.scores, got.scores[q])

  path = index.save(tmp_path / "s")
  loaded = ji.load_index(path, expected_model={"backbone": "lit"})
  assert isinstance(loaded, ji.SeismicIndex) and loaded.num_docs == NUM_DOCS
  np.testing.assert_array_equal(loaded.batch_search(queries, 10).ids, got.ids)
  with pytest.raises(ValueError, match="vocabulary size 30522 != index vocabulary size 300"):
    loaded.search(np.ones(30522, np.float32), 5)
  with pytest.raises(ji.IndexFormatError, match="not 'exact'"):
    ji.ExactIndex.load(path)


def test_synthetic_fitted_profile():
  """`fit_profile` of one collection drives `random_sparse` to the same statistics."""
  trained = synthetic.random_sparse(2000, 500, mean_nnz=60, exponent=1.2, seed=4)
  fit = synthetic.fit_profile(trained)
  assert abs(fit["nnz_mean"] - trained.nnz / 2000) < 1e-9
  assert np.all(np.diff(fit["presence"]) <= 0) and fit["presence"].sum() == pytest.approx(
      fit["nnz_mean"])
  a = synthetic.random_sparse(3000, 500, mean_nnz=fit["nnz_mean"], seed=5,
                              presence=fit["presence"],
                              weight_quantiles=fit["weight_quantiles"])
  assert abs(a.nnz / 3000 - fit["nnz_mean"]) < 1.0
  q = fit["weight_quantiles"]
  assert a.data.min() > 0 and a.data.max() <= q[-1] + 1e-6
  assert np.median(a.data) == pytest.approx(q[len(q) // 2], rel=0.05)
  # Rescaled to fewer non-zeros: the mean follows, always-present terms stay capped at 1.
  b = synthetic.random_sparse(3000, 500, mean_nnz=20, seed=6, presence=fit["presence"])
  assert abs(b.nnz / 3000 - 20) < 1.0
  np.testing.assert_allclose(synthetic.scale_presence(fit["presence"], 20).sum(), 20)
