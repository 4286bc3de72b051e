"""The optimizer: AdamW with the official two param groups, a warm-up/decay schedule, freezing.

holi-lab/mm-sparse-retrieval `lightning_model.py` (`configure_optimizers`, the path that trains
from the pre-projection features) builds `torch.optim.AdamW` with two groups:

  its first group, the vocab LayerNorm and the vocab projector (E, and its bias c): lr 5e-5, no
  decay; here "pretrained" (`train.pretrained`), the weights taken over from the backbone's
  word embeddings and, in the last_block variant, its last blocks;
  its second group, W_s (the single proj), text_proj, vision_proj and the temperature: lr
  `config.lr`, here "projections" (`train.projections`),
           weight decay 0.05;

betas (0.9, 0.999), eps 1e-8, `get_linear_schedule_with_warmup` over int(0.2 · steps), and
Lightning's gradient clip at global norm 1.0 over all trained params. Here the same thing is an
optax chain, with group membership by regex over param paths (`param_labels`) and a third label,
"frozen", for params matching `train.freeze`: their gradients are zeroed before the clip (a
frozen param in PyTorch has no gradient, so it does not count towards the norm) and their
update is `optax.set_to_zero()`, which also keeps weight decay off them and holds no Adam state.
"""

from collections.abc import Sequence
import re
from typing import Any

import jax
import ml_collections
import optax

PRETRAINED, PROJECTIONS, FROZEN = "pretrained", "projections", "frozen"
GROUPS = (PRETRAINED, PROJECTIONS)

# What each training mode never trains, on top of `train.freeze`: d2s distils the sparse head
# from the frozen dense embeddings (the backbone's projections), so the dense side and tau stay
# put; dense_only never reads the sparse head, and freezing it keeps weight decay off it.
MODE_FREEZE = {
    "jsds": (),
    "dense_only": (r"^sparse_head/",),
    "d2s": (r"^image_tail/", r"^text_tail/", r"^tau$", r"^image_block/", r"^text_block/"),
}


def param_path(path: Sequence[Any]) -> str:
  """A key path from `jax.tree_util` as "image_tail/proj/kernel"."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def freeze_patterns(train: ml_collections.ConfigDict) -> tuple[str, ...]:
  """`train.freeze` plus what `train.mode` implies (`MODE_FREEZE`)."""
  if train.mode not in MODE_FREEZE:
    raise ValueError(f"train.mode must be one of {sorted(MODE_FREEZE)}, got {train.mode!r}")
  return tuple(train.freeze) + MODE_FREEZE[train.mode]


def param_labels(params: Any, pretrained_pattern: str, freeze: Sequence[str] = ()) -> Any:
  """The group label of every param: "frozen" if any `freeze` regex matches, else "pretrained"
  if `pretrained_pattern` matches, else "projections" (`re.search` over `param_path`).

  Args:
    params: a params pytree (arrays or ShapeDtypeStructs).
    pretrained_pattern: regex of the "pretrained" group.
    freeze: regexes of frozen params.

  Returns:
    A pytree like `params` with str leaves.
  """
  pretrained_re = re.compile(pretrained_pattern)
  freeze_re = [re.compile(f) for f in freeze]

  def label(path, _):
    name = param_path(path)
    if any(f.search(name) for f in freeze_re):
      return FROZEN
    return PRETRAINED if pretrained_re.search(name) else PROJECTIONS

  return jax.tree_util.tree_map_with_path(label, params)


def warmup_linear_decay(peak: float, total_steps: int,
                        warmup_fraction: float = 0.2) -> optax.Schedule:
  """0 → peak linearly over W = int(warmup_fraction · total_steps) steps, then peak → 0 at
  `total_steps`: transformers' `get_linear_schedule_with_warmup` (so lr(0) = 0 when W > 0).

  Args:
    peak: the highest learning rate.
    total_steps: the run's optimizer steps (> 0).
    warmup_fraction: share of the steps spent warming up.

  Returns:
    step -> lr.
  """
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  warm = int(warmup_fraction * total_steps)
  decay = optax.linear_schedule(peak, 0.0, max(total_steps - warm, 1))
  if warm <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), decay], [warm])


def schedules(train: ml_collections.ConfigDict, total_steps: int) -> dict[str, optax.Schedule]:
  """{"pretrained": schedule, "projections": schedule} from `train.<group>.lr` and
  `train.warmup_fraction`."""
  return {g: warmup_linear_decay(train[g].lr, total_steps, train.warmup_fraction)
          for g in GROUPS}


def make_optimizer(train: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """The training optimizer (see the module docstring).

  Chain: zero frozen grads → clip by global norm (`train.clip_norm`) → per group AdamW
  (`train.pretrained`, `train.projections`: lr peak and weight decay, shared b1/b2/eps) or
  set_to_zero.

  Args:
    train: the config's `train` section.
    total_steps: the run's optimizer steps (the schedules end there).

  Returns:
    An optax transformation over JSDSTail params (labels are computed from the params tree).
  """
  freeze = freeze_patterns(train)
  labels = lambda params: param_labels(params, train.pretrained.params, freeze)
  scheds = schedules(train, total_steps)

  def adamw(group):
    return optax.adamw(scheds[group], b1=train.b1, b2=train.b2, eps=train.eps,
                       weight_decay=train[group].weight_decay)

  keep = optax.identity()
  return optax.chain(
      optax.multi_transform({PRETRAINED: keep, PROJECTIONS: keep,
                             FROZEN: optax.set_to_zero()}, labels),
      optax.clip_by_global_norm(train.clip_norm),
      optax.multi_transform({PRETRAINED: adamw(PRETRAINED), PROJECTIONS: adamw(PROJECTIONS),
                             FROZEN: optax.set_to_zero()}, labels),
  )
