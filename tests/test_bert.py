"""Parity of the Flax BERT tower with Hugging Face `BertModel`: tiny random and real MiniLM."""

import functools

import jax
import numpy as np
import pytest
import torch
import transformers

from jsds_jax.models.trunk import bert
from jsds_jax.models.trunk import convert
from jsds_jax.models.trunk import weights

TOL = 1e-4


@functools.cache
def _apply(module):
  # One compile per module and shape: op-by-op dispatch compiles every primitive separately,
  # which costs more than the whole test on a 2-core machine.
  return jax.jit(module.apply)


def _tiny_hf_bert(tmp_path):
  cfg = transformers.BertConfig(
      vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
      intermediate_size=37, max_position_embeddings=40, type_vocab_size=2,
      hidden_act="gelu", attn_implementation="eager")
  torch.manual_seed(0)
  model = transformers.BertModel(cfg).eval()
  model.save_pretrained(tmp_path)
  return model, cfg


def _padded_batch(rng, lengths, max_len, vocab):
  ids = np.zeros((len(lengths), max_len), np.int32)
  mask = np.zeros((len(lengths), max_len), np.int32)
  for i, n in enumerate(lengths):
    ids[i, :n] = rng.integers(1, vocab, n)
    mask[i, :n] = 1
  return ids, mask


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_bert")
  model, hf_cfg = _tiny_hf_bert(path)
  config = bert.BertConfig.from_hf(hf_cfg.to_dict())
  sd = weights.load_state_dict(weights.find_weight_file(path))
  return model, config, sd


def _hf(model, ids, mask, token_types=None):
  with torch.no_grad():
    long = lambda x: None if x is None else torch.from_numpy(x).long()
    out = model(input_ids=long(ids), attention_mask=long(mask), token_type_ids=long(token_types),
                output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states]


def test_config_from_hf_object_and_dict(tiny):
  model, config, _ = tiny
  assert bert.BertConfig.from_hf(model.config) == config
  assert config == bert.BertConfig(vocab_size=99, hidden_size=32, num_layers=3, num_heads=4,
                                   intermediate_size=37, max_position_embeddings=40)


def test_tiny_bert_parity_padded(tiny):
  model, config, sd = tiny
  params = bert.convert_bert(sd, config)
  ids, mask = _padded_batch(np.random.default_rng(0), [9, 5, 2], 9, config.vocab_size)
  token_types = np.zeros_like(ids)
  token_types[:, 4:] = 1
  # HF's default token types (None) are zeros; ours are passed explicitly to compile once.
  for hf_tt, tt in ((None, np.zeros_like(ids)), (token_types, token_types)):
    hidden = _hf(model, ids, mask, hf_tt)
    out = _apply(bert.BertEncoder(config))({"params": params}, ids, mask, tt)
    np.testing.assert_allclose(out.tokens, hidden[-1], atol=TOL, rtol=0)
    np.testing.assert_allclose(out.pooled, hidden[-1][:, 0], atol=TOL, rtol=0)
    np.testing.assert_allclose(out.last_block_input, hidden[-2], atol=TOL, rtol=0)


def test_padding_does_not_leak(tiny):
  """Whatever sits under the mask leaves the real tokens' states unchanged."""
  _, config, sd = tiny
  params = bert.convert_bert(sd, config)
  apply = _apply(bert.BertEncoder(config))
  ids, mask = _padded_batch(np.random.default_rng(1), [9, 5, 2], 9, config.vocab_size)
  clean = apply({"params": params}, ids, mask, np.zeros_like(ids))
  garbage = np.where(mask > 0, ids, np.random.default_rng(2).integers(1, 99, ids.shape))
  dirty = apply({"params": params}, garbage.astype(np.int32), mask, np.zeros_like(ids))
  for i, n in enumerate(mask.sum(1)):
    np.testing.assert_allclose(dirty.tokens[i, :n], clean.tokens[i, :n], atol=1e-6, rtol=0)
  assert not np.allclose(dirty.tokens[2, 2:], clean.tokens[2, 2:])  # The garbage did arrive.


