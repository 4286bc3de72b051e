"""EfficientNet-Lite0 tower with the real packaged ImageNet weights.

Checks: real photos are classified correctly (so weights, layout, padding and preprocessing are
right), and features/logits match timm's `tf_efficientnet_lite0` (TF "SAME" padding, BN eps
1e-3, i.e. the packaged model's architecture) run by PyTorch on the same weights.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types

import jax
import numpy as np
import pytest
import skimage.data
import skimage.transform

from jsds_jax.models.trunk import efficientnet_lite
from jsds_jax.models.trunk import torch_pickle
from jsds_jax.models.trunk.convert import ConversionError

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _preprocess(image: np.ndarray, size: int, mean, std) -> np.ndarray:
  """uint8 (H, W, 3) -> shorter side centre-cropped, resized to (size, size), normalised."""
  h, w = image.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  image = image[top:top + s, left:left + s]
  image = skimage.transform.resize(image, (size, size), order=3, anti_aliasing=True,
                                   preserve_range=True) / 255.0
  return ((image - np.asarray(mean)) / np.asarray(std)).astype(np.float32)


@pytest.fixture(scope="module")
def lite0():
  return efficientnet_lite.load_efficientnet_lite0()


@pytest.fixture(scope="module")
def pixels(lite0):
  """(2, 224, 224, 3) float32: skimage's cat (chelsea) and espresso cup (coffee)."""
  return np.stack([
      _preprocess(img, lite0.image_size, lite0.image_mean, lite0.image_std)
      for img in (skimage.data.chelsea(), skimage.data.coffee())])


@pytest.fixture(scope="module")
def outputs(lite0, pixels):
  out = jax.jit(lite0.module.apply)(lite0.variables, pixels)
  logits = efficientnet_lite.classify(out.pooled, lite0.classifier)
  return out, np.asarray(logits)


def test_imagenet_top1_on_real_photos(outputs):
  _, logits = outputs
  top1 = logits.argmax(-1)
  assert top1[0] in CAT_CLASSES, f"chelsea top-5: {np.argsort(-logits[0])[:5]}"
  assert top1[1] == ESPRESSO, f"coffee top-5: {np.argsort(-logits[1])[:5]}"


def test_tower_output(lite0, outputs):
  out, _ = outputs
  assert lite0.image_size == 224 and lite0.image_resize == "shorter_crop"
  np.testing.assert_allclose(lite0.image_mean, [127 / 255] * 3)
  np.testing.assert_allclose(lite0.image_std, [128 / 255] * 3)
  assert out.pooled.shape == (2, 1280) and out.pooled.dtype == np.float32
  assert out.tokens.shape == (2, 7 * 7, 1280)
  assert out.last_block_input is None
  np.testing.assert_allclose(out.pooled, np.asarray(out.tokens).mean(1), rtol=1e-5, atol=1e-6)
  assert float(np.asarray(out.tokens).min()) >= 0 and float(np.asarray(out.tokens).max()) <= 6


def test_converter_rejects_missing_and_unused_tensors(lite0):
  sd = torch_pickle.load(lite0.weights_path)
  missing = {k: v for k, v in sd.items() if k != "_blocks.7._depthwise_conv.weight"}
  with pytest.raises(ConversionError, match="_blocks.7._depthwise_conv.weight"):
    efficientnet_lite.convert_efficientnet_lite(missing)
  extra = dict(sd, **{"_blocks.16._project_conv.weight": np.zeros((1, 1, 1, 1), np.float32)})
  with pytest.raises(ConversionError, match="not used"):
    efficientnet_lite.convert_efficientnet_lite(extra)


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Serves empty `torchvision.*` modules whose attributes are dummy classes.

  timm imports torchvision at module level (FrozenBatchNorm2d, transforms) but the
  EfficientNet forward pass never uses it. PyPI's torchvision wheels are CUDA builds that fail
  to import next to the CPU torch of this project, so timm is imported against this stub,
  which is removed again right after.
  """

  class _Anything(type):

    def __getattr__(cls, name):
      if name.startswith("__"):
        raise AttributeError(name)
      return _TorchvisionStub._Anything(name, (), {})

  class _Module(types.ModuleType):

    def __getattr__(self, name):
      if name.startswith("__"):
        raise AttributeError(name)
      return _TorchvisionStub._Anything(name, (), {})

  def find_spec(self, fullname, path, target=None):
    del path, target
    if fullname == "torchvision" or fullname.startswith("torchvision."):
      return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    return None

  def create_module(self, spec):
    return self._Module(spec.name)

  def exec_module(self, module):
    module.__path__ = []


def _import_timm():
  if importlib.util.find_spec("torchvision") is not None:
    try:
      import timm  # pylint: disable=g-import-not-at-top
      return timm
    except Exception:  # pylint: disable=broad-except
      for name in [n for n in sys.modules if n.split(".")[0] in ("timm", "torchvision")]:
        del sys.modules[name]
  stub = _TorchvisionStub()
  sys.meta_path.insert(0, stub)
  try:
    import timm  # pylint: disable=g-import-not-at-top,redefined-outer-name
    return timm
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"timm is not importable here: {type(e).__name__}: {e}")
  finally:
    sys.meta_path.remove(stub)
    for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
      del sys.modules[name]


@pytest.fixture(scope="module")
def timm():
  pytest.importorskip("torch")
  return _import_timm()


def _load_by_order(model, state_dict):
  """Loads the package's tensors into a timm model: same order, same shapes, new names."""
  import torch  # pylint: disable=g-import-not-at-top
  target = model.state_dict()
  assert len(target) == len(state_dict)
  mapped = {}
  for (name, ref), (src_name, value) in zip(target.items(), state_dict.items()):
    assert tuple(ref.shape) == value.shape, (name, src_name)
    mapped[name] = torch.from_numpy(np.ascontiguousarray(value))
  model.load_state_dict(mapped, strict=True)
  return model.eval()


def test_parity_with_timm_tf_efficientnet_lite0(timm, lite0, pixels, outputs):
  import torch  # pylint: disable=g-import-not-at-top
  model = _load_by_order(timm.create_model("tf_efficientnet_lite0", pretrained=False),
                         torch_pickle.load(lite0.weights_path))
  with torch.no_grad():
    features = model.forward_features(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    logits = model.forward_head(features).numpy()
  features = features.permute(0, 2, 3, 1).reshape(2, 49, 1280).numpy()
  out, ours = outputs
  np.testing.assert_allclose(np.asarray(out.tokens), features, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(out.pooled), features.mean(1), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ours, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["lite0", "lite4"])
def test_block_layout_matches_timm(timm, variant):
  # Lite4 has width 1.4 / depth 1.8 with the unscaled stem, head and first/last stages.
  width, depth, _ = efficientnet_lite.LITE_VARIANTS[variant]
  model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
  theirs = []
  for block in (b for stage in model.blocks for b in stage):
    convs = [m for m in block.modules() if m.__class__.__name__.startswith("Conv2d")]
    dw = block.conv_dw
    theirs.append((convs[0].in_channels, convs[-1].out_channels,
                   dw.out_channels // convs[0].in_channels, dw.kernel_size[0], dw.stride[0]))
  ours = [(b.in_features, b.out_features, b.expand_ratio, b.kernel, b.stride)
          for b in efficientnet_lite.block_specs(width, depth)]
  assert ours == theirs
  assert model.conv_stem.out_channels == 32 and model.conv_head.out_channels == 1280
