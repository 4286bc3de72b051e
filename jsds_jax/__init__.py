"""jsds-jax: joint sparse-dense text-image retrieval on frozen dual encoders, in JAX/Flax.

The public names, in one place (each docstring gives the shapes):

  from jsds_jax import JSDSTail, dense_scores, sparse_scores, jsds_loss

  Trained tail (Flax Linen modules, explicit params):
    JSDSTail, DenseTail, SparseHead, CMC
  Scores of a batch:      dense_scores, sparse_scores, integrated_scores
  Losses (pure):          jsds_loss, dense_only_loss, d2s_loss, info_nce, kd_loss, l1_reg,
                          flops_reg, cmc_loss
  Evaluation:             retrieval_metrics, t2i_ranks, i2t_ranks
  Frozen trunk, weights:  load_backbone, load_params (a checkpoint's tail params)

They are imported on first use, so `import jsds_jax` stays cheap (the binaries' front door
starts before jax is imported).
"""

import importlib

__version__ = "0.1.0"

# name -> the module that defines it.
_EXPORTS = {
    "JSDSTail": "jsds_jax.models.tail.jsds",
    "DenseTail": "jsds_jax.models.tail.dense_tail",
    "SparseHead": "jsds_jax.models.tail.sparse_head",
    "CMC": "jsds_jax.models.tail.cmc",
    "dense_scores": "jsds_jax.models.tail.jsds",
    "sparse_scores": "jsds_jax.models.tail.jsds",
    "integrated_scores": "jsds_jax.models.tail.jsds",
    "jsds_loss": "jsds_jax.losses",
    "dense_only_loss": "jsds_jax.losses",
    "d2s_loss": "jsds_jax.losses",
    "info_nce": "jsds_jax.losses",
    "kd_loss": "jsds_jax.losses",
    "l1_reg": "jsds_jax.losses",
    "flops_reg": "jsds_jax.losses",
    "cmc_loss": "jsds_jax.losses",
    "retrieval_metrics": "jsds_jax.evaluation.metrics",
    "t2i_ranks": "jsds_jax.evaluation.metrics",
    "i2t_ranks": "jsds_jax.evaluation.metrics",
    "load_backbone": "jsds_jax.models.trunk.backbones",
    "load_params": "jsds_jax.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'jsds_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value  # later look-ups skip this function
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
