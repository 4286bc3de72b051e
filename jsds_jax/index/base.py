"""The interface every sparse-index backend implements."""

import abc
import os
import pathlib
from typing import Any, ClassVar, NamedTuple

import numpy as np


class SearchResult(NamedTuple):
  """Top-k documents of one query ((k,) arrays) or of a batch ((Q, k) arrays).

  Attributes:
    ids: int64 document rows (positions in the `docs` the index was built from), best first;
      -1 pads when fewer than k documents score above zero.
    scores: float32 dot products, non-increasing; -inf pads.
  """
  ids: np.ndarray
  scores: np.ndarray


class SparseIndex(abc.ABC):
  """Retrieval by dot product over non-negative sparse vectors.

  The documents can be either modality: pass image vectors to search with caption queries, or
  caption vectors to search with image queries.

  Attributes:
    backend: the name `build_index(..., backend=)` and meta.json use.
    vocab_size: V, the width of documents and queries.
    num_docs: N.
    model: free-form JSON-serialisable metadata of the model whose vectors were indexed (e.g.
      backbone, vocabulary hash, checkpoint id); saved with the index and compared by
      `check_model`. Set it at build time (`model=`) or edit the dict before `save`.
  """
  backend: ClassVar[str]
  vocab_size: int
  num_docs: int
  model: dict[str, Any]

  @classmethod
  @abc.abstractmethod
  def build(cls, docs, *, model: dict[str, Any] | None = None, **options) -> "SparseIndex":
    """Indexes `docs`, an (N, V) dense array or scipy sparse matrix of non-negative weights."""

  @classmethod
  @abc.abstractmethod
  def load(cls, path: str | os.PathLike) -> "SparseIndex":
    """Reads an index directory written by `save`."""

  @abc.abstractmethod
  def meta(self) -> dict[str, Any]:
    """What `save` writes to meta.json: backend, sizes, options, `model`."""

  @abc.abstractmethod
  def save(self, path: str | os.PathLike, overwrite: bool = False) -> pathlib.Path:
    """Writes the index directory atomically; returns its path."""

  @abc.abstractmethod
  def search(self, query, k: int) -> SearchResult:
    """Top-k of one query: a (V,) vector or (1, V) dense / sparse row. Returns (k,) arrays."""

  @abc.abstractmethod
  def batch_search(self, queries, k: int) -> SearchResult:
    """Top-k of each row of a (Q, V) dense array or sparse matrix. Returns (Q, k) arrays."""


def check_positive_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


def check_k(k) -> int:
  return check_positive_int(k, "k")


def check_topk_option(value, name: str) -> int | None:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be None or a positive integer, got {value!r}")
  return int(value)
