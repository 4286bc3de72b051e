"""Lexical metrics: do the sparse vectors' top terms mean something? (issue 16, DESIGN.md §3)

The sparse side exists for two reasons, interpretability and efficiency; these metrics measure
the first on a split's own captions, with the backbone's vocabulary:

  caption self-grounding@k  share of captions whose k highest-weighted terms include one of the
                            caption's own content wordpieces;
  image grounding@k         share of images whose top-k terms include a content wordpiece of
                            one of their captions;
  junk mass                 share of all sparse weight on special tokens, [unused*], punctuation
                            and stopwords;
  special/punct in top-k    share of vectors with a special token or punctuation in their top k;
  top terms                 the terms found most often among the vectors' top k, with the share
                            of vectors that have them (a term topping every vector explains
                            nothing);
  over-use                  per side, the largest excess of a term's top-k share over its
                            natural share (the share of captions, or of images through their
                            captions, that hold the word): what a grounded model cannot explain.
                            "letter" in 20% of the demo's test captions belongs in ~20% of the
                            top-k lists; in 40% it is used as a latent dimension.

A content wordpiece is a term that is not special, not punctuation and not a stopword
(`term_classes`). Everything works from the top-k ids of each vector (`top_terms` computes them
from dense or scipy-sparse (N, V) rows; validation computes them on the devices with
`jax.lax.top_k`, whose order is the same), so a large split never needs its (N, V) vectors on
the host. All functions are pure NumPy.
"""

from collections.abc import Mapping, Sequence
import re
import unicodedata
from typing import Any

import numpy as np
import scipy.sparse as sp

TOP_K = 10

# English function words (the usual IR stopword list: articles, pronouns, auxiliaries,
# prepositions, conjunctions), lower case; wordpiece continuations ("##s") never count.
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had
has have having he her here hers herself him himself his how i if in into is it its itself just
me more most my myself no nor not now of off on once only or other our ours ourselves out over
own same she should so some such than that the their theirs them themselves then there these
they this those through to too under until up very was we were what when where which while who
whom why will with would you your yours yourself yourselves s t don isn aren wasn weren
""".split())

# [CLS], [SEP], [PAD], [MASK], [UNK], [unused12], BLIP's [DEC]/[ENC]; CLIP's <|startoftext|>.
_SPECIAL = re.compile(r"^(\[[^\[\]\s]+\]|<\|[^|]*\|>|<[a-z/]+>)$")
_CONTINUATION = "##"
_WORD_END = "</w>"  # CLIP's BPE marks the end of a word


def _bare(token: str) -> str:
  """The token without wordpiece / BPE markers."""
  if token.startswith(_CONTINUATION):
    token = token[len(_CONTINUATION):]
  if token.endswith(_WORD_END):
    token = token[:-len(_WORD_END)]
  return token


def is_special(token: str) -> bool:
  """[CLS]-like control tokens and [unused*] slots."""
  return bool(_SPECIAL.match(token))


def is_punctuation(token: str) -> bool:
  """Every character is punctuation or a symbol (".", "—", "|", "##.", "$", "©")."""
  bare = _bare(token)
  return bool(bare) and all(unicodedata.category(ch)[0] in "PS" for ch in bare)


def is_continuation(token: str) -> bool:
  """A WordPiece piece that continues a word ("##s", "##ing"); BPE vocabularies have none."""
  return token.startswith(_CONTINUATION) and len(token) > len(_CONTINUATION)


def is_stopword(token: str) -> bool:
  """A whole-word English function word ("the", "of"); continuations never are."""
  return not token.startswith(_CONTINUATION) and _bare(token).lower() in STOPWORDS


def term_classes(vocab: Sequence[str]) -> dict[str, np.ndarray]:
  """Boolean masks over the vocabulary.

  Args:
    vocab: V term strings (`explain.vocabulary`).

  Returns:
    {"special", "punct", "stop", "junk" (any of the three), "content" (none of them)}: (V,) bool.
  """
  special = np.array([is_special(t) for t in vocab], bool)
  punct = np.array([is_punctuation(t) for t in vocab], bool) & ~special
  stop = np.array([is_stopword(t) for t in vocab], bool) & ~special
  junk = special | punct | stop
  return {"special": special, "punct": punct, "stop": stop, "junk": junk, "content": ~junk}


def top_terms(z: Any, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
  """The k highest-weighted terms of each row, best first (ties: the smaller id).

  Args:
    z: (N, V) non-negative weights, a NumPy array or a scipy sparse matrix.
    k: how many.

  Returns:
    (ids (N, k) int64, weights (N, k) float32); rows with fewer than k non-zeros are padded with
    id -1 and weight 0.
  """
  if sp.issparse(z):
    z = sp.csr_matrix(z)
    n = z.shape[0]
    ids = np.full((n, k), -1, np.int64)
    weights = np.zeros((n, k), np.float32)
    for r in range(n):
      lo, hi = z.indptr[r], z.indptr[r + 1]
      cols, vals = z.indices[lo:hi], z.data[lo:hi]
      keep = vals > 0
      cols, vals = cols[keep], vals[keep]
      order = np.lexsort((cols, -vals))[:k]
      ids[r, :len(order)] = cols[order]
      weights[r, :len(order)] = vals[order]
    return ids, weights
  z = np.asarray(z, np.float32)
  n, v = z.shape
  kk = min(k, v)
  order = np.argsort(-z, axis=1, kind="stable")[:, :kk]  # stable: ties keep the smaller id
  weights = np.take_along_axis(z, order, axis=1)
  ids = np.where(weights > 0, order, -1).astype(np.int64)
  weights = np.where(weights > 0, weights, 0.0).astype(np.float32)
  if kk < k:
    ids = np.pad(ids, ((0, 0), (0, k - kk)), constant_values=-1)
    weights = np.pad(weights, ((0, 0), (0, k - kk)))
  return ids, weights


def _valid(ids: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
  ok = ids >= 0
  return ok if weights is None else ok & (weights > 0)


def content_sets(token_ids: np.ndarray, content: np.ndarray) -> list[frozenset]:
  """Each caption's content wordpieces: its token ids (-1 = padding) that `content` allows."""
  out = []
  for row in np.asarray(token_ids):
    row = row[(row >= 0) & (row < content.shape[0])]
    out.append(frozenset(int(t) for t in row if content[t]))
  return out


