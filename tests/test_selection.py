"""train.within_budget: checkpoint choice within a sparsity budget (train.select_max_nnz)."""

from jsds_jax import config_base
from jsds_jax import train


def test_within_budget():
  tc = config_base.base_config().train
  val = {"sparsity": {"image_nnz": 140.0, "caption_nnz": 60.0}}
  assert train.within_budget(val, tc)  # no budget by default
  tc.select_max_nnz = 150.0
  assert train.within_budget(val, tc)
  assert not train.within_budget({"sparsity": {"image_nnz": 151.0, "caption_nnz": 10.0}}, tc)
  assert not train.within_budget({"sparsity": {"image_nnz": 10.0, "caption_nnz": 150.5}}, tc)
  tc.mode = "dense_only"  # never trains the sparse head: no budget applies
  assert train.within_budget({"sparsity": {"image_nnz": 9000.0, "caption_nnz": 9000.0}}, tc)
