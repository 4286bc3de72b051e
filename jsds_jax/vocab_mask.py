"""The sparse head's vocabulary mask: terms that never get weight (config `model.vocab_mask`).

Standard in learned sparse retrieval: special tokens ([CLS], [SEP], [PAD], [MASK], [UNK]) and
the `[unused*]` slots are not words, so no vector may weight them; punctuation and stopwords can
be masked too (levels below). Without the mask the demo's head put `[SEP]`, `.` and `:` among
the top 10 terms of every vector (issue 16). The last level also masks WordPiece continuation
pieces (`##s`, `##ing`): every term left then starts a word, and a plural ending can no longer
serve as a latent dimension (on the corpus `##s` was in the top 10 of 40% of one seed's vectors
while 2-3% of them hold it, README "Lexical levers"). Vocabularies without `##` pieces (CLIP's
BPE) have none to mask: there it equals "special_punct_stop".

How: the head computes z_v = log(1 + relu(E_v · x + c_v)). With the row E_v and the bias c_v
zero, z_v = log(1 + relu(0)) = 0 for every input, and the gradient that reaches E_v and c_v is
zero too (the head's backward pass passes gradient only where z > 0), so Adam's update and
AdamW's decay of a zero row are zero: a masked term stays masked for the whole run, with no
change to the params' structure, the checkpoints, eval, the index or search. `apply` is called
on the starting params (fresh, or `train.init_from`'s).
"""

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from jsds_jax.evaluation import lexical

LEVELS = ("none", "special", "special_punct", "special_punct_stop", "special_punct_stop_pieces")


def masked_terms(vocab: Sequence[str], level: str) -> np.ndarray:
  """(V,) bool: True for the terms `level` masks.

  Args:
    vocab: V term strings.
    level: "none"; "special" (special tokens and [unused*]); "special_punct" (+ punctuation);
      "special_punct_stop" (+ stopwords); "special_punct_stop_pieces" (+ `##` continuation
      pieces).

  Raises:
    ValueError: an unknown level.
  """
  if level not in LEVELS:
    raise ValueError(f"model.vocab_mask must be one of {LEVELS}, got {level!r}")
  classes = lexical.term_classes(vocab)
  depth = LEVELS.index(level)  # each level masks what the one before does, and more
  mask = np.zeros(len(vocab), bool)
  if depth >= 1:
    mask |= classes["special"]
  if depth >= 2:
    mask |= classes["punct"]
  if depth >= 3:
    mask |= classes["stop"]
  if depth >= 4:
    mask |= np.array([lexical.is_continuation(t) for t in vocab], bool)
  return mask


def target_terms(vocab: Sequence[str], mask: np.ndarray | None) -> np.ndarray:
  """(V,) bool: the terms a bag-of-words target may hold: content wordpieces (not special,
  punctuation or a stopword) that `mask` leaves alone. A masked term must stay out: the target's
  gradient reaches logits that do not fire, and would revive its zero row of E.

  Args:
    vocab: V term strings.
    mask: (V,) bool from `masked_terms`, or None (no mask).
  """
  allowed = lexical.term_classes(vocab)["content"]
  return allowed if mask is None else allowed & ~np.asarray(mask, bool)


def apply(params: dict, mask: np.ndarray) -> dict:
  """The tail's params with the masked rows of E (and entries of c) set to zero.

  Args:
    params: `JSDSTail` params ({"sparse_head": {"word_embeddings": (V, d_w), "vocab_bias"?}}).
    mask: (V,) bool from `masked_terms`.

  Returns:
    A new params tree (the input is not modified).
  """
  head = dict(params["sparse_head"])
  keep = jnp.asarray(~np.asarray(mask, bool))
  emb = head["word_embeddings"]
  if keep.shape[0] != emb.shape[0]:
    raise ValueError(f"vocabulary mask has {keep.shape[0]} terms, the sparse head {emb.shape[0]}")
  head["word_embeddings"] = jnp.where(keep[:, None], emb, jnp.zeros((), emb.dtype))
  if "vocab_bias" in head:
    head["vocab_bias"] = jnp.where(keep, head["vocab_bias"], jnp.zeros((), emb.dtype))
  return {**params, "sparse_head": head}


def vocabulary(backbone_config: ml_collections.ConfigDict, vocab_size: int) -> list[str]:
  """The V term strings of a backbone, from its tokenizer only where that is cheap.

  `lit` and `tiny` use MiniLM's tokenizer (read alone, without the towers' weights); other
  backbones are loaded whole (`backbones.load_backbone`) and named by `explain.vocabulary`.
  Ids past the tokenizer's vocabulary get "[id]" names, i.e. count as special.
  """
  from jsds_jax import explain  # pylint: disable=g-import-not-at-top
  from jsds_jax.models.trunk import backbones  # pylint: disable=g-import-not-at-top
  if backbone_config.name in ("lit", "tiny"):
    from jsds_jax.models.trunk import bert  # pylint: disable=g-import-not-at-top
    tok = bert.load_tokenizer(bert.minilm_dir())
    names = [f"[{i}]" for i in range(vocab_size)]
    known = min(vocab_size, len(tok))
    names[:known] = [str(t) for t in tok.convert_ids_to_tokens(list(range(known)))]
    return names
  return explain.vocabulary(backbones.load_backbone(backbone_config))


def vocabulary_for_cache(backbone_config: ml_collections.ConfigDict, cache_meta: dict,
                         vocab_size: int) -> list[str] | None:
  """`vocabulary` of the backbone a feature cache was encoded with, or None (logged) when the
  cache names a backbone the config does not build (e.g. a test's hand-made cache): the mask
  and the lexical metrics are then skipped rather than guessed."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  name = cache_meta.get("backbone")
  if name != backbone_config.name:
    logging.warning("the feature cache's backbone is %r, the config's %r: no vocabulary, so no "
                    "vocabulary mask and no lexical metrics", name, backbone_config.name)
    return None
  return vocabulary(backbone_config, vocab_size)


def masked_count(params: Any) -> int:
  """How many rows of E are exactly zero (masked terms; a trained row is never exactly 0)."""
  emb = np.asarray(params["sparse_head"]["word_embeddings"])
  return int(np.sum(~emb.any(axis=1)))