def caption_self_grounding(top_ids: np.ndarray, caption_token_ids: np.ndarray,
                           content: np.ndarray, top_weights: np.ndarray | None = None) -> float:
  """Share of captions whose top terms include one of their own content wordpieces.

  Args:
    top_ids: (N_captions, k) the captions' top terms (`top_terms`), -1 = none.
    caption_token_ids: (N_captions, L) their token ids, -1 at padding.
    content: (V,) bool, `term_classes(...)["content"]`.
    top_weights: (N_captions, k) or None; zero-weight entries do not count.

  Returns:
    A share in [0, 1] (0 for no captions).
  """
  own = content_sets(caption_token_ids, content)
  ok = _valid(top_ids, top_weights)
  hits = [bool(own[r] & set(top_ids[r][ok[r]].tolist())) for r in range(len(own))]
  return float(np.mean(hits)) if hits else 0.0


def image_grounding(top_ids: np.ndarray, caption_token_ids: np.ndarray,
                    caption_image_index: np.ndarray, content: np.ndarray,
                    top_weights: np.ndarray | None = None) -> float:
  """Share of images whose top terms include a content wordpiece of one of their captions.

  Args:
    top_ids: (N_images, k) the images' top terms. caption_token_ids: (N_captions, L).
    caption_image_index: (N_captions,) image row of each caption.
    content: (V,) bool. top_weights: (N_images, k) or None.

  Returns:
    A share in [0, 1] (0 for no images).
  """
  n = top_ids.shape[0]
  words: list[set] = [set() for _ in range(n)]
  for c, terms in zip(np.asarray(caption_image_index), content_sets(caption_token_ids, content)):
    words[int(c)] |= terms
  ok = _valid(top_ids, top_weights)
  hits = [bool(words[r] & set(top_ids[r][ok[r]].tolist())) for r in range(n)]
  return float(np.mean(hits)) if hits else 0.0


