"""One home for evaluation: retrieval scores, R@K / MRR, sparsity, pruning, lexical metrics and the
report writers, shared by validation during training and by the eval binary."""
