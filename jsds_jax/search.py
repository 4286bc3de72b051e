"""`search`: free-text queries against the image index `eval` wrote, with the terms that matched.

  jsds-search --index runs/demo/eval "a dog on a skateboard"
  python -m jsds_jax.search --index runs/demo/eval/index --k 5 --rerank dense "a red circle"

The query goes through the frozen text tower (the backbone named in the index's search files,
with its own tokenizer, at the cache's dtype) and the trained tail, exactly as a cached caption
did; the exact inverted index returns the top images by sparse score. `--rerank dense` rescores
the first `--candidates` of them with the eval's integrated score w1·e_q·e_i + w2·z_q·z_i (/τ on
the dense part for bundles written with eval.integrated="tau"), from the
image dense embeddings stored beside the index. Each hit lists the vocabulary terms query and
image share, with their contributions to the sparse score.

`--rerank cmc --cmc WORKDIR` reorders the index's first `--candidates` images with a CMC trained
on this tail (`jsds_jax.train_cmc`), from the same stored image dense embeddings.

`--index` is the eval output folder or its `index/` subfolder; the index must have been built
from the same backbone weights and vocabulary as the tail that encodes the query
(`index.check_model`), and from `--checkpoint` when one is given to override the stored tail.
"""

from collections.abc import Sequence
import dataclasses
import os
import pathlib
import sys
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jsds_jax import cli
from jsds_jax import explain
from jsds_jax import tail_outputs
from jsds_jax.data import feature_cache
from jsds_jax.index import bundle
from jsds_jax.models.tail import jsds


@dataclasses.dataclass(frozen=True)
class Hit:
  """One retrieved image.

  Attributes:
    row: the image's row in the evaluated split.
    image_id, source, caption: the image's id, file and first caption.
    score: the ranking score (sparse, or integrated when reranked).
    sparse_score: z_q·z_i.
    dense_score: e_q·e_i/τ, or None when not reranked.
    terms: shared (term, contribution) pairs, largest first.
  """

  row: int
  image_id: str
  source: str
  caption: str
  score: float
  sparse_score: float
  dense_score: float | None
  terms: list[tuple[str, float]]


resolve_dir = bundle.resolve_dir