def junk_mass(z: Any, junk: np.ndarray) -> float:
  """Share of all weight of the rows of z on `junk` terms (0 when z is all zero).

  Args:
    z: (N, V) non-negative weights (NumPy or scipy sparse). junk: (V,) bool.
  """
  total = float(z.sum())
  if total <= 0:
    return 0.0
  on_junk = float((z @ junk.astype(np.float64)).sum())
  return on_junk / total


def share_with(top_ids: np.ndarray, mask: np.ndarray,
               top_weights: np.ndarray | None = None) -> float:
  """Share of rows with at least one top term where `mask` (V,) is True."""
  if top_ids.shape[0] == 0:
    return 0.0
  ok = _valid(top_ids, top_weights)
  hit = np.where(ok, mask[np.clip(top_ids, 0, None)], False)
  return float(np.mean(np.any(hit, axis=1)))


def top_term_shares(top_ids: np.ndarray, vocab: Sequence[str], n: int = 10,
                    top_weights: np.ndarray | None = None) -> list[tuple[str, float]]:
  """The n terms found among the most rows' top terms, with the share of rows that have them.

  Returns:
    [(term, share)], most common first (ties: the smaller id).
  """
  rows = top_ids.shape[0]
  if rows == 0:
    return []
  counts = top_term_counts(top_ids, len(vocab), top_weights)
  order = np.lexsort((np.arange(len(vocab)), -counts))[:n]
  return [(vocab[t], counts[t] / rows) for t in order if counts[t] > 0]


def top_term_counts(top_ids: np.ndarray, vocab_size: int,
                    top_weights: np.ndarray | None = None) -> np.ndarray:
  """(V,) int: for each term, how many rows have it among their (valid) top terms; a term
  counts once per row even if it were listed twice."""
  counts = np.zeros(vocab_size, np.int64)
  ok = _valid(top_ids, top_weights)
  for r in range(top_ids.shape[0]):
    counts[np.unique(top_ids[r][ok[r]])] += 1
  return counts


def natural_share_all(caption_token_ids: np.ndarray, vocab_size: int,
                      caption_image_index: np.ndarray | None = None,
                      num_images: int | None = None) -> np.ndarray:
  """`natural_shares` of every term at once: (V,) float, the share of captions (or, with
  `caption_image_index`, of images through any of their captions) whose tokens hold it."""
  ids = np.asarray(caption_token_ids)
  rows, cols = np.nonzero((ids >= 0) & (ids < vocab_size))
  holds = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, ids[rows, cols])),
                        shape=(ids.shape[0], vocab_size))
  if caption_image_index is not None:
    index = np.asarray(caption_image_index)
    n = num_images if num_images is not None else (int(index.max()) + 1 if index.size else 0)
    to_image = sp.csr_matrix((np.ones(index.size, np.float32), (index, np.arange(index.size))),
                             shape=(n, index.size))
    holds = to_image @ holds
  if holds.shape[0] == 0:
    return np.zeros(vocab_size)
  return np.asarray((holds > 0).sum(axis=0)).ravel() / holds.shape[0]


def most_overused_term(top_ids: np.ndarray, natural: np.ndarray,
                       top_weights: np.ndarray | None = None) -> tuple[int, float, float]:
  """The term whose top-k share most exceeds its natural share.

  Args:
    top_ids: (N, k) one side's top term ids.
    natural: (V,) that side's `natural_share_all`.
    top_weights: (N, k) or None.

  Returns:
    (term id, its top-k share, its natural share) among the terms in some row's top k (the
    excess may be <= 0: then no term is over-used); (-1, 0, 0) without rows.
  """
  if top_ids.shape[0] == 0:
    return -1, 0.0, 0.0
  share = top_term_counts(top_ids, natural.shape[0], top_weights) / top_ids.shape[0]
  t = int(np.argmax(np.where(share > 0, share - natural, -np.inf)))  # among terms in use
  return t, float(share[t]), float(natural[t])


