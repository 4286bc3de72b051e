"""Refusing an index built from another model's vectors."""

from collections.abc import Mapping
from typing import Any

from jsds_jax.index import base
from jsds_jax.index import storage


def check_model(index: base.SparseIndex, expected: Mapping[str, Any]) -> None:
  """Raises ValueError unless the index's `model` metadata agrees with `expected`.

  Every key of `expected` must be present in `index.model` with an equal value (compared as
  they read back from JSON, so a tuple equals the list it was saved as); keys that only the
  index has are ignored, so callers check the fields they care about.

  Args:
    index: a built or loaded index.
    expected: e.g. {"backbone": "lit", "vocab_hash": "...", "checkpoint": "step_1000"}.
  """
  stored = storage.json_normalise(dict(index.model), "index model metadata")
  for field, want in storage.json_normalise(dict(expected), "expected model metadata").items():
    if field not in stored:
      raise ValueError(
          f"index model metadata has no field {field!r} (expected {want!r}); it was built "
          f"with model={stored!r}")
    if stored[field] != want:
      raise ValueError(
          f"index model metadata field {field!r} is {stored[field]!r}, expected {want!r}: "
          "the index was built from another model's vectors")
