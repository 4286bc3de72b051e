"""train.within_budget and train.stops_early: checkpoint choice within a sparsity budget
(train.select_max_nnz) and when patience starts."""

from jsds_jax import checkpoint
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


def test_patience_starts_with_the_first_validation_within_budget():
  tc = config_base.base_config().train
  tc.patience = 3
  none_yet = checkpoint.Progress()
  assert none_yet.best_step < 0
  none_yet.evals_since_best = 10  # ten validations, none within the budget
  assert not train.stops_early(none_yet, tc)
  best = checkpoint.Progress()
  best.best_step, best.best_score, best.evals_since_best = 108, 30.0, 2
  assert not train.stops_early(best, tc)
  best.evals_since_best = 3
  assert train.stops_early(best, tc)
  tc.patience = 0  # never
  assert not train.stops_early(best, tc)
