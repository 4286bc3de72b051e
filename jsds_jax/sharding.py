"""Device meshes: one 'data' axis over which batches are split."""

import jax
import numpy as np


def local_data_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh with axis 'data' over this process's devices."""
  return jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",))


def global_data_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh with axis 'data' over every device of every process."""
  return jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
