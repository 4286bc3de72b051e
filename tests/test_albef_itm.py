"""ALBEF's ITM cross-encoder (LAVIS layout): the converter on a tiny random checkpoint, and
parity with LAVIS' own text encoder (`lavis/models/med.py`) where that reference is set up.

The LAVIS package cannot be installed beside this project (it pins transformers < 4.27, timm
0.4.12, opencv, decord, ...), but its `med.py` (XBert: the BERT with ALBEF's fusion layers)
runs on its own under transformers 4.26. The parity test runs it in a subprocess when
JSDS_LAVIS_REF names a folder prepared so:

  pip download salesforce-lavis==1.0.2 --no-deps -d /tmp/lavis
  unzip /tmp/lavis/salesforce_lavis-1.0.2-py3-none-any.whl 'lavis/models/med.py' -d $DIR
  pip install --no-deps --target $DIR transformers==4.26.1 tokenizers==0.13.3 \
      huggingface_hub==0.16.4

(torch comes from this environment). Without it the test makes that folder itself, once, under
~/.cache/jsds_jax/lavis_ref (pip from PyPI, ~10 s).
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsds_jax.models.trunk import albef
from jsds_jax.models.trunk import bert
from jsds_jax.models.trunk import convert

TOL = 1e-4
# Tiny shapes: ViT 16 px / 8 px patches (5 tokens) of width 24, BERT 4 layers of width 32 with
# the fusion (cross-attention) layers from 2 on, as ALBEF's 6 of 12.
V_WIDTH, V_LAYERS, V_MLP, IMG, PATCH = 24, 1, 48, 16, 8
T_WIDTH, T_LAYERS, T_MLP, VOCAB, POS, FUSION, HEADS = 32, 4, 40, 60, 20, 2, 4
EMBED = 16


def _lavis_names(fusion: int = FUSION, prefix: str = "text_encoder.") -> dict[str, tuple]:
  """Every tensor name and shape of a LAVIS `albef_retrieval` state dict at the tiny sizes."""
  shapes = {f"visual_encoder.{k}": s for k, s in {
      "cls_token": (1, 1, V_WIDTH), "pos_embed": (1, (IMG // PATCH) ** 2 + 1, V_WIDTH),
      "patch_embed.proj.weight": (V_WIDTH, 3, PATCH, PATCH), "patch_embed.proj.bias": (V_WIDTH,),
      "norm.weight": (V_WIDTH,), "norm.bias": (V_WIDTH,)}.items()}
  for i in range(V_LAYERS):
    b = f"visual_encoder.blocks.{i}."
    for name, shape in (("norm1", (V_WIDTH,)), ("norm2", (V_WIDTH,))):
      shapes.update({f"{b}{name}.weight": shape, f"{b}{name}.bias": shape})
    for name, (out, inp) in (("attn.qkv", (3 * V_WIDTH, V_WIDTH)), ("attn.proj", (V_WIDTH,) * 2),
                             ("mlp.fc1", (V_MLP, V_WIDTH)), ("mlp.fc2", (V_WIDTH, V_MLP))):
      shapes.update({f"{b}{name}.weight": (out, inp), f"{b}{name}.bias": (out,)})
  e = f"{prefix}embeddings."
  shapes.update({f"{e}word_embeddings.weight": (VOCAB, T_WIDTH),
                 f"{e}position_embeddings.weight": (POS, T_WIDTH),
                 f"{e}LayerNorm.weight": (T_WIDTH,), f"{e}LayerNorm.bias": (T_WIDTH,)})
  for i in range(T_LAYERS):
    parts = [("attention.self.query", T_WIDTH), ("attention.self.key", T_WIDTH),
             ("attention.self.value", T_WIDTH), ("attention.output.dense", T_WIDTH),
             ("intermediate.dense", T_WIDTH), ("output.dense", T_MLP)]
    norms = ["attention.output.LayerNorm", "output.LayerNorm"]
    if i >= fusion:
      parts += [("crossattention.self.query", T_WIDTH), ("crossattention.self.key", V_WIDTH),
                ("crossattention.self.value", V_WIDTH), ("crossattention.output.dense", T_WIDTH)]
      norms.append("crossattention.output.LayerNorm")
    for name, inp in parts:
      out = T_MLP if name == "intermediate.dense" else T_WIDTH
      shapes.update({f"{prefix}encoder.layer.{i}.{name}.weight": (out, inp),
                     f"{prefix}encoder.layer.{i}.{name}.bias": (out,)})
    for name in norms:
      shapes.update({f"{prefix}encoder.layer.{i}.{name}.{w}": (T_WIDTH,) for w in ("weight", "bias")})
  shapes.update({"vision_proj.weight": (EMBED, V_WIDTH), "vision_proj.bias": (EMBED,),
                 "text_proj.weight": (EMBED, T_WIDTH), "text_proj.bias": (EMBED,),
                 "itm_head.weight": (2, T_WIDTH), "itm_head.bias": (2,)})
  return shapes


def _random_checkpoint(seed: int = 0, text: dict | None = None) -> dict[str, np.ndarray]:
  """A LAVIS-layout ALBEF retrieval state dict with random tensors (the text encoder's from
  `text`, LAVIS' own, where given) plus the training state a real checkpoint carries."""
  rng = np.random.default_rng(seed)
  sd = {k: (rng.normal(size=s) * 0.3).astype(np.float32) for k, s in _lavis_names().items()}
  if text is not None:
    sd.update(text)
  sd["text_encoder.embeddings.position_ids"] = np.arange(POS)[None]  # a buffer
  for k in list(sd):  # momentum copies, queues, temperature
    top = k.split(".")[0]
    if top in ("visual_encoder", "text_encoder", "vision_proj", "text_proj"):
      sd[k.replace(top, top + "_m", 1)] = sd[k].copy()
  sd.update({"image_queue": rng.normal(size=(EMBED, 8)).astype(np.float32),
             "text_queue": rng.normal(size=(EMBED, 8)).astype(np.float32),
             "idx_queue": np.zeros((1, 8), np.float32), "queue_ptr": np.zeros(1, np.int64),
             "temp": np.float32(0.07)})
  return sd


def _config(sd):
  return albef.infer_albef_config(sd, vision_heads=4, text_heads=HEADS)


def _inputs(seed: int = 1):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, VOCAB, (3, 7)).astype(np.int32)
  ids[:, 0] = 2  # the tokenizer's [CLS]
  mask = (np.arange(7)[None] < np.array([[7], [4], [2]])).astype(np.int32)
  image = rng.normal(size=(3, (IMG // PATCH) ** 2 + 1, V_WIDTH)).astype(np.float32)
  return ids, mask, image


def test_converter_fills_every_param_and_reads_every_tensor():
  sd = _random_checkpoint()
  config = _config(sd)
  assert config.text_layers == FUSION and config.text.type_vocab_size == 0
  out = albef.convert_albef_itm(sd, config)
  text = out["itm"]["text"]
  # Cross-attention exactly in the fusion layers, read from the fusion layers' tensors.
  assert [any(k.startswith("cross_") for k in text[f"layer_{i}"]) for i in range(T_LAYERS)] == [
      False, False, True, True]
  np.testing.assert_array_equal(
      text["layer_3"]["cross_key"]["kernel"],
      sd["text_encoder.encoder.layer.3.crossattention.self.key.weight"].T)
  np.testing.assert_array_equal(out["itm"]["itm_head"]["kernel"], sd["itm_head.weight"].T)
  # The towers: the same tensors as the towers-only converter reads.
  towers = albef.convert_albef(sd, config)
  unimodal = albef.unimodal_text_params(out["itm"], config)
  assert jax.tree.structure(unimodal) == jax.tree.structure(towers["text"])
  for a, b in zip(jax.tree.leaves(unimodal), jax.tree.leaves(towers["text"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(out["vision"]), jax.tree.leaves(towers["vision"])):
    np.testing.assert_array_equal(a, b)
  # Anything unexpected, or a fusion tensor missing, is named.
  with pytest.raises(convert.ConversionError, match="not used"):
    albef.convert_albef_itm(dict(sd, extra_head=np.zeros(2, np.float32)), config)
  partial = {k: v for k, v in sd.items()
             if k != "text_encoder.encoder.layer.2.crossattention.self.value.bias"}
  with pytest.raises(convert.ConversionError, match="layer.2.crossattention.self.value"):
    albef.convert_albef_itm(partial, config)


def test_checkpoint_without_itm_weights_is_refused():
  sd = _random_checkpoint()
  config = _config(sd)
  no_head = {k: v for k, v in sd.items() if not k.startswith("itm_head.")}
  with pytest.raises(convert.ConversionError, match="no ITM weights .*itm_head"):
    albef.convert_albef_itm(no_head, config)
  towers_only = {k: v for k, v in no_head.items() if ".crossattention." not in k}
  with pytest.raises(convert.ConversionError, match="no ITM weights"):
    albef.convert_albef_itm(towers_only, _config(towers_only))


def test_only_the_fusion_layers_see_the_image():
  """The text layers before `fusion_layer` are ALBEF's text mode: the cross-encoder's state
  entering layer 2 equals the text tower's output (BertEncoder(num_layers_used=2)); the
  logits depend on the image, through the fusion layers only."""
  sd = _random_checkpoint()
  config = _config(sd)
  out = albef.convert_albef_itm(sd, config)
  module = albef.itm_module(config)
  assert module.enc_token_id is None and module.cross_attention_from == FUSION
  ids, mask, image = _inputs()
  logits = jax.jit(module.apply)({"params": out["itm"]}, ids, mask, image)
  assert logits.shape == (3, 2) and logits.dtype == jnp.float32
  other = jax.jit(module.apply)({"params": out["itm"]}, ids, mask, image[::-1])
  assert np.abs(np.asarray(logits) - np.asarray(other)).max() > 1e-3
  encoder = bert.BertEncoder(config.text, cross_attention=True, cross_attention_from=FUSION)
  states = encoder.apply({"params": out["itm"]["text"]}, ids, mask, None, image)
  text_mode = bert.BertEncoder(config.text, num_layers_used=FUSION).apply(
      {"params": albef.unimodal_text_params(out["itm"], config)}, ids, mask)
  # Run 3 layers: the state entering the last one is the text tower's (2-layer) output.
  three = bert.BertEncoder(config.text, num_layers_used=3, cross_attention=True,
                           cross_attention_from=FUSION)
  part = {k: v for k, v in out["itm"]["text"].items() if k != "layer_3"}
  np.testing.assert_allclose(three.apply({"params": part}, ids, mask, None,
                                         image).last_block_input,
                             text_mode.tokens, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(states.pooled) @ out["itm"]["itm_head"]["kernel"]
                             + out["itm"]["itm_head"]["bias"], logits, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="cross_attention_from=4"):
    bert.BertEncoder(config.text, cross_attention=True, cross_attention_from=4).init(
        jax.random.key(0), ids, mask, None, image)


def test_backbone_config_loads_the_cross_encoder(tmp_path):
  """`backbones.load_cross_encoder`, what eval --rerank itm and cmc.teacher=itm call: an
  ALBEF checkpoint folder (weights + config_bert.json) gives ALBEF's cross-encoder; a backbone
  without an ITM head is refused by name."""
  import json  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from jsds_jax.models.trunk import backbones  # pylint: disable=g-import-not-at-top
  sd = _random_checkpoint()
  safetensors.numpy.save_file({k: np.ascontiguousarray(np.atleast_1d(v)) for k, v in sd.items()},
                              str(tmp_path / "albef.safetensors"))
  (tmp_path / "config_bert.json").write_text(json.dumps(
      {"num_attention_heads": HEADS, "fusion_layer": FUSION, "layer_norm_eps": 1e-12}))
  loaded = backbones.load_cross_encoder(
      ml_collections.ConfigDict({"name": "albef", "checkpoint": str(tmp_path)}))
  assert loaded.itm.cross_attention_from == FUSION and loaded.itm.enc_token_id is None
  want = albef.convert_albef_itm(sd, _config(sd))["itm"]
  for a, b in zip(jax.tree.leaves(loaded.itm_params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert loaded.towers.text_tower.num_layers_used == FUSION
  with pytest.raises(ValueError, match="ITM head .*blip or albef.*'clip'"):
    backbones.load_cross_encoder(ml_collections.ConfigDict({"name": "clip", "checkpoint": "x"}))
  # jsds-eval --rerank itm: the same cross-encoder, and the image-token cache asked for.
  from jsds_jax import config_base  # pylint: disable=g-import-not-at-top
  from jsds_jax import eval as eval_lib  # pylint: disable=g-import-not-at-top
  config = config_base.base_config()
  config.backbone.name, config.backbone.checkpoint = "albef", str(tmp_path)
  assert not config.encode.image_tokens
  albef_backbone = type("Backbone", (), {"name": "albef"})()
  cfg, (module, params, settings) = eval_lib._load_itm(config, albef_backbone, 16, True)
  assert cfg.encode.image_tokens and module == loaded.itm
  assert settings.k == 16 and settings.logit_only
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(eval_lib.EvalError, match="ITM head .*'tiny'"):
    eval_lib._load_itm(config, type("Backbone", (), {"name": "tiny"})(), 16, False)


# Runs under JSDS_LAVIS_REF's transformers 4.26 in a subprocess: LAVIS' XBertEncoder (med.py)
# with ALBEF's med config at the tiny sizes, random weights, and ALBEF's eval forward
# (albef_models.compute_sim_matrix: text_encoder(ids, mask, encoder_hidden_states=image,
# encoder_attention_mask=ones) in the default "multimodal" mode, itm_head on [CLS]), plus
# "text" mode (`forward_text`) for the tower.
_LAVIS_REFERENCE = r"""
import importlib.util, os, sys, types
import numpy as np
import torch
for name in ("lavis", "lavis.common", "lavis.common.utils", "lavis.models",
             "lavis.models.base_model"):
  sys.modules[name] = types.ModuleType(name)
sys.modules["lavis.common.utils"].get_abs_path = lambda p: p
sys.modules["lavis.models.base_model"].BaseEncoder = type("BaseEncoder", (), {})
path = os.path.join(os.environ["JSDS_LAVIS_REF"], "lavis", "models", "med.py")
spec = importlib.util.spec_from_file_location("lavis_med", path)
med = importlib.util.module_from_spec(spec)
spec.loader.exec_module(med)
data = dict(np.load(sys.argv[1]))
cfg = med.BertConfig(vocab_size=%(VOCAB)d, hidden_size=%(T_WIDTH)d,
                     num_hidden_layers=%(T_LAYERS)d, num_attention_heads=%(HEADS)d,
                     intermediate_size=%(T_MLP)d, max_position_embeddings=%(POS)d,
                     layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0,
                     add_type_embeddings=False, encoder_width=%(V_WIDTH)d,
                     add_cross_attention=True, fusion_layer=%(FUSION)d)
torch.manual_seed(0)
encoder = med.XBertEncoder(config=cfg, add_pooling_layer=False).eval()
itm_head = torch.nn.Linear(%(T_WIDTH)d, 2)
with torch.no_grad():
  for p in list(encoder.parameters()) + list(itm_head.parameters()):
    p.copy_(0.3 * torch.randn_like(p))  # not BERT's init: LayerNorms and biases matter too
  ids = torch.from_numpy(data["ids"]).long()
  mask = torch.from_numpy(data["mask"]).long()
  image = torch.from_numpy(data["image"])
  out = encoder(ids, attention_mask=mask, encoder_hidden_states=image,
                encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long),
                return_dict=True)
  logits = itm_head(out.last_hidden_state[:, 0, :])
  text = encoder.forward_text(types.SimpleNamespace(input_ids=ids, attention_mask=mask))
result = {"text_encoder." + k: v.numpy() for k, v in encoder.state_dict().items()}
result.update({"itm_head." + k: v.numpy() for k, v in itm_head.state_dict().items()})
result["ref_logits"] = logits.numpy()
result["ref_text"] = text.last_hidden_state.numpy()
np.savez(sys.argv[2], **result)
""" % dict(VOCAB=VOCAB, T_WIDTH=T_WIDTH, T_LAYERS=T_LAYERS, HEADS=HEADS, T_MLP=T_MLP, POS=POS,
           V_WIDTH=V_WIDTH, FUSION=FUSION)


_LAVIS_PINS = ("transformers==4.26.1", "tokenizers==0.13.3", "huggingface_hub==0.16.4")


@pytest.fixture(scope="module")
def lavis_ref() -> str:
  """JSDS_LAVIS_REF, else the folder the module docstring describes, made once (~10 s of pip
  from PyPI) under ~/.cache/jsds_jax/lavis_ref and moved into place whole."""
  given = os.environ.get("JSDS_LAVIS_REF", "")
  if given:
    return given
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  final = pathlib.Path.home() / ".cache" / "jsds_jax" / "lavis_ref"
  if (final / "lavis" / "models" / "med.py").exists():
    return str(final)
  final.parent.mkdir(parents=True, exist_ok=True)
  work = pathlib.Path(tempfile.mkdtemp(prefix="lavis_ref.tmp-", dir=final.parent))
  pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
  try:
    for cmd in ([*pip, "download", "salesforce-lavis==1.0.2", "--no-deps", "-d", str(work / "dl")],
                [*pip, "install", "--no-deps", "--target", str(work / "ref"), *_LAVIS_PINS]):
      done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
      assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stderr[-2000:]}"
    (wheel,) = (work / "dl").glob("salesforce_lavis-*.whl")
    with zipfile.ZipFile(wheel) as z:
      z.extract("lavis/models/med.py", work / "ref")
    try:
      (work / "ref").rename(final)
    except OSError:  # another worker got there first
      pass
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return str(final)


@pytest.mark.network
def test_itm_logits_match_lavis(tmp_path, lavis_ref):
  ref_dir = lavis_ref
  ids, mask, image = _inputs()
  np.savez(tmp_path / "in.npz", ids=ids, mask=mask, image=image)
  env = dict(os.environ, PYTHONPATH=ref_dir, JSDS_LAVIS_REF=ref_dir)
  done = subprocess.run([sys.executable, "-c", _LAVIS_REFERENCE, str(tmp_path / "in.npz"),
                         str(tmp_path / "out.npz")], timeout=300, env=env, capture_output=True,
                        text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  ref = dict(np.load(tmp_path / "out.npz"))
  ref_logits, ref_text = ref.pop("ref_logits"), ref.pop("ref_text")
  # LAVIS' own text encoder and head in our converter, beside random towers.
  sd = _random_checkpoint(text=ref)
  assert set(ref) - {"text_encoder.embeddings.position_ids"} <= set(_lavis_names())
  config = _config(sd)
  out = albef.convert_albef_itm(sd, config)
  logits = jax.jit(albef.itm_module(config).apply)({"params": out["itm"]}, ids, mask, image)
  assert np.abs(np.asarray(logits) - ref_logits).max() <= TOL
  assert np.abs(ref_logits).max() > 0.1  # not a degenerate comparison
  tower = bert.BertEncoder(config.text, num_layers_used=config.text_layers)
  text = tower.apply({"params": albef.unimodal_text_params(out["itm"], config)}, ids, mask)
  real = mask.astype(bool)  # LAVIS computes padded positions too; only real ones matter
  assert np.abs(np.asarray(text.tokens)[real] - ref_text[real]).max() <= TOL
