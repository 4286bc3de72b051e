"""The CMC module: order-free, padding-free, starts as the dot product, and is the official layer.

The parity test builds the official gated layer in PyTorch (yc-song/cmc `retriever.py`
`IdentityInitializedTransformerEncoderLayer` around `nn.TransformerEncoderLayer(d, 4,
batch_first=True)`, stacked by `nn.TransformerEncoder`), loads the same weights into our module
through `cmc.params_from_torch`, and compares scores in eval mode, float32.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsds_jax.models.tail import cmc

D = 32  # small widths keep compiles fast; the layer math does not depend on D


def _module(**kw):
  kw.setdefault("mlp_dim", 64)
  return cmc.CMC(**kw)


# LLVM's expensive passes off: these graphs are tiny and the CPU is shared (as test_losses.py).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                    "xla_llvm_disable_expensive_passes": True})


@functools.lru_cache(maxsize=None)
def _apply(module):
  return _jit(lambda p, q, c, m: module.apply({"params": p}, q, c, m))


def _inputs(seed, b=2, k=7, d=D):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, d)).astype(np.float32)
  c = rng.normal(size=(b, k, d)).astype(np.float32)
  return q / np.linalg.norm(q, axis=-1, keepdims=True), c / np.linalg.norm(c, axis=-1,
                                                                            keepdims=True)


def _trained_like(params, gate=0.0):
  """Params with the gates opened (g = `gate`), so the layers matter in the tests."""
  params = jax.tree.map(np.asarray, params)
  for name in params:
    params[name]["gate"] = np.float32(gate)
  return params


def test_permuting_candidates_permutes_scores():
  module = _module()
  params = _trained_like(cmc.init_cmc(jax.random.key(0), module, D))
  q, c = _inputs(0)
  mask = np.ones(c.shape[:2], bool)
  s = np.asarray(_apply(module)(params, q, c, mask))
  perm = np.random.default_rng(1).permutation(c.shape[1])
  s_perm = np.asarray(_apply(module)(params, q, c[:, perm], mask))
  np.testing.assert_allclose(s_perm, s[:, perm], rtol=1e-5, atol=1e-5)
  # And the layers do change the scores (the test above is not about an identity map).
  assert np.max(np.abs(s - np.einsum("bd,bkd->bk", q, c))) > 1e-2


def test_padding_changes_nothing():
  module = _module()
  params = _trained_like(cmc.init_cmc(jax.random.key(0), module, D))
  q, c = _inputs(2, k=5)
  s = np.asarray(_apply(module)(params, q, c, np.ones((2, 5), bool)))
  junk = np.random.default_rng(3).normal(size=(2, 3, D)).astype(np.float32) * 10
  padded = np.concatenate([c[:, :2], junk, c[:, 2:]], axis=1)
  mask = np.array([[1, 1, 0, 0, 0, 1, 1, 1]] * 2, bool)
  s_pad = np.asarray(_apply(module)(params, q, padded, mask))
  np.testing.assert_allclose(s_pad[:, mask[0]], s, rtol=1e-5, atol=1e-5)
  assert np.all(np.isneginf(s_pad[:, ~mask[0]]))


def test_fresh_module_ranks_like_the_dot_product():
  module = cmc.CMC(mlp_dim=256)
  d, k = 64, 50
  params = cmc.init_cmc(jax.random.key(1), module, d)
  rng = np.random.default_rng(4)
  q = rng.normal(size=(4, d))
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  # Candidates at cosines spread over [-0.2, 0.9] from the query, as a first stage returns.
  cos = np.linspace(0.9, -0.2, k)
  noise = rng.normal(size=(4, k, d))
  noise -= np.einsum("bkd,bd->bk", noise, q)[..., None] * q[:, None]
  noise /= np.linalg.norm(noise, axis=-1, keepdims=True)
  c = cos[None, :, None] * q[:, None] + np.sqrt(1 - cos ** 2)[None, :, None] * noise
  q, c = q.astype(np.float32), c.astype(np.float32)
  s = np.asarray(_apply(module)(params, q, c, np.ones((4, k), bool)))
  dot = np.einsum("bd,bkd->bk", q, c)
  for row_s, row_dot in zip(s, dot):
    rank_s = np.argsort(np.argsort(-row_s))
    rank_dot = np.argsort(np.argsort(-row_dot))
    spearman = np.corrcoef(rank_s, rank_dot)[0, 1]
    assert spearman > 0.99, spearman
    assert np.argmax(row_s) == np.argmax(row_dot)
  # ... but it is not the identity: the gates let a little of each layer through.
  assert np.max(np.abs(s - dot)) > 1e-4


def test_bad_inputs_are_named():
  module = _module()
  params = cmc.init_cmc(jax.random.key(0), module, D)
  q, c = _inputs(0)
  with pytest.raises(cmc.CMCError, match="K = 0"):
    module.apply({"params": params}, q, c[:, :0])
  with pytest.raises(cmc.CMCError, match=r"q \(B, D\)"):
    module.apply({"params": params}, q[:, :D - 4], c)
  with pytest.raises(cmc.CMCError, match="gate"):
    cmc.CMC(gate="open").apply({"params": params}, q, c)
  with pytest.raises(cmc.CMCError, match="not CMC params"):
    cmc.module_for({"image_tail": {}})


def test_module_for_and_fixed_gate():
  module = _module(num_layers=3)
  params = cmc.init_cmc(jax.random.key(0), module, D)
  rebuilt = cmc.module_for(params)
  assert (rebuilt.num_layers, rebuilt.mlp_dim, rebuilt.gate) == (3, 64, "learned")
  assert cmc.cmc_input_dim(params) == D
  fixed = _module(gate="fixed", gate_init=0.0)
  fixed_params = cmc.init_cmc(jax.random.key(0), fixed, D)
  assert "gate" not in fixed_params["layers_0"]
  assert cmc.module_for(fixed_params).gate == "fixed"
  # A fixed g = 0 is the same as a learned gate currently at 0.
  q, c = _inputs(5)
  m = np.ones(c.shape[:2], bool)
  learned_at_0 = _trained_like(fixed_params, 0.0)
  np.testing.assert_allclose(_apply(fixed)(fixed_params, q, c, m),
                             _apply(_module())(learned_at_0, q, c, m), rtol=1e-6, atol=1e-6)


def _official_torch_stack(d, heads, num_layers, gate_init, fixed):
  torch = pytest.importorskip("torch")

  class Gated(torch.nn.Module):
    """yc-song/cmc `IdentityInitializedTransformerEncoderLayer` (layernorm=False), verbatim
    in behaviour: sigmoid(w)·layer(x) + (1 − sigmoid(w))·x."""

    def __init__(self):
      super().__init__()
      self.encoder_layer = torch.nn.TransformerEncoderLayer(d, heads, batch_first=True)
      if fixed:
        self.register_buffer("fixed_weight", torch.tensor([gate_init]), persistent=False)
      else:
        self.weight = torch.nn.Parameter(torch.tensor([gate_init]))

    @property
    def self_attn(self):
      # torch >= 2.1's TransformerEncoder.forward reads layers[0].self_attn.batch_first; the
      # official code ran on an older torch that did not. A property, so no parameter is
      # registered twice.
      return self.encoder_layer.self_attn

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
      del is_causal
      out1 = self.encoder_layer(src, src_mask, src_key_padding_mask)
      w = torch.sigmoid(self.fixed_weight if fixed else self.weight)
      return w * out1 + (1 - w) * src

  torch.manual_seed(0)
  stack = torch.nn.TransformerEncoder(Gated(), num_layers, enable_nested_tensor=False)
  # TransformerEncoder deep-copies one layer: give each its own weights and gate, so a
  # swapped layer order would show.
  with torch.no_grad():
    for i, layer in enumerate(stack.layers):
      for p in layer.encoder_layer.parameters():
        p.copy_(torch.randn_like(p) * (0.5 / np.sqrt(p.shape[-1])))
      if not fixed:
        layer.weight.fill_(gate_init + i)
  return stack.eval()


@pytest.mark.parametrize("fixed", [False, True])
def test_parity_with_the_official_pytorch_layer(fixed):
  torch = pytest.importorskip("torch")
  d, heads, layers, k = 64, 4, 2, 9
  gate_init = 0.0 if fixed else -1.0
  stack = _official_torch_stack(d, heads, layers, gate_init, fixed)
  params = cmc.params_from_torch(stack.state_dict(), layers)
  module = cmc.CMC(num_layers=layers, num_heads=heads, mlp_dim=2048,
                   gate="fixed" if fixed else "learned", gate_init=gate_init)
  q, c = _inputs(6, b=3, k=k, d=d)
  mask = np.ones((3, k), bool)
  mask[1, 6:] = False  # the official code pads with a key padding mask too
  x = torch.from_numpy(np.concatenate([q[:, None], c], axis=1))
  pad = torch.from_numpy(~np.concatenate([np.ones((3, 1), bool), mask], axis=1))
  with torch.no_grad():
    out = stack(x, src_key_padding_mask=pad)
    ref = torch.bmm(out[:, :1], out[:, 1:].transpose(2, 1)).squeeze(1).numpy()
  ours = np.asarray(_apply(module)(params, q, c, mask))
  np.testing.assert_allclose(ours[mask], ref[mask], rtol=0, atol=1e-5)
  assert np.abs(ref[mask]).max() > 0.1  # scores of a meaningful size, not all ~0


def test_attention_in_blocks_gives_the_same_scores():
  module = _module()
  params = _trained_like(cmc.init_cmc(jax.random.key(0), module, D))
  q, c = _inputs(7, k=10)
  mask = np.ones((2, 10), bool)
  mask[0, 7:] = False
  want = np.asarray(_apply(module)(params, q, c, mask))
  got = np.asarray(_apply(_module(attention_block=4))(params, q, c, mask))  # 11 = 4 + 4 + 3
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Training mode (dropout) runs in blocks too.
  out = _module(attention_block=4).apply({"params": params}, q, c, mask, deterministic=False,
                                         rngs={"dropout": jax.random.key(1)})
  assert np.all(np.isfinite(np.asarray(out)[mask]))


def test_input_scale_is_the_same_module_on_scaled_inputs():
  """`input_scale` s: the module on (q, c) is the unscaled module on (s·q, s·c), so a fresh
  one scores about s²·⟨q, c⟩ (with s = τ^-1/2: the dense first stage's cos/τ)."""
  s = 3.0
  scaled, plain = _module(input_scale=s), _module()
  params = _trained_like(cmc.init_cmc(jax.random.key(0), plain, D))
  q, c = _inputs(3)
  mask = np.ones(c.shape[:2], bool)
  np.testing.assert_allclose(np.asarray(_apply(scaled)(params, q, c, mask)),
                             np.asarray(_apply(plain)(params, s * q, s * c, mask)),
                             rtol=1e-5, atol=1e-5)
