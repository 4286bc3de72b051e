"""The trained tail's modules: DenseTail, SparseHead, JSDSTail, and the score functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsds_jax.models.trunk import convert
from jsds_jax.models.tail import dense_tail
from jsds_jax.models.tail import jsds
from jsds_jax.models.tail import sparse_head

B, D_IMG, D_TXT, P, V, DW = 4, 12, 10, 8, 64, 6


def apply(module, params, *args, method=None):
  """module.apply under jit: one compile instead of one per primitive, and with LLVM's
  expensive passes off (these graphs are tiny), so the file stays fast on 2 CPU cores."""
  fn = jax.jit(lambda p, *a: module.apply({"params": p}, *a, method=method),
               compiler_options={"xla_backend_optimization_level": 0,
                                 "xla_llvm_disable_expensive_passes": True})
  return jax.tree_util.tree_map(np.asarray, fn(params, *args))


def np_normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_layer_norm(x, scale, bias, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def projection(seed, d_in, d_out):
  rng = np.random.default_rng(seed)
  return {"kernel": rng.normal(size=(d_in, d_out)).astype(np.float32),
          "bias": rng.normal(size=(d_out,)).astype(np.float32)}


@pytest.fixture(scope="module")
def tail_and_params():
  module = jsds.JSDSTail(embed_dim=P, vocab_size=V, word_dim=DW)
  emb = np.random.default_rng(3).normal(size=(V, DW)).astype(np.float32)
  params = jsds.init_jsds_tail(jax.random.key(0), module, D_IMG, D_TXT,
                               vision_proj=projection(1, D_IMG, P),
                               text_proj=projection(2, D_TXT, P), word_embeddings=emb)
  return module, params, emb


def test_dense_tail_from_projection_reproduces_normalize():
  proj = projection(0, D_IMG, P)
  module = dense_tail.DenseTail(P)
  params = dense_tail.init_dense_tail(jax.random.key(0), module, D_IMG, proj)
  h = np.random.default_rng(1).normal(size=(B, D_IMG)).astype(np.float32)
  e = apply(module, params, h)
  assert e.shape == (B, P) and e.dtype == np.float32
  np.testing.assert_allclose(e, np_normalize(h @ proj["kernel"] + proj["bias"]), atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, atol=1e-6)


def test_dense_tail_fresh_init_and_bad_projection():
  module = dense_tail.DenseTail(P)
  params = dense_tail.init_dense_tail(jax.random.key(0), module, D_IMG)
  assert params["proj"]["kernel"].shape == (D_IMG, P)
  # A zero output stays zero (eps-safe) instead of NaN.
  zero = {"proj": {"kernel": np.zeros((D_IMG, P), np.float32), "bias": np.zeros((P,), np.float32)}}
  e = apply(module, zero, np.ones((2, D_IMG), np.float32))
  assert np.all(e == 0.0)
  with pytest.raises(convert.ConversionError):
    dense_tail.init_dense_tail(jax.random.key(0), module, D_IMG, projection(0, D_IMG + 1, P))
  with pytest.raises(convert.ConversionError):  # the module has no bias, the projection has
    dense_tail.init_dense_tail(jax.random.key(0), dense_tail.DenseTail(P, use_bias=False), D_IMG,
                               projection(0, D_IMG, P))


def test_sparse_head_formula_tied_embeddings_and_sparsity(tail_and_params):
  _, tail_params, emb = tail_and_params       # built by init_jsds_tail -> init_sparse_head
  module = sparse_head.SparseHead(V, DW)
  params = dict(tail_params["sparse_head"])
  np.testing.assert_array_equal(params["word_embeddings"], emb)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  params = {**params, "vocab_bias": np.linspace(-0.5, 0.5, V, dtype=np.float32)}
  e = np_normalize(np.random.default_rng(5).normal(size=(16, P)).astype(np.float32))
  z = apply(module, params, e)
  assert z.shape == (16, V)
  x = e @ np.asarray(params["proj"]["kernel"]) + np.asarray(params["proj"]["bias"])
  x = np_layer_norm(x, np.asarray(params["layer_norm"]["scale"]),
                    np.asarray(params["layer_norm"]["bias"]))
  logits = x @ emb.T
  np.testing.assert_allclose(z, np.log1p(np.maximum(logits + params["vocab_bias"], 0.0)),
                             atol=1e-5)
  assert z.min() >= 0.0
  assert 0.2 < float(np.mean(z == 0.0)) < 0.8       # relu makes exact zeros: sparse vectors
  with pytest.raises(convert.ConversionError):
    sparse_head.with_word_embeddings(params, emb[:, :-1])

  # Without c, and computing in bf16 (params stay float32).
  no_bias = sparse_head.SparseHead(V, DW, use_vocab_bias=False, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(no_bias.init, jax.random.key(0), e)["params"]
  assert "vocab_bias" not in shapes
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes))
  rest = {k: v for k, v in params.items() if k != "vocab_bias"}
  z16 = apply(no_bias, rest, e)
  assert z16.dtype == jnp.bfloat16
  np.testing.assert_allclose(z16.astype(np.float32), np.log1p(np.maximum(logits, 0.0)),
                             atol=0.1, rtol=0.05)


def test_jsds_tail_outputs_and_shared_head(tail_and_params):
  module, params, emb = tail_and_params
  assert set(params) == {"image_tail", "text_tail", "sparse_head", "tau"}
  np.testing.assert_array_equal(params["sparse_head"]["word_embeddings"], emb)
  np.testing.assert_array_equal(params["image_tail"]["proj"]["kernel"],
                                projection(1, D_IMG, P)["kernel"])
  rng = np.random.default_rng(6)
  h_img = rng.normal(size=(B, D_IMG)).astype(np.float32)
  h_txt = rng.normal(size=(B + 1, D_TXT)).astype(np.float32)
  out = apply(module, params, h_img, h_txt)
  assert out["e_i"].shape == (B, P) and out["e_t"].shape == (B + 1, P)
  assert out["z_i"].shape == (B, V) and out["z_t"].shape == (B + 1, V)
  assert out["z_i"].min() >= 0.0 and out["z_t"].min() >= 0.0
  np.testing.assert_allclose(out["tau"], 0.07, rtol=1e-6)
  # Both modalities go through the same sparse head: z = head(e) with one set of params.
  head = sparse_head.SparseHead(V, DW)
  np.testing.assert_allclose(apply(head, params["sparse_head"], out["e_t"]), out["z_t"],
                             atol=1e-6)
  e_i, z_i = apply(module, params, h_img, method=module.encode_image)
  np.testing.assert_allclose(e_i, out["e_i"], atol=1e-6)
  np.testing.assert_allclose(z_i, out["z_i"], atol=1e-6)
  np.testing.assert_allclose(e_i, np_normalize(h_img @ projection(1, D_IMG, P)["kernel"]
                                               + projection(1, D_IMG, P)["bias"]), atol=1e-5)


def test_tau_clamp(tail_and_params):
  module, params, _ = tail_and_params
  temp = jax.jit(lambda p: module.apply({"params": p}, method=module.temperature))
  for raw, want in [(1.0, 0.5), (1e-5, 0.001), (-0.3, 0.001), (0.2, 0.2)]:
    np.testing.assert_allclose(temp({**params, "tau": np.float32(raw)}), np.float32(want),
                               rtol=1e-7)
  # Straight-through: a clamped τ still gets the gradient that can bring it back in range.
  grad = jax.jit(jax.grad(jsds.clamp_tau))
  assert float(grad(np.float32(1.0))) == 1.0
  assert float(grad(np.float32(0.07))) == 1.0


def test_score_functions():
  rng = np.random.default_rng(7)
  e_i = np_normalize(rng.normal(size=(3, P))).astype(np.float32)
  e_t = np_normalize(rng.normal(size=(5, P))).astype(np.float32)
  z_i = np.maximum(rng.normal(size=(3, V)), 0).astype(np.float32)
  z_t = np.maximum(rng.normal(size=(5, V)), 0).astype(np.float32)
  s_d = jax.jit(jsds.dense_scores)(e_i, e_t, 0.05)
  s_s = jax.jit(jsds.sparse_scores)(z_i, z_t)
  assert s_d.shape == (3, 5) and s_s.shape == (3, 5)         # rows images, columns captions
  np.testing.assert_allclose(s_d, e_i @ e_t.T / 0.05, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s_s, z_i @ z_t.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(jsds.integrated_scores)(s_d, s_s, 0.1, 0.2),
                             0.1 * (e_i @ e_t.T / 0.05) + 0.2 * (z_i @ z_t.T), rtol=1e-5, atol=1e-4)
  bf = jax.jit(jsds.sparse_scores)(z_i.astype(jnp.bfloat16), z_t.astype(jnp.bfloat16))
  assert bf.dtype == jnp.float32                              # accumulates in float32


def _reference_term_weights(xs, emb, bias):
  """The head's (B, V) part by plain autodiff: what the hand-written gradient must equal."""
  out = []
  for x in xs:
    logits = x @ emb.T + (0.0 if bias is None else bias)
    out.append(jnp.log1p(jax.nn.relu(logits)))
  return tuple(out)