def natural_shares(term_ids: Sequence[int], caption_token_ids: np.ndarray,
                   caption_image_index: np.ndarray | None = None,
                   num_images: int | None = None) -> list[float]:
  """For each term, the share of captions (or, with `caption_image_index`, of images through
  any of their captions) whose tokens hold it: the share of top-10 lists a term may fill while
  every vector is grounded (20% of the demo's test captions say "letter").

  Args:
    term_ids: the terms.
    caption_token_ids: (N_captions, L), -1 at padding.
    caption_image_index: (N_captions,) image row of each caption; None = per caption.
    num_images: with caption_image_index, the images (default: the largest row + 1).

  Returns:
    [share in [0, 1]] per term.
  """
  terms = np.asarray(list(term_ids), np.int64)
  if terms.size == 0:
    return []
  shares = natural_share_all(caption_token_ids, int(terms.max()) + 1, caption_image_index,
                             num_images)
  return [float(x) for x in shares[terms]]


def lexical_metrics(top_t: tuple[np.ndarray, np.ndarray], top_i: tuple[np.ndarray, np.ndarray],
                    junk_weight: Mapping[str, float], total_weight: Mapping[str, float],
                    caption_token_ids: np.ndarray, caption_image_index: np.ndarray,
                    classes: Mapping[str, np.ndarray], vocab: Sequence[str] | None = None,
                    num_top_terms: int = 10) -> dict[str, Any]:
  """Every lexical metric of a split from its top terms and weight sums.

  Args:
    top_t, top_i: (ids, weights) of the captions' and images' top k terms (`top_terms`).
    junk_weight, total_weight: {"text", "image"}: summed weight on junk terms / on all terms.
    caption_token_ids: (N_captions, L), -1 at padding.
    caption_image_index: (N_captions,).
    classes: `term_classes(vocab)`.
    vocab: term strings, for the top-terms list (omitted without it).
    num_top_terms: length of that list.

  Returns:
    {"k", "caption_self_grounding", "image_grounding", "junk_mass" (all weight),
    "junk_mass_text", "junk_mass_image", "special_or_punct_in_top" (share of all vectors),
    "max_top_term_share" (the most common top term's share of all vectors),
    "max_top_term_share_text" / "_image" (the same within the captions / the images),
    "overuse_text" / "_image" (`most_overused_term`: the largest top-k share minus natural
    share of a term on that side), and with vocab "most_overused_text" / "_image": [term,
    top-k share, natural share], "top_terms": [[term, share of all vectors], ...] and "top_terms_text" /
    "top_terms_image": [[term, share of that side's vectors, `natural_shares` of the term for
    that side], ...]}.
  """
  ids = np.concatenate([top_t[0], top_i[0]])
  weights = np.concatenate([top_t[1], top_i[1]])
  k = int(ids.shape[1])
  frac = lambda a, b: float(a / b) if b > 0 else 0.0
  shares = top_term_shares(ids, vocab if vocab is not None else [str(i) for i in range(
      classes["junk"].shape[0])], 1, weights)
  out = {
      "k": k,
      "caption_self_grounding": caption_self_grounding(top_t[0], caption_token_ids,
                                                       classes["content"], top_t[1]),
      "image_grounding": image_grounding(top_i[0], caption_token_ids, caption_image_index,
                                         classes["content"], top_i[1]),
      "junk_mass": frac(junk_weight["text"] + junk_weight["image"],
                        total_weight["text"] + total_weight["image"]),
      "junk_mass_text": frac(junk_weight["text"], total_weight["text"]),
      "junk_mass_image": frac(junk_weight["image"], total_weight["image"]),
      "special_or_punct_in_top": share_with(ids, classes["special"] | classes["punct"], weights),
      "max_top_term_share": shares[0][1] if shares else 0.0,
  }
  names = vocab if vocab is not None else [str(i) for i in range(classes["junk"].shape[0])]
  for side, (side_ids, side_w) in (("text", top_t), ("image", top_i)):
    side_shares = top_term_shares(side_ids, names, num_top_terms, side_w)
    out[f"max_top_term_share_{side}"] = float(side_shares[0][1]) if side_shares else 0.0
    natural_all = natural_share_all(caption_token_ids, len(names),
                                    None if side == "text" else caption_image_index,
                                    top_i[0].shape[0])
    t, share, natural = most_overused_term(side_ids, natural_all, side_w)
    out[f"overuse_{side}"] = share - natural
    if vocab is not None and t >= 0:
      out[f"most_overused_{side}"] = [vocab[t], share, natural]
    if vocab is not None:
      index = {t: i for i, t in enumerate(vocab)}
      natural = natural_shares([index[t] for t, _ in side_shares], caption_token_ids,
                               None if side == "text" else caption_image_index,
                               top_i[0].shape[0])
      out[f"top_terms_{side}"] = [[t, float(s), n] for (t, s), n in zip(side_shares, natural)]
  if vocab is not None:
    out["top_terms"] = [[t, float(s)] for t, s in top_term_shares(ids, vocab, num_top_terms,
                                                                   weights)]
  return out


