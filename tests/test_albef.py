"""Parity of our ALBEF towers with a timm ViT and a Hugging Face BERT in ALBEF's layout.

No ALBEF/LAVIS code is available offline, so the checkpoint is assembled from its parts: a tiny
timm `VisionTransformer` under `visual_encoder.` (ALBEF's ViT is timm's, LayerNorm eps 1e-6)
and a tiny HF `BertModel` under `text_encoder.bert.`, whose later layers get cross-attention
tensors like ALBEF's fusion layers, plus the momentum copies, queues and heads a real
checkpoint holds.
"""

import importlib.util
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from jsds_jax.models.trunk import albef
from jsds_jax.models.trunk import convert

TOL = 1e-4

# The timm reference runs in a subprocess that imports torch and timm again (~5 s of CPU).
pytestmark = pytest.mark.slow

# Runs in a subprocess: timm imports torchvision at module level for its data utilities, and
# on a CPU-only torch the PyPI torchvision (a CUDA build) cannot load. The ViT never calls
# torchvision, so where it does not import, stand-in modules are installed in that process
# only, and nothing leaks into the test process.
_TIMM_REFERENCE = r"""
import importlib.abc, importlib.machinery, sys, types
try:
  import torchvision  # noqa: F401
except Exception:
  for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
    del sys.modules[name]

  class _Anything(type):
    def __getattr__(cls, attr):
      if attr.startswith("__"):
        raise AttributeError(attr)
      return _Anything(attr, (), {})

  class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
      if name.split(".")[0] == "torchvision":
        return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
      mod = types.ModuleType(spec.name)
      mod.__path__ = []
      mod.__getattr__ = lambda attr: getattr(_Anything("torchvision", (), {}), attr)
      return mod
    def exec_module(self, module):
      pass

  sys.meta_path.insert(0, _StubFinder())

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

torch.manual_seed(0)
model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                          mlp_ratio=2.0, qkv_bias=True, num_classes=0).eval()
with torch.no_grad():
  model.cls_token.normal_(0, 0.5)  # timm starts these near zero; make them matter.
  model.pos_embed.normal_(0, 0.5)
  for p in model.parameters():
    if p.ndim == 1:
      p.add_(0.1 * torch.randn_like(p))  # Non-trivial LayerNorm affines and biases.
  pixels = torch.randn(3, 3, 32, 32)
  tokens = model.forward_features(pixels)
out = {"visual_encoder." + k: v.numpy() for k, v in model.state_dict().items()}
out["ref_pixels"] = pixels.permute(0, 2, 3, 1).numpy()
out["ref_tokens"] = tokens.numpy()
out["ref_eps"] = np.float32(model.norm.eps)
np.savez(sys.argv[1], **out)
"""


@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory):
  if importlib.util.find_spec("timm") is None:
    pytest.skip("timm is not installed")
  path = tmp_path_factory.mktemp("timm") / "vit.npz"
  subprocess.run([sys.executable, "-c", _TIMM_REFERENCE, str(path)], check=True, timeout=300,
                 capture_output=True)
  data = dict(np.load(path))
  refs = {k: data.pop(k) for k in ("ref_pixels", "ref_tokens", "ref_eps")}
  return data, refs


@pytest.fixture(scope="module")
def hf_bert():
  cfg = transformers.BertConfig(
      vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
      intermediate_size=37, max_position_embeddings=40, attn_implementation="eager")
  torch.manual_seed(1)
  return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _albef_state_dict(vision, bert_model, text_prefix="text_encoder.bert."):
  """An ALBEF-layout checkpoint: towers, fusion cross-attention, momentum copies, queues."""
  g = torch.Generator().manual_seed(2)
  rnd = lambda *s: torch.randn(*s, generator=g)
  sd = {k: torch.from_numpy(v) for k, v in vision.items()}
  sd.update({f"{text_prefix}{k}": v.clone() for k, v in bert_model.state_dict().items()})
  for i in (2, 3):  # ALBEF's fusion layers: cross-attention to the image tokens.
    for part in ("self.query", "self.key", "self.value", "output.dense"):
      sd[f"{text_prefix}encoder.layer.{i}.crossattention.{part}.weight"] = rnd(32, 32)
      sd[f"{text_prefix}encoder.layer.{i}.crossattention.{part}.bias"] = rnd(32)
  sd.update({"vision_proj.weight": rnd(16, 32), "vision_proj.bias": rnd(16),
             "text_proj.weight": rnd(16, 32), "text_proj.bias": rnd(16),
             "itm_head.weight": rnd(2, 32), "itm_head.bias": rnd(2),
             "image_queue": rnd(16, 8), "text_queue": rnd(16, 8), "idx_queue": rnd(1, 8),
             "queue_ptr": torch.zeros(1, dtype=torch.long), "temp": torch.tensor(0.07)})
  for k in list(sd):
    top = k.split(".")[0]
    if top in ("visual_encoder", "text_encoder", "vision_proj", "text_proj"):
      sd[k.replace(top, top + "_m", 1)] = sd[k].clone()
  return sd