@pytest.mark.parametrize("with_bias", [True, False])
def test_term_weights_gradient_matches_autodiff(with_bias):
  k = jax.random.split(jax.random.key(3), 5)
  xs = (jax.random.normal(k[0], (5, 8)), jax.random.normal(k[1], (3, 8)))
  emb = jax.random.normal(k[2], (40, 8)) * 0.5
  bias = jax.random.normal(k[3], (40,)) * 0.3 if with_bias else None
  weights = jax.random.normal(k[4], (8, 40))  # a loss reading every output differently

  def loss(fn, xs, emb, bias):
    zs = fn(xs, emb, bias)
    return sum(jnp.sum(z * weights[i:i + z.shape[0]] ** 2) for i, z in enumerate(zs))

  ours = lambda xs, emb, bias: sparse_head.term_weights(xs, emb, bias, jnp.dtype(jnp.float32))
  argnums = (0, 1, 2) if with_bias else (0, 1)
  got = jax.grad(lambda *a: loss(ours, *a), argnums)(xs, emb, bias)
  want = jax.grad(lambda *a: loss(_reference_term_weights, *a), argnums)(xs, emb, bias)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ours(xs, emb, bias)[1], _reference_term_weights(xs, emb, bias)[1],
                             rtol=1e-6, atol=1e-6)


def test_sparse_scores_gradient_matches_autodiff():
  k = jax.random.split(jax.random.key(4), 3)
  z_i = jax.nn.relu(jax.random.normal(k[0], (4, 30)))
  z_t = jax.nn.relu(jax.random.normal(k[1], (6, 30)))
  target = jax.random.normal(k[2], (4, 6))
  loss = lambda f: lambda a, b: jnp.sum(jnp.tanh(f(a, b)) * target)
  got = jax.grad(loss(jsds.sparse_scores), (0, 1))(z_i, z_t)
  want = jax.grad(loss(lambda a, b: a @ b.T), (0, 1))(z_i, z_t)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