def test_num_layers_used_stops_early(tiny):
  """ALBEF's text mode: the first N layers only, no params for the rest."""
  model, config, sd = tiny
  params = bert.convert_bert(sd, config, num_layers_used=2)
  assert sorted(k for k in params if k.startswith("layer_")) == ["layer_0", "layer_1"]
  ids, mask = _padded_batch(np.random.default_rng(2), [6, 3], 6, config.vocab_size)
  hidden = _hf(model, ids, mask)
  out = _apply(bert.BertEncoder(config, num_layers_used=2))({"params": params}, ids, mask)
  np.testing.assert_allclose(out.tokens, hidden[2], atol=TOL, rtol=0)
  np.testing.assert_allclose(out.last_block_input, hidden[1], atol=TOL, rtol=0)


def test_converter_fails_loudly(tiny):
  _, config, sd = tiny
  missing = {k: v for k, v in sd.items() if "layer.1.output.dense.bias" not in k}
  with pytest.raises(convert.ConversionError, match="missing tensor"):
    bert.convert_bert(missing, config)
  extra = dict(sd, **{"encoder.layer.0.attention.self.rotary.weight": np.zeros(3)})
  with pytest.raises(convert.ConversionError, match="not used"):
    bert.convert_bert(extra, config)
  with pytest.raises(convert.ConversionError, match="word embeddings"):
    bert.word_embeddings(sd, prefix="text_encoder.")


def test_prefixed_names_and_word_embeddings(tiny):
  _, config, sd = tiny
  prefixed = {f"text_encoder.bert.{k}": v for k, v in sd.items()}
  prefixed["vision_proj.weight"] = np.zeros((4, 4), np.float32)  # Outside the prefix: not ours.
  params = bert.convert_bert(prefixed, config, prefix="text_encoder.bert.")
  np.testing.assert_array_equal(params["layer_2"]["key"]["kernel"],
                                sd["encoder.layer.2.attention.self.key.weight"].T)
  emb = bert.word_embeddings(prefixed, prefix="text_encoder.bert.")
  assert emb.shape == (config.vocab_size, config.hidden_size) and emb.dtype == np.float32


def test_minilm_matches_sentence_transformers_pooling(minilm_dir):
  """The real all-MiniLM-L6-v2 against HF BertModel + sentence-transformers' mean pooling."""
  module, params, tokenizer, emb = bert.load_minilm()
  assert module.pooling == "mean" and tokenizer.model_max_length == 256
  assert emb.shape == (30522, 384)
  sentences = ["A man is riding a horse on the beach.", "two dogs",
               "A very small red bird sitting on a branch next to a large window."]
  enc = tokenizer(sentences, padding=True, return_tensors="np")
  ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  assert mask.min() == 0  # The batch really is padded.
  ref_model = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
  with torch.no_grad():
    tokens = ref_model(input_ids=torch.from_numpy(ids).long(),
                       attention_mask=torch.from_numpy(mask).long()).last_hidden_state
  m = torch.from_numpy(mask).float()[..., None]
  ref = ((tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)).numpy()
  out = jax.jit(module.apply)({"params": params}, ids, mask)
  np.testing.assert_allclose(out.pooled, ref, atol=TOL, rtol=0)
  np.testing.assert_allclose(out.tokens, tokens.numpy(), atol=TOL, rtol=0)


def test_load_tokenizer_is_what_auto_tokenizer_gives(minilm_dir):
  """`bert.load_tokenizer` names the class (no torch import at a binary's start): the ids,
  masks and term strings are AutoTokenizer's, padded and cut as `hf_tokenizer_fn` asks."""
  ours, auto = bert.load_tokenizer(minilm_dir), transformers.AutoTokenizer.from_pretrained(
      str(minilm_dir))
  texts = ["A blackbird.", "Ünïcödé café — naïve! ", "", "word " * 200, "[SEP] hi [MASK]",
           "日本語 テスト", "don't   stop\tthe\nmusic"]
  for max_len in (8, 32):
    kw = dict(padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
    got, want = ours(texts, **kw), auto(texts, **kw)
    for key in ("input_ids", "attention_mask"):
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} at {max_len}")
  ids = list(range(len(auto)))
  assert len(ours) == len(auto) and ours.convert_ids_to_tokens(ids) == auto.convert_ids_to_tokens(ids)