def _save(tmp_path, sd, bert_json=None):
  torch.save({"model": sd, "epoch": 3, "config": {"image_res": 32}}, tmp_path / "checkpoint.pth")
  if bert_json is not None:
    (tmp_path / "config_bert.json").write_text(json.dumps(bert_json))
  return tmp_path


def _hf_text(bert_model, ids, mask, layers):
  with torch.no_grad():
    out = bert_model(input_ids=torch.from_numpy(ids).long(),
                     attention_mask=torch.from_numpy(mask).long(), output_hidden_states=True)
  return out.hidden_states[layers].numpy()


def test_albef_parity(timm_vit, hf_bert, tmp_path):
  vision, refs = timm_vit
  assert float(refs["ref_eps"]) == pytest.approx(1e-6)
  sd = _albef_state_dict(vision, hf_bert)
  path = _save(tmp_path, sd, {"num_attention_heads": 4, "fusion_layer": 2,
                              "layer_norm_eps": 1e-12})
  loaded = albef.load_albef(path, vision_heads=4)
  assert loaded.config.text_prefix == "text_encoder.bert."
  assert loaded.config.text_layers == 2 and loaded.config.text.num_layers == 4
  assert loaded.image_size == 32 and loaded.config.embed_dim == 16
  assert sorted(k for k in loaded.text_params if k.startswith("layer_")) == ["layer_0", "layer_1"]

  image = jax.jit(loaded.vision_tower.apply)({"params": loaded.vision_params},
                                             refs["ref_pixels"])
  np.testing.assert_allclose(image.tokens, refs["ref_tokens"], atol=TOL, rtol=0)
  np.testing.assert_allclose(image.pooled, refs["ref_tokens"][:, 0], atol=TOL, rtol=0)

  rng = np.random.default_rng(0)
  ids = rng.integers(1, 99, (3, 8)).astype(np.int32)
  mask = (np.arange(8)[None] < np.array([[8], [5], [2]])).astype(np.int32)
  ref_text = _hf_text(hf_bert, ids, mask, layers=2)
  text = jax.jit(loaded.text_tower.apply)({"params": loaded.text_params}, ids, mask)
  np.testing.assert_allclose(text.tokens, ref_text, atol=TOL, rtol=0)
  np.testing.assert_allclose(text.pooled, ref_text[:, 0], atol=TOL, rtol=0)

  with torch.no_grad():
    ref_vproj = torch.nn.functional.linear(torch.from_numpy(refs["ref_tokens"][:, 0]),
                                           sd["vision_proj.weight"], sd["vision_proj.bias"])
    ref_tproj = torch.nn.functional.linear(torch.from_numpy(ref_text[:, 0]),
                                           sd["text_proj.weight"], sd["text_proj.bias"])
  proj = lambda p, x: np.asarray(x) @ p["kernel"] + p["bias"]
  np.testing.assert_allclose(proj(loaded.vision_proj, image.pooled), ref_vproj.numpy(),
                             atol=TOL, rtol=0)
  np.testing.assert_allclose(proj(loaded.text_proj, text.pooled), ref_tproj.numpy(),
                             atol=TOL, rtol=0)
  np.testing.assert_array_equal(loaded.word_embeddings,
                                hf_bert.embeddings.word_embeddings.weight.detach().numpy())


def test_layout_without_bert_prefix_and_inferred_fusion_layer(timm_vit, hf_bert):
  """Retrieval/LAVIS checkpoints keep BERT at `text_encoder.`; the fusion layer is where
  cross-attention starts; heads come from the caller."""
  vision, _ = timm_vit
  sd = {k: v.numpy() for k, v in _albef_state_dict(vision, hf_bert, "text_encoder.").items()}
  config = albef.infer_albef_config(sd, vision_heads=4, text_heads=4)
  assert config.text_prefix == "text_encoder." and config.text_layers == 2
  assert config.vision.layer_norm_eps == 1e-6 and config.vision.num_layers == 2
  converted = albef.convert_albef(sd, config)
  np.testing.assert_array_equal(converted["text"]["layer_1"]["output"]["kernel"],
                                sd["text_encoder.encoder.layer.1.output.dense.weight"].T)
  sd["unexpected_head.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(convert.ConversionError, match="not used"):
    albef.convert_albef(sd, config)
