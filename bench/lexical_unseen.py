"""How much grounding a split allows: its captions' content words against the training captions'.

  PYTHONPATH=. .venv/bin/python bench/lexical_unseen.py                         # the split alone
  PYTHONPATH=. .venv/bin/python bench/lexical_unseen.py --runs R1 R2 ...        # and runs' vectors

A sparse head learns which vocabulary entries name a picture from the training captions (the
bag-of-words target and the contrastive losses only ever raise their words); a test caption
whose content wordpieces (`lexical.term_classes`) never occur in a training caption can only be
grounded through what MiniLM's word embeddings E carry over. This prints the share of the split's
captions with at least one content wordpiece seen in training, and for each run (a train
workdir: its best checkpoint) caption self-grounding@10 and image grounding@10 (per caption: its
image's top 10 holds one of the caption's words) on the captions with a seen word and on those
without, plus the number of empty caption vectors. `model.own_caption_terms` is read from the
run's `--own` list (the checkpoint does not record it).
"""

import argparse

import numpy as np

from jsds_jax import checkpoint
from jsds_jax import config_base
from jsds_jax import tail_outputs
from jsds_jax import vocab_mask
from jsds_jax.data import feature_cache
from jsds_jax.evaluation import lexical


def grounding_split(top_ids, top_w, sets, rows):
  """(N,) bool: whether row rows[n]'s positive top terms hold one of sets[n]."""
  return np.array([bool(sets[n] & set(top_ids[r][top_w[r] > 0].tolist()))
                   for n, r in enumerate(rows)])


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--features", default="~/.cache/jsds_jax/features/lit-804e964b9855/demo",
                 help="the dataset's feature cache folder (with train/ and the split)")
  p.add_argument("--split", default="test")
  p.add_argument("--runs", nargs="*", default=[])
  p.add_argument("--own", nargs="*", default=[],
                 help="runs trained with model.own_caption_terms (their captions restricted)")
  args = p.parse_args()
  import pathlib  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(args.features).expanduser()
  train = feature_cache.load_split(root / "train")
  split = feature_cache.load_split(root / args.split)
  backbone = config_base.base_config().backbone
  backbone.name = split["meta"].get("backbone", "lit")
  ids = np.asarray(split[feature_cache.TOKEN_IDS])
  vocab_size = int(max(ids.max(), np.asarray(train[feature_cache.TOKEN_IDS]).max())) + 1
  vocab = vocab_mask.vocabulary(backbone, vocab_size)
  content = lexical.term_classes(vocab)["content"]
  seen = set().union(*lexical.content_sets(np.asarray(train[feature_cache.TOKEN_IDS]), content))
  sets = lexical.content_sets(ids, content)
  has_seen = np.array([bool(s & seen) for s in sets])
  print(f"{args.split}: {len(sets)} captions; with a content wordpiece seen in a training "
        f"caption: {has_seen.mean():.1%} ({has_seen.sum()}); with no content wordpiece: "
        f"{np.mean([not s for s in sets]):.1%}")
  cap_img = np.asarray(split["caption_image_index"])
  for run in args.runs:
    params, _ = checkpoint.load_params(run)
    out = tail_outputs.apply_tail(params, split, own_caption_terms=run in args.own)
    t_ids, t_w = lexical.top_terms(out.z_t, lexical.TOP_K)
    i_ids, i_w = lexical.top_terms(out.z_i, lexical.TOP_K)
    g_t = grounding_split(t_ids, t_w, sets, range(len(sets)))
    g_i = grounding_split(i_ids, i_w, sets, cap_img)
    fmt = lambda g, m: f"{g[m].mean():.0%}" if m.any() else "–"
    print(f"{run}: self-grounding seen / unseen {fmt(g_t, has_seen)} / {fmt(g_t, ~has_seen)}; "
          f"image grounding seen / unseen {fmt(g_i, has_seen)} / {fmt(g_i, ~has_seen)}; "
          f"empty caption vectors {int(np.sum(out.z_t.getnnz(axis=1) == 0))}")


if __name__ == "__main__":
  main()
