"""Explanations: top terms and shared terms on hand-made vectors, the vocabulary, thumbnails, and
an HTML report that escapes every caption and term."""

import base64
import html.parser
import re

import numpy as np
import pytest
import scipy.sparse as sp

from jsds_jax import eval as eval_lib
from jsds_jax import explain
from jsds_jax.evaluation import report as report_lib
from jsds_jax import tail_outputs
from jsds_jax.data import feature_cache
from jsds_jax.evaluation import report as report_lib
from jsds_jax.evaluation import scores as scores_lib
from jsds_jax.models.trunk import backbones
from test_eval import tiny_config  # pylint: disable=g-bad-import-order
from test_eval import tiny_params  # pylint: disable=g-bad-import-order

VOCAB = ["[PAD]", "dog", "cat", "skate", "board", "red", "<b>", "&"]
MARKUP = "<script>alert(1)</script> & a dog"


def test_top_terms_orders_by_weight_and_skips_zeros():
  z = np.array([0, 0.5, 2.0, 0, 1.0, 0.5, 0, 0], np.float32)
  assert explain.top_terms(z, VOCAB, 3) == [("cat", 2.0), ("board", 1.0), ("dog", 0.5)]
  assert explain.top_terms(z, VOCAB, 10) == [("cat", 2.0), ("board", 1.0), ("dog", 0.5),
                                             ("red", 0.5)]  # tie: the smaller id first
  assert explain.top_terms(sp.csr_matrix(z[None]), VOCAB, 3) == explain.top_terms(z, VOCAB, 3)
  assert explain.top_terms(np.zeros(8), VOCAB, 3) == []


def test_shared_terms_add_up_to_the_sparse_score():
  q = np.array([0, 1.0, 0, 2.0, 0.5, 0, 0, 0], np.float32)
  d = np.array([3.0, 0.5, 1.0, 0.25, 0, 0, 0, 0], np.float32)
  shared = explain.shared_terms(q, d, VOCAB, 10)
  assert shared == [("skate", 0.5), ("dog", 0.5)] or shared == [("dog", 0.5), ("skate", 0.5)]
  assert shared[0][0] == "dog"  # equal contributions: the smaller id first
  assert sum(w for _, w in shared) == pytest.approx(float(q @ d))
  assert explain.shared_terms(q, sp.csr_matrix(d[None]), VOCAB, 1) == [("dog", 0.5)]


@pytest.fixture(scope="module")
def backbone():
  import ml_collections  # pylint: disable=g-import-not-at-top
  return backbones.load_backbone(ml_collections.ConfigDict(
      {"name": "tiny", "max_text_len": 16, "seed": 0}))


def test_vocabulary_is_the_tokenizers(backbone):
  vocab = explain.vocabulary(backbone)
  assert len(vocab) == backbone.vocab_size
  ids, _ = backbone.tokenize(["dog skateboard"])
  assert vocab[ids[0, 1]] == "dog"
  assert vocab[0] == "[PAD]"


def test_vocabulary_takes_a_name_or_a_config_section_or_says_what_it_wants(backbone):
  want = explain.vocabulary(backbone)
  assert explain.vocabulary("tiny") == want
  assert explain.vocabulary({"name": "tiny", "max_text_len": 16}) == want
  with pytest.raises(TypeError, match="a backbone name such as 'lit'.*got int"):
    explain.vocabulary(3)
  with pytest.raises(ValueError, match="unknown backbone.name 'litt'"):
    explain.vocabulary("litt")


def test_thumbnail_is_an_embedded_jpeg(tmp_path):
  uri = explain.thumbnail_data_uri(np.full((300, 200, 3), 200, np.uint8), size=64)
  assert uri.startswith("data:image/jpeg;base64,")
  (tmp_path / "bad.png").write_bytes(b"not an image")
  assert explain.thumbnail_data_uri(tmp_path / "bad.png") is None
  assert explain.thumbnail_data_uri(tmp_path / "missing.png") is None


