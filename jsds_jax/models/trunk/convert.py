"""Helpers for PyTorch -> Flax weight conversion.

A converter is a pure function from a flat PyTorch state dict ({"a.b.weight": array}) to a
nested Flax params dict. It reads tensors through a `StateDictReader`, which remembers what was
read, and finishes with `reader.assert_all_used()` and `assert_same_structure(params, init)` so
that a renamed or missing tensor fails loudly instead of leaving a random initialisation behind.
"""

from collections.abc import Iterable, Mapping
import re

import jax
import numpy as np


class ConversionError(ValueError):
  """A state dict does not match the module it is converted into."""


class StateDictReader:
  """Reads tensors from a flat state dict and records which ones were used.

  Args:
    state_dict: {name: array}; values may be numpy arrays or anything `np.asarray` accepts.
    source: a human-readable name for error messages (a file path or model id).
    ignore: regexes of tensor names that are allowed to stay unused (e.g. buffers like
      `position_ids`, or heads we do not convert).
  """

  def __init__(self, state_dict: Mapping[str, object], source: str = "state dict",
               ignore: Iterable[str] = ()):
    self._tensors = dict(state_dict)
    self._used: set[str] = set()
    self._ignore = [re.compile(p) for p in ignore]
    self.source = source

  def __contains__(self, name: str) -> bool:
    return name in self._tensors

  def keys(self):
    return self._tensors.keys()

  def get(self, name: str, dtype=np.float32) -> np.ndarray:
    """Returns tensor `name` as a numpy array and marks it used."""
    if name not in self._tensors:
      close = [k for k in self._tensors if k.rsplit(".", 1)[0] == name.rsplit(".", 1)[0]]
      hint = f" Tensors with the same prefix: {close[:5]}" if close else ""
      raise ConversionError(f"{self.source}: missing tensor '{name}'.{hint}")
    self._used.add(name)
    value = np.asarray(self._tensors[name])
    return value.astype(dtype) if dtype is not None else value

  def dense(self, prefix: str, bias: bool = True) -> dict:
    """A torch nn.Linear `prefix` as a Flax Dense: kernel (in, out) = weight.T."""
    out = {"kernel": self.get(f"{prefix}.weight").T}
    if bias:
      out["bias"] = self.get(f"{prefix}.bias")
    return out

  def layer_norm(self, prefix: str) -> dict:
    """A torch nn.LayerNorm `prefix` as a Flax LayerNorm: weight -> scale."""
    return {"scale": self.get(f"{prefix}.weight"), "bias": self.get(f"{prefix}.bias")}

  def embedding(self, prefix: str) -> dict:
    """A torch nn.Embedding `prefix` as a Flax Embed."""
    return {"embedding": self.get(f"{prefix}.weight")}

  def conv(self, prefix: str, bias: bool = True) -> dict:
    """A torch Conv2d (out, in/groups, kh, kw) as a Flax Conv kernel (kh, kw, in/groups, out)."""
    out = {"kernel": self.get(f"{prefix}.weight").transpose(2, 3, 1, 0)}
    if bias:
      out["bias"] = self.get(f"{prefix}.bias")
    return out

  def unused(self) -> list[str]:
    return sorted(k for k in self._tensors
                  if k not in self._used and not any(p.search(k) for p in self._ignore))

  def assert_all_used(self) -> None:
    left = self.unused()
    if left:
      raise ConversionError(
          f"{self.source}: {len(left)} tensors were not used by the conversion, e.g. {left[:8]}")


def assert_same_structure(params, reference, source: str = "converted params") -> None:
  """Checks that `params` fills exactly the tree of `reference` with the same shapes.

  Args:
    params: the converted params tree.
    reference: a params tree from `module.init` (or `jax.eval_shape` of it).
  """
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
  ref = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(reference)}
  missing = sorted(set(ref) - set(flat))
  extra = sorted(set(flat) - set(ref))
  if missing or extra:
    raise ConversionError(
        f"{source}: params tree mismatch; missing {missing[:8]}, unexpected {extra[:8]}")
  bad = [(k, np.shape(flat[k]), tuple(ref[k].shape)) for k in ref
         if tuple(np.shape(flat[k])) != tuple(ref[k].shape)]
  if bad:
    raise ConversionError(f"{source}: shape mismatch (name, got, expected): {bad[:8]}")
