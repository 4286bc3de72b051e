"""Explanations: which vocabulary terms a sparse vector weights, and which terms make a match.

  terms = top_terms(z_caption, vocab, k=10)       # [("dog", 2.31), ("skate", 1.7), ...]
  shared = shared_terms(z_query, z_image, vocab)  # terms both have, by contribution q_v·d_v
  html = render_html_report(examples, title="...")  # one self-contained file

A sparse score is a sum over terms, so its explanation is exact: the shared terms' contributions
add up to the score. The HTML report is one file (thumbnails embedded as base64 JPEG) so it can be
mailed or attached to an experiment log; every caption and term is escaped, since captions come
from datasets and term strings from tokenizers, neither of which is trusted markup.
"""

import base64
from collections.abc import Mapping, Sequence
import dataclasses
import html
import inspect
import io
from typing import Any

import numpy as np
from PIL import Image
import scipy.sparse as sp

THUMB_SIZE = 128


def _as_backbone(backbone: Any) -> Any:
  """A loaded backbone from a name, a backbone config section, or a loaded backbone."""
  if hasattr(backbone, "vocab_size") and hasattr(backbone, "tokenizer"):
    return backbone
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jsds_jax import config_base  # pylint: disable=g-import-not-at-top
  from jsds_jax.models.trunk import backbones  # pylint: disable=g-import-not-at-top
  if isinstance(backbone, str):
    config = config_base.base_config().backbone
    config.name = backbone
    return backbones.load_backbone(config)
  if isinstance(backbone, (dict, ml_collections.ConfigDict)):
    config = config_base.base_config().backbone
    config.update(dict(backbone))
    return backbones.load_backbone(config)
  raise TypeError("vocabulary() takes a backbone name such as 'lit', a config's backbone "
                  "section, or a loaded backbone (backbones.load_backbone(config.backbone)); "
                  f"got {type(backbone).__name__}")


def vocabulary(backbone: Any) -> list[str]:
  """Term string of every sparse-head dimension: the backbone tokenizer's id -> token.

  The backbone exposes its Hugging Face tokenizer only inside the `hf_tokenizer_fn` closure, so
  it is read from there; ids past the tokenizer's vocabulary (or a backbone without one) get a
  "[id]" placeholder rather than failing, since a missing term name should not stop an eval.

  Args:
    backbone: a loaded `backbones.Backbone` (uses `tokenizer` and `vocab_size`), or what
      `backbones.load_backbone` takes to load one: a backbone name ("lit", "tiny"; the other
      fields from `config_base`) or a config's `backbone` section (ConfigDict or dict).

  Returns:
    V strings, V = backbone.vocab_size.

  Raises:
    TypeError: `backbone` is none of these (the message says what is wanted).
  """
  backbone = _as_backbone(backbone)
  size = int(backbone.vocab_size)
  names = [f"[{i}]" for i in range(size)]
  tokenizer = None
  try:
    tokenizer = inspect.getclosurevars(backbone.tokenizer).nonlocals.get("tokenizer")
  except TypeError:  # not a Python function (a builtin or a callable object)
    pass
  if tokenizer is not None and hasattr(tokenizer, "convert_ids_to_tokens"):
    known = min(size, len(tokenizer))
    names[:known] = [str(t) for t in tokenizer.convert_ids_to_tokens(list(range(known)))]
  return names


def _row(z: Any) -> tuple[np.ndarray, np.ndarray]:
  """(term ids, weights) of the non-zeros of a (V,) vector or (1, V) dense / sparse row."""
  if sp.issparse(z):
    row = sp.csr_matrix(z)
    if row.shape[0] != 1:
      raise ValueError(f"expected one row, got shape {row.shape}")
    row.sum_duplicates()
    keep = row.data != 0
    return row.indices[keep].astype(np.int64), row.data[keep].astype(np.float32)
  z = np.asarray(z, np.float32).reshape(-1)
  ids = np.flatnonzero(z)
  return ids, z[ids]


