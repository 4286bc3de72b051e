"""Device meshes (one 'data' axis over which batches are split) and replicated placement.

Multi-process: `global_data_mesh()` lists every process's devices in `jax.devices()` order
(process 0's first), so block d of an array split over 'data' lives on the d-th device of that
list; each process can only write its own devices' blocks, which is why arrays are built with
`jax.make_array_from_callback` (it calls back for this process's devices only) rather than
`jax.device_put`, which refuses committed arrays and typed PRNG keys on a sharding that spans
other processes.
"""

from typing import Any

import jax
import numpy as np

DATA_AXIS = "data"


def pad_rows(x: Any, rows: int, fill: Any = 0) -> np.ndarray:
  """(rows, ...) `x` (N <= rows rows) with `fill` rows appended: a fixed batch shape, so one
  compiled program serves the last, short batch too."""
  x = np.asarray(x)
  if x.shape[0] == rows:
    return x
  return np.concatenate([x, np.full((rows - x.shape[0],) + x.shape[1:], fill, x.dtype)])


def local_data_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh with axis 'data' over this process's devices."""
  return jax.sharding.Mesh(np.asarray(jax.local_devices()), (DATA_AXIS,))


def global_data_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh with axis 'data' over every device of every process."""
  return jax.sharding.Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Puts a pytree, the same on every process, on every device of `mesh` (replicated).

  Works on meshes spanning several processes, and for typed PRNG keys (placed as their key
  data, then re-wrapped). Each leaf goes through a host copy: meant for start-up state (params,
  optimizer state), not for per-step data.

  Args:
    tree: arrays (numpy, jax, or typed PRNG keys); every process must pass the same values.
    mesh: the mesh to replicate over.

  Returns:
    The tree with every leaf a replicated `jax.Array` on `mesh`.
  """
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def put(x):
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def local_replica(tree: Any, mesh: jax.sharding.Mesh | None = None) -> Any:
  """A replicated pytree of global arrays as arrays replicated over this process's devices.

  For work each process does on its own (validation on a small split, host-side reports): the
  local devices' copies are reused as they are, nothing is copied or communicated. A tree that
  already lives on `mesh` is returned unchanged, so single-process callers pay nothing.

  Args:
    tree: arrays replicated over a mesh that includes every device of `mesh`.
    mesh: the target mesh of local devices (default: `local_data_mesh()`).

  Returns:
    The tree with every leaf replicated over `mesh`.
  """
  mesh = mesh or local_data_mesh()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def local(x):
    if x.sharding.is_equivalent_to(sharding, x.ndim):
      return x
    if not x.sharding.is_fully_replicated:
      raise ValueError(f"local_replica needs replicated arrays, got sharding {x.sharding}")
    shards = {s.device: s.data for s in x.addressable_shards}
    return jax.make_array_from_single_device_arrays(
        x.shape, sharding, [shards[d] for d in mesh.devices.flat])

  return jax.tree.map(local, tree)