class _Collector(html.parser.HTMLParser):
  """Every start tag and all text of a page."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.tags, self.text = [], []

  def handle_starttag(self, tag, attrs):
    self.tags.append(tag)

  def handle_data(self, data):
    self.text.append(data)


def test_report_escapes_captions_and_terms():
  hit = explain.Hit(image_id="<img1>", score=1.5, correct=True, thumbnail=None,
                    caption=MARKUP, terms=[("<b>", 0.7), ("&", 0.2)])
  page = explain.render_html_report(
      [explain.Example(query=MARKUP, query_terms=[("<b>", 1.0), ("&", 0.5)],
                       ranked={"sparse": [hit], "dense": [hit]})],
      title="t <i>", notes=["n & <u>"])
  assert "<script>" not in page and "alert(1)</script>" not in page
  assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; a dog" in page
  assert "&lt;b&gt;" in page and "&lt;img1&gt;" in page
  parsed = _Collector()
  parsed.feed(page)
  assert not {"script", "u", "img1"} & set(parsed.tags)
  assert MARKUP in "".join(parsed.text)  # the reader sees the caption as written


_REPORT = {
    "t2i": {"dense": {"R@1": 41.25, "R@5": 70.0, "R@10": 80.0, "rsum": 191.25},
            "sparse": {"R@1": 33.75, "R@5": 60.0, "R@10": 72.5, "rsum": 166.25}},
    "i2t": {"dense": {"R@1": 45.0, "R@5": 71.0, "R@10": 81.0, "rsum": 197.0},
            "sparse": {"R@1": 30.0, "R@5": 55.0, "R@10": 66.0, "rsum": 151.0}},
    "sparsity": {"caption_nnz": 17.5, "image_nnz": 52.25, "flops": 3.125},
    "split": {"num_images": 80, "num_captions": 80},
}


def test_report_page_labels_hits_and_shows_the_metrics_and_the_plot():
  hit = explain.Hit(image_id="tux-4", score=80.539, correct=False, thumbnail=None,
                    caption="a penguin")
  png = b"\x89PNG\r\n\x1a\n-not-really"
  page = explain.render_html_report(
      [explain.Example(query="a penguin", query_terms=[], ranked={"sparse": [hit]})],
      report=_REPORT, pruning_png=png)
  parsed = _Collector()
  parsed.feed(page)
  text = " ".join(" ".join(parsed.text).split())
  assert "#1 score 80.539 image tux-4" in text
  assert ("dense 41.25 70.00 80.00 45.00 71.00 81.00 388.25" in text
          and "sparse 33.75 60.00 72.50 30.00 55.00 66.00 317.25" in text), text
  assert "17.5 non-zeros per caption, 52.2 per image, FLOPs 3.125" in text
  assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in page
  # Hits of one query sit in one flex row aligned at their tops, not on a text baseline.
  assert ".hits{display:flex;flex-wrap:wrap;align-items:flex-start}" in page
  assert "<div class='hits'><div class=\"hit\">" in page


def test_pruning_plot_has_a_dense_reference_line():
  curve = [{"k": k, "flops": f, "sparse_R@1": s, "integrated_R@1": i}
           for k, f, s, i in ((4, 0.5, 10.0, 35.0), (None, 3.0, 30.0, 45.0))]
  fig = report_lib.pruning_figure(curve, dense_r1=41.25)
  lines = {line.get_label(): line for line in fig.axes[0].lines}
  dense = [line for label, line in lines.items() if label.startswith("dense")]
  assert len(dense) == 1 and set(dense[0].get_ydata()) == {41.25}
  assert {"sparse", "integrated"} <= set(lines)
  assert not [label for label in {line.get_label() for line in
                                  report_lib.pruning_figure(curve).axes[0].lines}
              if label.startswith("dense")]


def test_eval_writes_a_self_contained_escaped_report(backbone, tmp_path, tmp_path_factory):
  config = tiny_config(tmp_path, tmp_path_factory)
  split_dir = eval_lib.find_or_build_cache(config, "test", backbone)
  params = tiny_params(backbone)
  cache = dict(feature_cache.load_split(split_dir))
  items = dict(cache["items"])
  items["captions"] = [MARKUP if i == 0 else c for i, c in enumerate(items["captions"])]
  cache["items"] = items
  out = tail_outputs.apply_tail(params, cache)
  scores = scores_lib.score_matrices(out, 0.3, 0.7)
  examples = report_lib.html_examples(out, scores, cache, explain.vocabulary(backbone),
                                    num_queries=3, k=2)
  assert examples[0].query == MARKUP
  assert [len(e.ranked["sparse"]) for e in examples] == [2, 2, 2]
  top = examples[0].ranked["sparse"][0]
  assert top.score == pytest.approx(float(scores["sparse"][0].max()), rel=1e-5)
  page = explain.render_html_report(examples)
  assert "<script>" not in page and "&lt;script&gt;" in page
  # Self-contained: every image is embedded, nothing is fetched.
  srcs = re.findall(r'src="([^"]*)"', page)
  assert srcs and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
  assert "http" not in page
  # And eval itself writes it (tests/test_search.py checks html_report=False writes none).
  eval_lib.evaluate(config, params, split_dir, tmp_path / "on", backbone=backbone,
                    write_index=False)
  written = (tmp_path / "on" / "report.html").read_text()
  assert written.startswith("<!DOCTYPE html>")
  assert "t2i R@1" in written and 'src="data:image/png;base64,' in written