def _best(ids: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  # Largest first; ties go to the smaller term id, as the index's pruning does.
  order = np.lexsort((ids, -weights))[:k]
  return ids[order], weights[order]


def top_terms(z: Any, vocab: Sequence[str], k: int = 10) -> list[tuple[str, float]]:
  """The k largest-weighted terms of one sparse vector.

  Args:
    z: (V,) vector or (1, V) dense / scipy sparse row, non-negative.
    vocab: V term strings (`vocabulary(backbone)`).
    k: how many terms.

  Returns:
    Up to k (term, weight) pairs, weight descending; zero weights are never listed.
  """
  ids, weights = _best(*_row(z), k)
  return [(vocab[i], float(w)) for i, w in zip(ids, weights)]


def shared_terms(z_query: Any, z_doc: Any, vocab: Sequence[str],
                 k: int = 10) -> list[tuple[str, float]]:
  """The terms behind a sparse match: those both vectors have, by contribution q_v·d_v.

  Args:
    z_query, z_doc: two (V,) vectors or (1, V) rows.
    vocab: V term strings.
    k: how many terms.

  Returns:
    Up to k (term, q_v·d_v) pairs, contribution descending. All of them (k = V) sum to the
    sparse score q·d.
  """
  q_ids, q_w = _row(z_query)
  d_ids, d_w = _row(z_doc)
  common, qi, di = np.intersect1d(q_ids, d_ids, assume_unique=True, return_indices=True)
  ids, contrib = _best(common, q_w[qi] * d_w[di], k)
  return [(vocab[i], float(c)) for i, c in zip(ids, contrib)]


# ----------------------------------------------------------------------------------------------
# The HTML report.


def thumbnail_data_uri(source: Any, size: int = THUMB_SIZE) -> str | None:
  """A base64 JPEG data URI of an image file (longer side `size` px), or None if unreadable.

  Args:
    source: an image path, or an (H, W, 3) uint8 array.
  """
  try:
    image = (Image.fromarray(np.asarray(source, np.uint8)) if isinstance(source, np.ndarray)
             else Image.open(source))
    image = image.convert("RGB")
    image.thumbnail((size, size))
  except (OSError, ValueError, TypeError):
    return None
  buf = io.BytesIO()
  image.save(buf, format="JPEG", quality=85)
  return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclasses.dataclass(frozen=True)
class Hit:
  """One retrieved image as the report shows it.

  Attributes:
    image_id: the dataset's id of the image.
    score: the retrieval score.
    correct: whether it is the query's own image.
    thumbnail: a data URI (`thumbnail_data_uri`) or None for a placeholder.
    caption: one of the image's captions (context for the reader).
    terms: (term, contribution) pairs query and image share (`shared_terms`).
  """

  image_id: str
  score: float
  correct: bool
  thumbnail: str | None
  caption: str
  terms: Sequence[tuple[str, float]] = ()


@dataclasses.dataclass(frozen=True)
class Example:
  """One query and what each retriever returned for it.

  Attributes:
    query: the caption text.
    query_terms: its top (term, weight) pairs.
    ranked: {"sparse": [Hit...], "dense": [Hit...]}, shown side by side in this order.
  """

  query: str
  query_terms: Sequence[tuple[str, float]]
  ranked: dict[str, Sequence[Hit]]


_CSS = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin-bottom:2em}
td,th{border:1px solid #ccc;padding:6px;vertical-align:top}
.hits{display:flex;flex-wrap:wrap;align-items:flex-start}
.hit{width:150px;margin:3px;font-size:12px}
.label{color:#777}
.metrics td{text-align:right}
.metrics td:first-child{text-align:left}
.hit img,.ph{width:128px;height:128px;object-fit:contain;background:#eee;display:block}
.ok{outline:3px solid #2a2}
.terms{color:#555}
"""


def _terms_html(terms: Sequence[tuple[str, float]]) -> str:
  return ", ".join(f"{html.escape(t)}&nbsp;({w:.2f})" for t, w in terms)


def _hit_html(rank: int, hit: Hit) -> str:
  e = html.escape
  img = (f'<img src="{hit.thumbnail}" alt="{e(hit.image_id)}">' if hit.thumbnail
         else '<div class="ph"></div>')
  terms = f'<div class="terms">{_terms_html(hit.terms)}</div>' if hit.terms else ""
  cls = "hit ok" if hit.correct else "hit"
  return (f'<div class="{cls}">{img}<b>#{rank + 1}</b> <span class="label">score</span> '
          f'{hit.score:.3f}<br><span class="label">image</span> {e(hit.image_id)}'
          f"<br><i>{e(hit.caption)}</i>{terms}</div>")


def _metrics_html(report: Mapping[str, Any]) -> str:
  """The retrieval table and sparsity line of an eval report (`eval.evaluate`'s dict)."""
  ks = (1, 5, 10)
  head = "".join(f"<th>{d} R@{k}</th>" for d in ("t2i", "i2t") for k in ks)
  rows = []
  for kind in report["t2i"]:
    cells = "".join(f"<td>{report[d][kind][f'R@{k}']:.2f}</td>" for d in ("t2i", "i2t")
                    for k in ks)
    rsum = report["t2i"][kind]["rsum"] + report["i2t"][kind]["rsum"]
    rows.append(f"<tr><td>{html.escape(kind)}</td>{cells}<td>{rsum:.2f}</td></tr>")
  split = report.get("split", {})
  sparsity = report.get("sparsity", {})
  return (f"<h2>Retrieval ({split.get('num_images', '?')} images, "
          f"{split.get('num_captions', '?')} captions; recall in %)</h2>"
          f"<table class='metrics'><tr><th>retriever</th>{head}<th>rsum</th></tr>"
          f"{''.join(rows)}</table>"
          + (f"<p>Sparsity: {sparsity['caption_nnz']:.1f} non-zeros per caption, "
             f"{sparsity['image_nnz']:.1f} per image, FLOPs {sparsity['flops']:.3f}.</p>"
             if sparsity else ""))


def render_html_report(examples: Sequence[Example], title: str = "JSDS retrieval",
                       notes: Sequence[str] = (), report: Mapping[str, Any] | None = None,
                       pruning_png: bytes | None = None) -> str:
  """One self-contained HTML page: each query, its top images per retriever, the shared terms.

  Args:
    examples: the queries to show.
    title: the page title (escaped).
    notes: lines shown under the title (escaped).
    report: the eval report (`eval.evaluate`'s dict); its retrieval table and sparsity are
      shown first.
    pruning_png: the pruning plot (PNG bytes), embedded after the table.

  Returns:
    The HTML text. Every caption, id and term is passed through `html.escape`.
  """
  e = html.escape
  kinds = list(examples[0].ranked) if examples else []
  rows = []
  for ex in examples:
    cells = "".join("<td><div class='hits'>" + "".join(
        _hit_html(r, h) for r, h in enumerate(ex.ranked[kind])) + "</div></td>" for kind in kinds)
    rows.append(f"<tr><td><b>{e(ex.query)}</b><div class='terms'>"
                f"{_terms_html(ex.query_terms)}</div></td>{cells}</tr>")
  head = "".join(f"<th>{e(kind)}</th>" for kind in kinds)
  notes_html = "".join(f"<p>{e(n)}</p>" for n in notes)
  summary = _metrics_html(report) if report else ""
  if pruning_png:
    summary += ('<h2>Pruning every vector to its top-k terms</h2><img alt="pruning curve" '
                'src="data:image/png;base64,' + base64.b64encode(pruning_png).decode("ascii")
                + '">')
  return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{e(title)}</title>"
          f"<style>{_CSS}</style></head><body><h1>{e(title)}</h1>{notes_html}{summary}"
          "<h2>Example queries</h2><p>Green outline: the query's own image. Terms under a hit: "
          "the vocabulary terms "
          "query and image share, with their contribution q<sub>v</sub>&middot;d<sub>v</sub> "
          "to the sparse score.</p>"
          f"<table><tr><th>query</th>{head}</tr>{''.join(rows)}</table></body></html>\n")
