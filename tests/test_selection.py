"""train.within_budget: checkpoint choice within a sparsity budget (train.select_max_nnz)."""

from jsds_jax import config_base
from jsds_jax import train


def test_within_budget():
  tc = config_base.base_config().train
  val = {"nnz_image": 140.0, "nnz_text": 60.0}
  assert train.within_budget(val, tc)  # no budget by default
  tc.select_max_nnz = 150.0
  assert train.within_budget(val, tc)
  assert not train.within_budget({"nnz_image": 151.0, "nnz_text": 10.0}, tc)
  assert not train.within_budget({"nnz_image": 10.0, "nnz_text": 150.5}, tc)
  tc.mode = "dense_only"  # never trains the sparse head: no budget applies
  assert train.within_budget({"nnz_image": 9000.0, "nnz_text": 9000.0}, tc)
