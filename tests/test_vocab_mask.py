"""jsds_jax.vocab_mask and the in-place τ clamp: what stays fixed through real train steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsds_jax import config_base
from jsds_jax import input_pipeline
from jsds_jax import optim
from jsds_jax import train_step
from jsds_jax import vocab_mask
from jsds_jax.models.tail import jsds

N_IMG, D, P, V, DW, B = 16, 12, 8, 40, 8, 8
_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
VOCAB = ["[PAD]", "[unused0]", "[CLS]", "[SEP]", ".", ":", "the", "a"] + [
    f"word{i}" for i in range(V - 8)]


def test_masked_terms_levels():
  names = lambda level: [t for t, m in zip(VOCAB, vocab_mask.masked_terms(VOCAB, level)) if m]
  assert names("none") == []
  assert names("special") == ["[PAD]", "[unused0]", "[CLS]", "[SEP]"]
  assert names("special_punct") == ["[PAD]", "[unused0]", "[CLS]", "[SEP]", ".", ":"]
  assert names("special_punct_stop") == VOCAB[:8]
  with pytest.raises(ValueError, match="model.vocab_mask"):
    vocab_mask.masked_terms(VOCAB, "all")
  pieces = ["[SEP]", "the", "heart", "##s", "##ing", "#", "chi", "##mp"]
  masked = lambda level: [t for t, m in zip(pieces, vocab_mask.masked_terms(pieces, level)) if m]
  assert masked("special_punct_stop") == ["[SEP]", "the", "#"]
  assert masked("special_punct_stop_pieces") == ["[SEP]", "the", "##s", "##ing", "#", "##mp"]
  # CLIP's BPE has no continuation pieces: the last level masks nothing more there.
  bpe = ["<|endoftext|>", "the</w>", "heart", "s</w>", ".</w>"]
  np.testing.assert_array_equal(vocab_mask.masked_terms(bpe, "special_punct_stop_pieces"),
                                vocab_mask.masked_terms(bpe, "special_punct_stop"))


def test_target_terms_are_content_words_the_mask_leaves():
  pieces = ["[SEP]", "the", "heart", "##s", ".", "chi"]
  allowed = lambda mask: [t for t, a in zip(pieces, vocab_mask.target_terms(pieces, mask)) if a]
  assert allowed(None) == ["heart", "##s", "chi"]
  assert allowed(vocab_mask.masked_terms(pieces, "special_punct_stop_pieces")) == ["heart", "chi"]


def _run(params, module, steps=4, tau_lr=1e-3, bow_terms=None):
  """`steps` real train steps; with `bow_terms`, the bag-of-words target on both sides (every
  caption holds terms 2, 3 (`[CLS]`, `[SEP]`: masked above) and 10, 11)."""
  train = config_base.base_config().train
  train.batch_size = B
  train.warmup_fraction = 0.0
  train.loss.reg_warmup_fraction = 0.0
  train.pretrained.lr = 1e-2  # large, so that rows that could move do move
  train.projections.lr = tau_lr
  rng = np.random.default_rng(0)
  cap_img = np.arange(N_IMG)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  token_ids = None
  if bow_terms is not None:
    train.loss.bow_image = train.loss.bow_text = 1.0
    token_ids = np.tile(np.array([[2, 3, 10, 11, -1]]), (N_IMG, 1))
  features = input_pipeline.device_features(rng.normal(size=(N_IMG, D)).astype(np.float32),
                                            rng.normal(size=(N_IMG, D)).astype(np.float32),
                                            cap_img, mesh, text_token_ids=token_ids)
  order = input_pipeline.device_order(input_pipeline.epoch_order(0, 0, cap_img, B), mesh)
  tx = optim.make_optimizer(train, total_steps=steps)
  state = train_step.create_train_state(jax.tree_util.tree_map(jnp.copy, params), tx,
                                        jax.random.key(0), mesh)
  step = train_step.make_train_step(module, tx, train, steps, mesh, compiler_options=_FAST,
                                    bow_terms=bow_terms)
  taus = []
  for k in range(steps):
    state, m = step(state, features, order, k % 2)
    taus.append(float(state.params["tau"]))
  return state, taus


@pytest.fixture(scope="module")
def module_and_params():
  module = jsds.JSDSTail(embed_dim=P, vocab_size=V, word_dim=DW)
  params = jax.jit(module.init, compiler_options=_FAST)(
      jax.random.key(1), jnp.zeros((1, D)), jnp.zeros((1, D)))["params"]
  # A positive vocab bias, so that unmasked terms fire and get gradients.
  params["sparse_head"]["vocab_bias"] = jnp.full((V,), 0.5)
  return module, params


def test_masked_terms_never_get_weight_through_training(module_and_params):
  module, params = module_and_params
  mask = vocab_mask.masked_terms(VOCAB, "special_punct")
  masked = vocab_mask.apply(params, mask)
  assert vocab_mask.masked_count(masked) == int(mask.sum()) == 6
  assert vocab_mask.masked_count(params) == 0  # the input is left alone
  state, _ = _run(masked, module)
  head = state.params["sparse_head"]
  np.testing.assert_array_equal(np.asarray(head["word_embeddings"])[mask], 0.0)
  np.testing.assert_array_equal(np.asarray(head["vocab_bias"])[mask], 0.0)
  # The other rows did train, and the trained head gives the masked terms no weight.
  assert np.all(np.any(np.asarray(head["word_embeddings"])[~mask]
                       != np.asarray(params["sparse_head"]["word_embeddings"])[~mask], axis=1))
  _, z = module.apply({"params": state.params}, jnp.asarray(
      np.random.default_rng(3).normal(size=(5, D)), jnp.float32),
                      method=jsds.JSDSTail.encode_image)
  z = np.asarray(z)
  assert np.all(z[:, mask] == 0) and np.all(z[:, ~mask].sum(axis=1) > 0)
  with pytest.raises(ValueError, match="vocabulary mask has 3 terms"):
    vocab_mask.apply(params, np.zeros(3, bool))


def test_tau_is_clamped_in_the_params_before_each_step(module_and_params):
  module, params = module_and_params
  params = {**params, "tau": jnp.asarray(0.8, jnp.float32)}  # outside [0.001, 0.5]
  _, taus = _run(params, module, steps=2, tau_lr=1e-3)
  # Clamped to 0.5 first, then one Adam step of at most ~lr: never back near 0.8.
  assert all(abs(t - 0.5) <= 1.1e-3 for t in taus), taus
  assert train_step.clamp_tau_param({"tau": jnp.asarray(1e-5)}, module)["tau"] == pytest.approx(
      1e-3)


def test_a_bag_of_words_target_does_not_revive_masked_terms(module_and_params):
  module, params = module_and_params
  mask = vocab_mask.masked_terms(VOCAB, "special")  # rows 0-3; the captions hold 2 and 3
  masked = vocab_mask.apply(params, mask)
  emb = lambda state: np.asarray(state.params["sparse_head"]["word_embeddings"])
  state, _ = _run(masked, module, steps=2, bow_terms=vocab_mask.target_terms(VOCAB, mask))
  np.testing.assert_array_equal(emb(state)[mask], 0.0)
  # Not a vacuous check: with the masked terms left in the target their rows move.
  state, _ = _run(masked, module, steps=2, bow_terms=np.ones(V, bool))
  assert np.all(np.any(emb(state)[[2, 3]] != 0.0, axis=1))
