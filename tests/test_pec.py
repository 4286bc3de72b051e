"""PEC (probabilistic expansion control): the schedule, the token mask, the train step with it,
and the caption token ids the feature cache keeps for it."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jsds_jax import config_base
from jsds_jax import encode
from jsds_jax import input_pipeline
from jsds_jax import optim
from jsds_jax import pec
from jsds_jax import tail_outputs
from jsds_jax import train
from jsds_jax import train_step
from jsds_jax.data import feature_cache
from jsds_jax.data import registry
from jsds_jax.models.trunk import backbones
from jsds_jax.models.tail import jsds
import testing_utils  # tests/testing_utils.py

N_IMG, CAPS, D_IMG, D_TXT, P, V, DW, B, L = 24, 2, 32, 32, 16, 200, 24, 8, 6
_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def test_probability_falls_linearly_to_zero_at_the_fraction():
  p = lambda t: float(pec.probability(t, total_steps=100, fraction=0.95))
  assert p(0) == 1.0
  assert p(19) == pytest.approx(1 - 19 / 95)
  assert p(95) == 0.0 and p(99) == 0.0


def _random_ids(rng, rows, length, vocab):
  ids = rng.integers(0, vocab, size=(rows, length)).astype(np.int32)
  lengths = rng.integers(1, length + 1, size=rows)
  ids[np.arange(length)[None, :] >= lengths[:, None]] = -1  # padding at the end
  return ids


def test_token_mask_marks_exactly_each_captions_tokens():
  rng = np.random.default_rng(0)
  ids = _random_ids(rng, 5, 7, 30)
  ids[0, :3] = [4, 4, 0]  # repeated tokens and token 0 (padding must not mark it)
  want = np.zeros((5, 30), bool)
  for r, row in enumerate(ids):
    want[r, row[row >= 0]] = True
  np.testing.assert_array_equal(pec.token_mask(jnp.asarray(ids), 30), want)


def test_mask_captions_masks_with_probability_one_and_never_at_zero():
  rng = np.random.default_rng(1)
  ids = jnp.asarray(_random_ids(rng, 4, 5, 40))
  z = jnp.asarray(rng.random((4, 40)).astype(np.float32))
  masked, on = pec.mask_captions(z, ids, jax.random.key(0), jnp.float32(1.0))
  assert bool(on)
  np.testing.assert_array_equal(masked, np.where(pec.token_mask(ids, 40), z, 0))
  same, on = pec.mask_captions(z, ids, jax.random.key(0), jnp.float32(0.0))
  assert not bool(on)
  np.testing.assert_array_equal(same, z)


def test_mask_pairs_masks_each_image_to_its_captions_tokens_on_the_same_coin():
  rng = np.random.default_rng(2)
  ids = jnp.asarray(_random_ids(rng, 4, 5, 40))
  z_i = jnp.asarray(rng.random((4, 40)).astype(np.float32))
  z_t = jnp.asarray(rng.random((4, 40)).astype(np.float32))
  mi, mt, on = pec.mask_pairs(z_i, z_t, ids, jax.random.key(0), jnp.float32(1.0))
  own = np.asarray(pec.token_mask(ids, 40))
  assert bool(on)
  np.testing.assert_array_equal(mi, np.where(own, z_i, 0))  # row k: caption k's tokens
  np.testing.assert_array_equal(mt, np.where(own, z_t, 0))
  # Captions masked exactly as mask_captions does with the same key.
  np.testing.assert_array_equal(mt, pec.mask_captions(z_t, ids, jax.random.key(0),
                                                      jnp.float32(1.0))[0])
  si, st, on = pec.mask_pairs(z_i, z_t, ids, jax.random.key(0), jnp.float32(0.0))
  assert not bool(on)
  np.testing.assert_array_equal(si, z_i)
  np.testing.assert_array_equal(st, z_t)


# ----------------------------------------------------------------------------------------------
# The train step.


def _train_config(mode="jsds", use_pec=True, pec_fraction=1.0):
  tc = config_base.base_config().train
  tc.mode, tc.batch_size, tc.warmup_fraction = mode, B, 0.0
  tc.loss.eta_text = tc.loss.eta_image = 1e-2
  tc.loss.reg_warmup_fraction = 0.0
  tc.pec, tc.pec_fraction = use_pec, pec_fraction
  return tc


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  data = dict(image=rng.normal(size=(N_IMG, D_IMG)).astype(np.float32),
              text=rng.normal(size=(N_IMG * CAPS, D_TXT)).astype(np.float32),
              cap_img=np.repeat(np.arange(N_IMG), CAPS),
              ids=_random_ids(rng, N_IMG * CAPS, L, V))
  module = jsds.JSDSTail(embed_dim=P, vocab_size=V, word_dim=DW)
  init = jax.jit(module.init, compiler_options=_FAST)
  params = init(jax.random.key(1), jnp.zeros((1, D_IMG)), jnp.zeros((1, D_TXT)))["params"]
  return data, module, params


def _run(setup, n_devices, steps, **train_kw):
  data, module, params = setup
  return testing_utils.run_train_steps(data, module, params, _train_config(**train_kw),
                                       n_devices, steps, B, _FAST)


def test_first_step_loss_is_the_loss_of_masked_captions(setup):
  data, module, params = setup
  # p(0) = 1: step 0 always masks.
  _, history, order = _run(setup, 1, steps=1, pec_fraction=1.0)
  assert history[0]["pec_masked"] == 1 and history[0]["pec_prob"] == 1.0
  caps = order[0]
  image_idx = data["cap_img"][caps]
  out = module.apply({"params": params}, data["image"][image_idx], data["text"][caps])
  z_t = np.where(pec.token_mask(jnp.asarray(data["ids"][caps]), V), out["z_t"], 0)
  settings = train_step.LossSettings.from_config(_train_config(), 1)
  want, _ = train_step.loss_from_outputs(dict(out, z_t=jnp.asarray(z_t)),
                                         jnp.asarray(image_idx), jnp.int32(0), settings)
  np.testing.assert_allclose(history[0]["loss"], want, rtol=1e-5)
  distinct = max(len(set(r[r >= 0])) for r in data["ids"][caps])
  assert history[0]["nnz_text"] <= distinct
  # Without PEC the same step sees the unmasked, denser captions and another loss.
  _, plain, _ = _run(setup, 1, steps=1, use_pec=False)
  assert plain[0]["nnz_text"] > history[0]["nnz_text"]
  assert abs(float(plain[0]["loss"]) - float(want)) > 1e-4


def test_after_the_fraction_pec_steps_equal_plain_steps(setup):
  # fraction·T = 1 step: step 0 masks, steps 1-2 have p = 0.
  state, history, _ = _run(setup, 1, steps=3, pec_fraction=1 / 3)
  assert [int(h["pec_masked"]) for h in history] == [1, 0, 0]
  _, plain, _ = _run(setup, 1, steps=3, use_pec=False)
  assert float(plain[0]["loss"]) != pytest.approx(float(history[0]["loss"]), rel=1e-4)
  # Same loss function from step 1 on (the params differ by step 0's masked update).
  assert history[1]["nnz_text"] > history[0]["nnz_text"]


def test_four_devices_mask_like_one(setup):
  one, h1, _ = _run(setup, 1, steps=3, pec_fraction=0.5)
  four, h4, _ = _run(setup, 4, steps=3, pec_fraction=0.5)
  assert [int(h["pec_masked"]) for h in h1] == [int(h["pec_masked"]) for h in h4]
  for a, b in zip(jax.tree_util.tree_leaves(four.params), jax.tree_util.tree_leaves(one.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sharded_features_carry_each_shards_token_ids(setup):
  data, _, _ = setup
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
  layout = input_pipeline.shard_layout(data["cap_img"], 4)
  features = input_pipeline.device_features_sharded(
      data["image"], data["text"], layout, mesh, text_token_ids=data["ids"])
  blocks = np.asarray(features.text_token_ids).reshape(4, layout.captions.shape[1], L)
  for d in range(4):
    real = layout.captions[d] >= 0
    np.testing.assert_array_equal(blocks[d][real], data["ids"][layout.captions[d][real]])


def test_own_terms_keeps_only_each_captions_tokens():
  z = jnp.arange(1, 13, dtype=jnp.float32).reshape(2, 6)
  ids = jnp.asarray([[4, 1, 4, -1], [0, -1, -1, -1]])
  want = np.zeros((2, 6), np.float32)
  want[0, [1, 4]] = [2, 5]
  want[1, 0] = 7
  np.testing.assert_array_equal(pec.own_terms(z, ids), want)


def test_the_tail_restricts_its_captions_as_the_host_did():
  """JSDSTail(own_caption_terms=True) on a hand-made case: every path that yields z_t
  (encode_text, __call__, sparse_terms, sparse_terms_and_logits) equals the unrestricted z_t
  with the entries outside each caption's tokens zeroed (what the removed host-side
  `own_terms_csr` computed: a repeated token not doubled, padding ignored); apply_tail's CSR
  holds exactly those entries; images and the logits are untouched."""
  v, p, d = 12, 4, 5
  plain = jsds.JSDSTail(embed_dim=p, vocab_size=v, word_dim=3)
  own = plain.clone(own_caption_terms=True)
  rng = np.random.default_rng(0)
  h_i, h_t = (jnp.asarray(rng.normal(size=(3, d)), jnp.float32) for _ in range(2))
  params = plain.init(jax.random.key(0), h_i, h_t)["params"]
  head = dict(params["sparse_head"], vocab_bias=jnp.full((v,), 5.0))  # every term > 0
  params = dict(params, sparse_head=head)
  ids = np.asarray([[4, 1, 4, -1], [0, -1, -1, -1], [11, 3, 7, 2]])
  full = np.asarray(plain.apply({"params": params}, h_t, method=plain.encode_text)[1])
  assert (full > 0).all()
  want = np.zeros_like(full)
  for r, row in enumerate(ids):
    for t in set(row[row >= 0]):
      want[r, t] = full[r, t]
  run = lambda *a, **kw: own.apply({"params": params}, *a, **kw)
  np.testing.assert_array_equal(run(h_t, jnp.asarray(ids), method=own.encode_text)[1], want)
  out = run(h_i, h_t, jnp.asarray(ids))
  np.testing.assert_array_equal(out["z_t"], want)
  np.testing.assert_array_equal(
      out["z_i"], plain.apply({"params": params}, h_i, method=plain.encode_image)[1])
  e_i, e_t = out["e_i"], out["e_t"]
  np.testing.assert_array_equal(run(e_i, e_t, jnp.asarray(ids), method=own.sparse_terms)[1],
                                want)
  with_logits = run(e_i, e_t, jnp.asarray(ids), method=own.sparse_terms_and_logits)
  np.testing.assert_array_equal(with_logits["z_t"], want)
  unrestricted = plain.apply({"params": params}, e_i, e_t, method=plain.sparse_terms_and_logits)
  np.testing.assert_array_equal(with_logits["l_t"], unrestricted["l_t"])
  cache = {"image_pooled": np.asarray(h_i), "text_pooled": np.asarray(h_t),
           feature_cache.TOKEN_IDS: ids}
  host = tail_outputs.apply_tail(params, cache, batch_size=2, own_caption_terms=True)
  np.testing.assert_array_equal(host.z_t.toarray(), want)
  assert host.z_t.nnz == 2 + 1 + 4  # {1, 4}, {0}, {11, 3, 7, 2}: no explicit zeros
  with pytest.raises(ValueError, match="own_caption_terms .*token ids"):
    run(h_t, method=own.encode_text)
  del cache[feature_cache.TOKEN_IDS]
  with pytest.raises(feature_cache.CacheError, match="token_ids, which model.own_caption_terms"):
    tail_outputs.apply_tail(params, cache, own_caption_terms=True)


def test_own_caption_terms_restrict_every_step_and_keep_images(setup):
  data, module, params = setup
  tc = _train_config(use_pec=False)
  _, history, order = testing_utils.run_train_steps(
      data, module.clone(own_caption_terms=True), params, tc, 1, 3, B, _FAST)
  caps = order[0]
  image_idx = data["cap_img"][caps]
  out = module.apply({"params": params}, data["image"][image_idx], data["text"][caps])
  z_t = pec.own_terms(out["z_t"], jnp.asarray(data["ids"][caps]))
  settings = train_step.LossSettings.from_config(tc, 3)
  want, _ = train_step.loss_from_outputs(dict(out, z_t=z_t), jnp.asarray(image_idx),
                                         jnp.int32(0), settings)
  np.testing.assert_allclose(history[0]["loss"], want, rtol=1e-5)
  _, plain, _ = _run(setup, 1, steps=3, use_pec=False)
  for h, p in zip(history, plain):  # every step, not only while PEC's p(t) > 0
    distinct = max(len(set(r[r >= 0])) for r in data["ids"][caps])
    assert h["nnz_text"] <= distinct < p["nnz_text"]
  assert history[0]["nnz_image"] == plain[0]["nnz_image"]
  with pytest.raises(ValueError, match="own_caption_terms .*dense_only"):
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    dense = _train_config(mode="dense_only", use_pec=False)
    train_step.make_train_step(module.clone(own_caption_terms=True),
                               optim.make_optimizer(dense, 1), dense, 1, mesh)


def test_pec_needs_a_sparse_mode():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  tc = _train_config(mode="dense_only")
  module = jsds.JSDSTail(embed_dim=P, vocab_size=V, word_dim=DW)
  with pytest.raises(ValueError, match="train.pec .*dense_only"):
    train_step.make_train_step(module, optim.make_optimizer(tc, 1), tc, 1, mesh)


def test_training_on_a_cache_without_token_ids_says_how_to_add_them(tmp_path):
  root = tmp_path / "fake-0123" / "fake"
  rng = np.random.default_rng(0)
  for split in ("train", "val"):
    d = root / split
    d.mkdir(parents=True)
    arrays = {"image_pooled": rng.normal(size=(8, 4)).astype(np.float32),
              "text_pooled": rng.normal(size=(8, 4)).astype(np.float32),
              "caption_image_index": np.arange(8)}
    for name, a in arrays.items():
      feature_cache.atomic_save_npy(d / f"{name}.npy", a)
    feature_cache.atomic_write_json(d / feature_cache.ITEMS, {"captions": ["x"] * 8})
    feature_cache.atomic_write_json(d / feature_cache.META, {
        "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                   for k, v in arrays.items()}})
  config = testing_utils.load_config("tiny")
  config.train.features = str(root)
  config.train.pec = True
  with pytest.raises(feature_cache.CacheError, match=r"(?s)train/?'.*token ids.*jsds-encode"):
    train.train_and_evaluate(config, tmp_path / "run")


# ----------------------------------------------------------------------------------------------
# The token ids in the feature cache.


@pytest.fixture(scope="module")
def tiny():
  config = testing_utils.load_config("tiny")
  backbone = backbones.load_backbone(ml_collections.ConfigDict(
      {"name": "tiny", "max_text_len": 16, "seed": 0}))
  return config, backbone


def test_encode_keeps_token_ids_and_adds_them_to_an_older_cache(tmp_path, tiny):
  config, backbone = tiny
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.cache_dir = str(tmp_path / "data")
  split = registry.load_split(config.data, "test")
  out = tmp_path / "cache"
  settings = encode.EncodeSettings(batch_size=8, chunk_size=16, num_workers=2)
  encode.encode_split(split, backbone, out, settings, progress=False)
  ids = feature_cache.load_split(out, mmap=False)[feature_cache.TOKEN_IDS]
  want_ids, want_mask = backbone.tokenize(list(split.captions))
  np.testing.assert_array_equal(ids, np.where(want_mask > 0, want_ids, -1))
  assert ids.dtype == np.int32 and (ids == -1).any()
  assert not encode.add_token_ids(out, backbone)  # already there: nothing to do

  # A cache from before token ids were stored: no array, no meta entry.
  meta = feature_cache.load_split(out)["meta"]
  del meta["arrays"][feature_cache.TOKEN_IDS]
  feature_cache.atomic_write_json(out / feature_cache.META, meta)
  (out / f"{feature_cache.TOKEN_IDS}.npy").unlink()
  assert encode.add_token_ids(out, backbone)
  np.testing.assert_array_equal(
      feature_cache.load_split(out, mmap=False)[feature_cache.TOKEN_IDS], ids)
