"""Choosing a backend by name: `build_index` and `load_index`."""

import os
from typing import Any

from jsds_jax.index import base
from jsds_jax.index import exact
from jsds_jax.index import model_check
from jsds_jax.index import seismic_backend
from jsds_jax.index import storage

BACKENDS: dict[str, type[base.SparseIndex]] = {
    exact.ExactIndex.backend: exact.ExactIndex,
    seismic_backend.SeismicIndex.backend: seismic_backend.SeismicIndex,
}


def _backend(name: str) -> type[base.SparseIndex]:
  if name not in BACKENDS:
    raise ValueError(f"unknown index backend {name!r}; known: {sorted(BACKENDS)}")
  return BACKENDS[name]


def build_index(docs, backend: str = "exact", *, model: dict[str, Any] | None = None,
                **options) -> base.SparseIndex:
  """Indexes (N, V) non-negative document vectors (dense array or scipy sparse matrix).

  Args:
    docs: the vectors to retrieve: image vectors for caption queries, or the reverse.
    backend: "exact" (`exact.ExactIndex`) or "seismic" (approximate, `pyseismic-lsr`).
    model: metadata of the model that produced `docs`, saved with the index.
    **options: the backend's build options.
  """
  return _backend(backend).build(docs, model=model, **options)


def load_index(path: str | os.PathLike,
               expected_model: dict[str, Any] | None = None) -> base.SparseIndex:
  """Reads an index directory of any backend; checks its model metadata if given one."""
  index = _backend(storage.read_meta(path).get("backend")).load(path)
  if expected_model is not None:
    model_check.check_model(index, expected_model)
  return index