class Searcher:
  """Encodes queries and retrieves images from an eval output folder.

  Args:
    path: the eval output folder (or its index/ subfolder).
    backbone: the loaded backbone; default: `load_backbone` of the stored config.
    params: tail params to encode queries with; default: the tail stored beside the index, or
      the one in `checkpoint`.
    checkpoint: a checkpoint path to load the tail from (`checkpoint.load_params`); the index
      must then have been built from it.
  """

  def __init__(self, path: str | os.PathLike, *, backbone: Any = None, params: Any = None,
               checkpoint: str | None = None, cmc: str | None = None):
    from jsds_jax import index as index_lib  # pylint: disable=g-import-not-at-top
    self.root = resolve_dir(path)
    self.meta = bundle.read_meta(self.root)
    self.config = ml_collections.ConfigDict(self.meta["config"])
    if backbone is None:
      from jsds_jax.models.trunk import backbones  # pylint: disable=g-import-not-at-top
      backbone = backbones.load_backbone(self.config.backbone)
    self.backbone = backbone
    expected = {}
    if checkpoint:
      from jsds_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
      params, _ = checkpoint_lib.load_params(checkpoint)
      expected["checkpoint"] = str(pathlib.Path(checkpoint).expanduser().resolve())
    if params is None:
      params = bundle.load_tail_params(self.root / bundle.TAIL_PARAMS)
    self.params = params
    # model.own_caption_terms: a query weights only its own tokens, as captions did.
    own_terms = bool(self.config.get("model", {}).get("own_caption_terms", False))
    self.module = tail_outputs.tail_module_for(params, backbone, own_caption_terms=own_terms)
    vocab_size = tail_outputs.feature_dims(params)["vocab_size"]
    if vocab_size != backbone.vocab_size:
      raise ValueError(f"vocabulary size differs: the tail's sparse head has {vocab_size} terms, "
                       f"backbone {backbone.name!r} {backbone.vocab_size}")
    expected.update(backbone=backbone.name, weights_hash=backbone.weights_hash,
                    vocab_size=vocab_size)
    self.index = index_lib.load_index(self.root / bundle.INDEX_DIR, expected_model=expected)
    self.image_dense = bundle.load_image_dense(self.root)
    self.vocab = explain.vocabulary(backbone)
    self._image_sparse = None
    self._first_caption: dict[int, str] = {}
    for c, i in enumerate(self.meta["caption_image_index"]):
      self._first_caption.setdefault(int(i), self.meta["captions"][c])
    tower = backbone.text_tower
    dtype = self.config.get("encode", {}).get("dtype", "float32")
    if dtype != "float32":  # the cache's numerics, so a query equals the same cached caption
      tower = tower.clone(dtype=jnp.dtype(dtype))
    module = self.module

    def encode(tv, p, ids, mask, cached_ids):
      out = tower.apply(tv, ids, mask)
      if module.text_block is None:
        h = out.pooled.astype(jnp.float32)
      else:
        # The trained last block reads the states entering it, as the cache stored them (bf16).
        h = out.last_block_input.astype(jnp.bfloat16).astype(jnp.float32)
      # The ids as the cache keeps them: for a text last block and own_caption_terms.
      return module.apply({"params": p}, h, cached_ids, method=module.encode_text)

    self._encode = jax.jit(encode)
    self.cmc = None
    if cmc:
      from jsds_jax import trained_cmc  # pylint: disable=g-import-not-at-top
      from jsds_jax.evaluation import rerank as rerank_lib  # pylint: disable=g-import-not-at-top
      self.cmc = trained_cmc.load_cmc(cmc, self.params)
      if self.cmc[2].get("inputs", "dense") != "dense":
        raise rerank_lib.RerankError(f"the CMC at '{cmc}' reads pre-projection states; search "
                                     "stores only the images' dense embeddings")

  @property
  def image_sparse(self):
    """(N, V) CSR image term weights, read back from the index (float32 postings: exact)."""
    if self._image_sparse is None:
      self._image_sparse = self.index.dequantized().tocsr()
    return self._image_sparse

  def encode_query(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (e (P,) float32 unit-norm, z (V,) float32 >= 0) of a query.

    Raises:
      ValueError: the query is empty or only whitespace.
    """
    if not text or not text.strip():
      raise ValueError("empty query: give some words to search for")
    ids, mask = self.backbone.tokenize([text])
    e, z = self._encode(self.backbone.text_variables, self.params, jnp.asarray(ids),
                        jnp.asarray(mask), jnp.asarray(feature_cache.token_ids(ids, mask)))
    return np.asarray(e, np.float32)[0], np.asarray(z, np.float32)[0]

  def search(self, text: str, k: int = 10, rerank: str | None = None, candidates: int = 100,
             num_terms: int = 5) -> list[Hit]:
    """Top-k images for a text query.

    Args:
      text: the query.
      k: how many images.
      rerank: None (sparse scores from the index) or "dense" (rescore the first `candidates`
        with the integrated score).
      candidates: first-stage depth when reranking.
      num_terms: shared terms listed per hit.

    Returns:
      Up to k hits, best first (fewer when fewer images share a term with the query).
    """
    if rerank not in (None, "none", "dense", "cmc"):
      raise ValueError(f"rerank must be None, 'dense' or 'cmc', got {rerank!r}")
    if rerank == "cmc" and self.cmc is None:
      raise ValueError("rerank='cmc' needs a Searcher made with cmc=<the CMC run's workdir>")
    e_q, z_q = self.encode_query(text)
    depth = max(k, candidates) if rerank in ("dense", "cmc") else k
    found = self.index.search(z_q, depth)
    keep = found.ids >= 0
    rows, sparse = found.ids[keep], found.scores[keep].astype(np.float64)
    dense = None
    score = sparse
    if rerank == "dense":
      # The eval's integrated formula: "cosine" (official, no τ) or "tau" (older bundles).
      tau = 1.0 if self.meta.get("integrated", "tau") == "cosine" else float(self.meta["tau"])
      dense = np.asarray(jsds.dense_scores(np.asarray(self.image_dense[rows]), e_q[None], tau),
                         np.float64)[:, 0]
      score = np.asarray(jsds.integrated_scores(dense, sparse, float(self.meta["w1"]),
                                                float(self.meta["w2"])))
      order = np.lexsort((rows, -score))
      rows, sparse, dense, score = rows[order], sparse[order], dense[order], score[order]
    if rerank == "cmc" and len(rows):
      from jsds_jax.evaluation import rerank as rerank_lib  # pylint: disable=g-import-not-at-top
      module, params, _ = self.cmc
      score = rerank_lib.cmc_scores(module, params, e_q[None],
                                    np.asarray(self.image_dense[rows], np.float32),
                                    np.arange(len(rows))[None])[0].astype(np.float64)
      order = np.lexsort((rows, -score))
      rows, sparse, score = rows[order], sparse[order], score[order]
    hits = []
    for j, row in enumerate(rows[:k]):
      row = int(row)
      hits.append(Hit(
          row=row, image_id=self.meta["image_ids"][row], source=self.meta["image_sources"][row],
          caption=self._first_caption.get(row, ""), score=float(score[j]),
          sparse_score=float(sparse[j]), dense_score=None if dense is None else float(dense[j]),
          terms=explain.shared_terms(z_q, self.image_sparse[row], self.vocab, num_terms)))
    return hits


def format_hits(text: str, query_terms: Sequence[tuple[str, float]],
                hits: Sequence[Hit]) -> str:
  """The text the command prints."""
  lines = [f"query: {text}",
           "query terms: " + ", ".join(f"{t} ({w:.2f})" for t, w in query_terms)]
  if not hits:
    lines.append("no image shares a term with the query")
  for r, h in enumerate(hits):
    parts = f"score {h.score:.4f}"
    if h.dense_score is not None:
      parts += f" (sparse {h.sparse_score:.4f}, dense {h.dense_score:.4f})"
    lines += [f"{r + 1:3d}. {parts}  {h.image_id}  {h.source}",
              f"     caption: {h.caption}",
              "     matched: " + (", ".join(f"{t} ({w:.3f})" for t, w in h.terms) or "-")]
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  text = " ".join(argv[1:])
  if not text.strip():
    raise app.UsageError("empty query: jsds-search --index DIR \"a dog on a skateboard\"")
  try:
    searcher = Searcher(f.index, checkpoint=f.checkpoint, cmc=f.cmc)
    if f.rerank == "cmc" and not f.cmc:
      raise ValueError("--rerank cmc needs --cmc WORKDIR (a train_cmc run on this tail)")
  except (FileNotFoundError, ValueError) as e:  # no index there; one of another model
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  hits = searcher.search(text, k=f.k, rerank=None if f.rerank == "none" else f.rerank,
                         candidates=f.candidates)
  _, z_q = searcher.encode_query(text)
  print(format_hits(text, explain.top_terms(z_q, searcher.vocab, 8), hits))


def run() -> None:
  """Console-script entry point `jsds-search`."""
  flags.DEFINE_string("index", None, "An eval output folder (or its index/ subfolder).")
  flags.DEFINE_integer("k", 10, "How many images to show.", lower_bound=1)
  flags.DEFINE_enum("rerank", "none", ["none", "dense", "cmc"],
                    "dense: rescore the first --candidates with the integrated score; cmc: "
                    "reorder them with the CMC run at --cmc.")
  flags.DEFINE_string("cmc", None, "A train_cmc workdir, for --rerank cmc.")
  flags.DEFINE_integer("candidates", 100, "First-stage depth when reranking.", lower_bound=1)
  flags.DEFINE_string("checkpoint", None, "Encode queries with this checkpoint's tail instead "
                      "of the one stored beside the index (the index must come from it).")
  flags.mark_flag_as_required("index")
  cli.run(main, cli.Command(
      "jsds-search", "free-text queries against the image index `jsds-eval` wrote, with the "
      "terms that matched.", "--index DIR [flags] QUERY...",
      ["index", "k", "rerank", "candidates", "checkpoint"],
      ['jsds-search --index runs/demo/eval --k 5 "a red apple"',
       'jsds-search --index runs/demo/eval --rerank dense "a green frog"']))


if __name__ == "__main__":
  run()
