"""`load_split(config.data, split)`: the one entry point from a config to a `RetrievalSplit`.

Fields read from `data_config` (an `ml_collections.ConfigDict`, a dict, or any object with
attributes), by `name`:

  name="karpathy"   Karpathy JSON + image folder (COCO, Flickr30k, your own data)
    json              path of the caption file (required)
    image_root        folder holding <filepath>/<filename> of each record (required)
    dataset           name recorded in caches, e.g. "coco", "flickr30k" (default: the file's
                      "dataset" field)
    include_restval   whether "train" takes "restval" too (default: yes for COCO files)
    train_splits      the Karpathy splits "train" is made of, overriding include_restval when
                      given: ("train", "restval") = COCO's 113,287 images, ("train",) = 82,783
                      (what holi-lab/mm-sparse-retrieval's data module selects, `split ==
                      "train"`): an epoch of 0.73x the steps. Default () = include_restval.
    skip_bad          drop bad captions / missing images instead of failing (default False)
  name="coco_tfds"  tfds coco_captions/2014, already prepared (needs the `tfds` extra)
    data_dir          tfds data folder (default: tfds' own default)
    include_restval   "train" = train + restval, the 113k Karpathy set (default True)
    train_splits      as for karpathy
    download          let tfds download and prepare it (default False)
    skip_bad          drop empty captions (default False)
  name="demo"       Tux Paint stamps from Debian, built on first use (about 160 MB download)
    cache_dir         where the package, images and JSON go (default "cache/demo")
    skip_bad          (default False)
  name="corpus"     ~25,000 captioned emoji / icon pictures from npm + the Tux Paint stamps
                    (data/corpus.py), built on first use (22 MB of npm packages + the demo's)
    cache_dir         the demo's folder (Tux Paint is taken from there, built if absent); the
                      corpus goes to <cache_dir>/corpus (default "cache/demo")
    sources           sources for train and val, "openmoji,twemoji,..." or a list (default:
                      all of openmoji, twemoji, tabler, mdi, lucide, tuxpaint)
    test_sources      sources for test (default: `sources`); e.g. sources without one source
                      and test_sources that source alone is the cross-source check
    max_test_images   keep this many test pictures, a fixed hash-chosen subset (default 0: all)
    skip_bad          (default False)
  name="synthetic"  generated coloured shapes (tests, smoke runs), made on first use
    cache_dir         parent folder (default "cache/synthetic"); each parameter set gets its
                      own subfolder, so changing one never reads stale files
    num_images, captions_per_image, image_size, seed    (defaults 40, 2, 64, 0)
"""

import os
import pathlib
from typing import Any

from jsds_jax.data import coco_tfds
from jsds_jax.data import corpus
from jsds_jax.data import demo_tuxpaint
from jsds_jax.data import karpathy
from jsds_jax.data import synthetic
from jsds_jax.data.split import RetrievalSplit

NAMES = ("karpathy", "coco_tfds", "demo", "corpus", "synthetic")
_REQUIRED = object()


def _get(config: Any, key: str, default: Any = _REQUIRED) -> Any:
  if hasattr(config, "get"):  # dict, ConfigDict (also when locked)
    value = config.get(key, None)
  else:
    value = getattr(config, key, None)
  if value is None:
    if default is _REQUIRED:
      raise ValueError(f"data config with name={_get(config, 'name', '?')!r} needs the field "
                       f"{key!r}; see jsds_jax/data/registry.py for the fields of each source")
    return default
  return value


def synthetic_json(data_config: Any) -> pathlib.Path:
  """The synthetic dataset's JSON for this config, generated if absent."""
  params = {k: int(_get(data_config, k, d)) for k, d in
            (("num_images", 40), ("captions_per_image", 2), ("image_size", 64), ("seed", 0))}
  root = pathlib.Path(_get(data_config, "cache_dir", "cache/synthetic")).expanduser()
  root = root / "n{num_images}_c{captions_per_image}_s{image_size}_seed{seed}".format(**params)
  json_path = root / synthetic.JSON_NAME
  if not json_path.is_file():
    synthetic.make_synthetic(root, **params)
  return json_path