def lexical_metrics_of(z_t: Any, z_i: Any, caption_token_ids: np.ndarray,
                       caption_image_index: np.ndarray, vocab: Sequence[str],
                       k: int = TOP_K) -> dict[str, Any]:
  """`lexical_metrics` of full (N, V) vectors (NumPy or scipy sparse), for the eval binary."""
  classes = term_classes(vocab)
  junk = {"text": float((z_t @ classes["junk"].astype(np.float64)).sum()),
          "image": float((z_i @ classes["junk"].astype(np.float64)).sum())}
  total = {"text": float(z_t.sum()), "image": float(z_i.sum())}
  return lexical_metrics(top_terms(z_t, k), top_terms(z_i, k), junk, total, caption_token_ids,
                         caption_image_index, classes, vocab)


def render_markdown(lex: Mapping[str, Any]) -> list[str]:
  """Report lines for report.md."""
  pct = lambda x: f"{100 * x:.1f}%"
  k = lex["k"]
  lines = [f"## Lexical: what the top {k} terms are", "",
           "| caption self-grounding | image grounding | junk mass (caption / image) | "
           "special or punctuation in top | most common top term's share |",
           "|---|---|---|---|---|",
           f"| {pct(lex['caption_self_grounding'])} | {pct(lex['image_grounding'])} | "
           f"{pct(lex['junk_mass'])} ({pct(lex['junk_mass_text'])} / "
           f"{pct(lex['junk_mass_image'])}) | {pct(lex['special_or_punct_in_top'])} | "
           f"{pct(lex['max_top_term_share'])} |", "",
           "Self-grounding: share of captions whose top terms include one of their own content "
           "wordpieces (not special, punctuation or a stopword); image grounding: the same for "
           "images and the words of their captions; junk mass: share of all sparse weight on "
           "special tokens, [unused*], punctuation and stopwords."]
  if "overuse_text" in lex:
    over = lambda side: (f"{100 * lex[f'overuse_{side}']:+.1f} points" + (
        " (`{}` in {} of the top-{} lists, its word in {})".format(
            lex[f"most_overused_{side}"][0], pct(lex[f"most_overused_{side}"][1]), k,
            pct(lex[f"most_overused_{side}"][2])) if f"most_overused_{side}" in lex else ""))
    lines += ["", f"Over-use, the largest excess of a term's top-{k} share over the share of "
              f"vectors whose caption holds it: captions {over('text')}; images {over('image')}."]
  if lex.get("top_terms"):
    lines += ["", "Most common top terms (share of all vectors that have them in their top "
              f"{k}): " + ", ".join(f"`{t}` {pct(s)}" for t, s in lex["top_terms"])]
  for side, what in (("text", "captions"), ("image", "images")):
    if lex.get(f"top_terms_{side}"):
      lines += ["", f"Among the {what} (share of them with the term in their top {k}; in "
                f"brackets the share of {what} whose caption holds the word): "
                + ", ".join(f"`{t}` {pct(s)} ({pct(n)})" for t, s, n in lex[f"top_terms_{side}"])]
  return lines
