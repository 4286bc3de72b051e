"""What every frozen tower returns."""

from typing import Optional

import flax.struct
import jax


@flax.struct.dataclass
class TowerOutput:
  """Outputs of a frozen image or text tower.

  Attributes:
    pooled: (B, D) the pre-projection vector h_x: the [CLS] state for transformers, the
      mask-aware mean of the token states for sentence-transformers MiniLM, the global-average
      pooled feature map for CNNs.
    tokens: (B, L, D) the final token states (for CNNs, the last feature map as H*W tokens).
    last_block_input: (B, L, D) the token states entering the last transformer block, or None
      where the tower has no transformer blocks.
  """

  pooled: jax.Array
  tokens: jax.Array
  last_block_input: Optional[jax.Array] = None