def corpus_selection(data_config: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(sources, test_sources) of a name="corpus" config, checked."""
  sources = corpus.parse_sources(_get(data_config, "sources", None), "sources")
  test_sources = _get(data_config, "test_sources", None)
  return sources, (corpus.parse_sources(test_sources, "test_sources") if test_sources else sources)


def _max_test_images(data_config: Any) -> int:
  value = _get(data_config, "max_test_images", 0)
  if not isinstance(value, int) or value < 0:
    raise ValueError(f"data.max_test_images={value!r}: give a number of test pictures >= 0 "
                     "(0 keeps them all)")
  return value


def corpus_dataset_name(data_config: Any) -> str:
  """The dataset (and feature cache folder) name of a name="corpus" config's selection."""
  return corpus.selection_name(*corpus_selection(data_config), _max_test_images(data_config))


def corpus_json(data_config: Any) -> tuple[pathlib.Path, pathlib.Path, str]:
  """(Karpathy JSON, image root, dataset name) of a name="corpus" config, built if absent."""
  sources, test_sources = corpus_selection(data_config)
  cache_dir = pathlib.Path(_get(data_config, "cache_dir", "cache/demo")).expanduser()
  full_json = corpus.build_corpus(cache_dir / "corpus", tuxpaint_cache=cache_dir)
  json_path, dataset = corpus.select(full_json, sources, test_sources,
                                     _max_test_images(data_config))
  return json_path, corpus.corpus_paths(cache_dir / "corpus")[1], dataset
TRAIN_SPLITS = ("train", "restval")


def include_restval(data_config: Any, default: Any) -> Any:
  """Whether "train" takes "restval": `train_splits` when given, else `include_restval`
  (else `default`).

  Raises:
    ValueError: `train_splits` names something other than "train" and "restval", or lacks
      "train".
  """
  splits = tuple(_get(data_config, "train_splits", ()) or ())
  if not splits:
    return _get(data_config, "include_restval", default)
  if "train" not in splits or not set(splits) <= set(TRAIN_SPLITS):
    raise ValueError(f"data.train_splits={splits!r}: use ('train',) or ('train', 'restval')")
  return "restval" in splits


def check(data_config: Any) -> None:
  """Checks what can be checked of `data_config` without reading or building data: the name,
  and a corpus's source selection. `encode` calls it before loading the backbone, so a typo
  costs seconds, not a model load.

  Raises:
    ValueError: naming the field, the value and what to use instead.
  """
  name = _get(data_config, "name")
  if name not in NAMES:
    raise ValueError(f"unknown data source name={name!r}; choose one of {', '.join(NAMES)}")
  if name == "corpus":
    corpus_dataset_name(data_config)
  include_restval(data_config, None)


def load_split(data_config: Any, split: str) -> RetrievalSplit:
  """Loads `split` ("train", "val", "test", ...) of the dataset `data_config` describes."""
  name = _get(data_config, "name")
  skip_bad = bool(_get(data_config, "skip_bad", False))
  if name == "karpathy":
    return karpathy.load_karpathy(
        os.path.expanduser(_get(data_config, "json")),
        os.path.expanduser(_get(data_config, "image_root")), split,
        dataset_name=_get(data_config, "dataset", None) or None, skip_bad=skip_bad,
        include_restval=include_restval(data_config, None))
  if name == "coco_tfds":
    data_dir = _get(data_config, "data_dir", None)
    return coco_tfds.load_coco_tfds(
        split, data_dir=os.path.expanduser(data_dir) if data_dir else None,
        karpathy=bool(include_restval(data_config, True)),
        download=bool(_get(data_config, "download", False)), skip_bad=skip_bad)
  if name == "demo":
    cache_dir = pathlib.Path(_get(data_config, "cache_dir", "cache/demo")).expanduser()
    json_path = demo_tuxpaint.build_demo(cache_dir)
    return karpathy.load_karpathy(json_path, demo_tuxpaint.demo_paths(cache_dir)[1], split,
                                  dataset_name=demo_tuxpaint.DATASET, skip_bad=skip_bad)
  if name == "corpus":
    json_path, image_root, dataset = corpus_json(data_config)
    return karpathy.load_karpathy(json_path, image_root, split, dataset_name=dataset,
                                  skip_bad=skip_bad)
  if name == "synthetic":
    json_path = synthetic_json(data_config)
    return karpathy.load_karpathy(json_path, json_path.parent / synthetic.IMAGES_DIR, split,
                                  dataset_name=synthetic.DATASET, skip_bad=skip_bad)
  raise ValueError(f"unknown data source name={name!r}; choose one of {', '.join(NAMES)}")
