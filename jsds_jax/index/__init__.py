"""Inverted-index retrieval over the sparse vectors of the JSDS head.

  index = build_index(caption_vectors, backend="exact", model={"backbone": "lit", ...})
  index.save("runs/demo/index-captions")
  index = load_index("runs/demo/index-captions", expected_model={"backbone": "lit"})
  ids, scores = index.search(image_vector, k=10)          # (10,) int64, (10,) float32
  ids, scores = index.batch_search(image_vectors, k=10)   # (Q, 10) each
  ids, scores = index.search(image_vector, k=10, threads=4)  # exact: one query on 4 cores
"""

from jsds_jax.index.base import SearchResult
from jsds_jax.index.base import SparseIndex
from jsds_jax.index.exact import ExactIndex
from jsds_jax.index.factory import BACKENDS
from jsds_jax.index.factory import build_index
from jsds_jax.index.factory import load_index
from jsds_jax.index.model_check import check_model
from jsds_jax.index.seismic_backend import SeismicIndex
from jsds_jax.index.storage import IndexFormatError
