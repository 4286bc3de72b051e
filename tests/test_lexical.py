"""jsds_jax.evaluation.lexical on hand-made vectors and a hand-made vocabulary."""

import numpy as np
import pytest
import scipy.sparse as sp

from jsds_jax.evaluation import lexical

# 0..4 junk (special, unused, punctuation, symbol, stopword), 5..9 content.
VOCAB = ["[CLS]", "[unused3]", ".", "—", "the", "cat", "dog", "##s", "sun", "red"]
CLS, UNUSED, DOT, DASH, THE, CAT, DOG, S, SUN, RED = range(10)


def test_term_classes():
  c = lexical.term_classes(VOCAB)
  assert c["special"].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
  assert c["punct"].tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0, 0]
  assert c["stop"].tolist() == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]
  assert c["content"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
  assert (c["junk"] == ~c["content"]).all()
  # Continuations are never stopwords; BPE word ends and wordpiece marks are stripped.
  assert not lexical.is_stopword("##the") and lexical.is_stopword("the</w>")
  assert lexical.is_punctuation("##.") and not lexical.is_punctuation("##s")
  assert lexical.is_special("<|endoftext|>") and not lexical.is_special("[ a ]")


def test_top_terms_dense_and_sparse_agree_with_ties_and_padding():
  z = np.array([[0, 2, 0, 3, 0, 2, 0, 0, 0, 0],
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 1]], np.float32)
  for zz in (z, sp.csr_matrix(z)):
    ids, w = lexical.top_terms(zz, 3)
    assert ids.tolist() == [[3, 1, 5], [9, -1, -1]]  # tie 1 vs 5: the smaller id first
    np.testing.assert_array_equal(w, [[3, 2, 2], [1, 0, 0]])
  ids, _ = lexical.top_terms(z, 12)  # k > V pads
  assert ids.shape == (2, 12) and ids[0, 3] == -1


def test_grounding_and_junk_mass():
  # Caption 0 "the cat ." tops with its own word; caption 1 "red dog" tops with junk and "sun".
  token_ids = np.array([[CLS, THE, CAT, DOT, -1], [CLS, RED, DOG, -1, -1]])
  z_t = np.zeros((2, 10), np.float32)
  z_t[0, [DOT, CAT]] = [5, 1]
  z_t[1, [CLS, SUN]] = [4, 1]
  classes = lexical.term_classes(VOCAB)
  ids_t, w_t = lexical.top_terms(z_t, 2)
  assert lexical.caption_self_grounding(ids_t, token_ids, classes["content"], w_t) == 0.5
  # With only the top 1, caption 0's "cat" is out: nobody is grounded.
  ids1, w1 = lexical.top_terms(z_t, 1)
  assert lexical.caption_self_grounding(ids1, token_ids, classes["content"], w1) == 0.0
  # Images: image 0 has both captions; image 1 has none, so it can never be grounded.
  z_i = np.zeros((2, 10), np.float32)
  z_i[0, [DOG, THE]] = [1, 3]  # "dog" is caption 1's word; "the" is a stopword, not content
  z_i[1, [CAT]] = [2]
  ids_i, w_i = lexical.top_terms(z_i, 2)
  cap_img = np.array([0, 0])
  assert lexical.image_grounding(ids_i, token_ids, cap_img, classes["content"], w_i) == 0.5
  ids_i1, w_i1 = lexical.top_terms(z_i, 1)
  assert lexical.image_grounding(ids_i1, token_ids, cap_img, classes["content"], w_i1) == 0.0
  # Junk mass: captions 5 + 4 of 11 on junk; images 3 of 6.
  assert lexical.junk_mass(z_t, classes["junk"]) == pytest.approx(9 / 11)
  assert lexical.junk_mass(sp.csr_matrix(z_i), classes["junk"]) == pytest.approx(3 / 6)
  assert lexical.junk_mass(np.zeros((1, 10)), classes["junk"]) == 0.0

  m = lexical.lexical_metrics_of(z_t, sp.csr_matrix(z_i), token_ids, cap_img, VOCAB, k=2)
  assert m["caption_self_grounding"] == 0.5 and m["image_grounding"] == 0.5
  assert m["junk_mass"] == pytest.approx(12 / 17)
  assert m["junk_mass_text"] == pytest.approx(9 / 11)
  # Special or punctuation among the top 2: caption 0 (.), caption 1 ([CLS]); no image.
  assert m["special_or_punct_in_top"] == pytest.approx(0.5)
  # "cat" is in the top 2 of caption 0 and image 1, every other term of one vector.
  assert m["max_top_term_share"] == pytest.approx(0.5)
  assert [t for t, _ in m["top_terms"]][:3] == ["cat", "[CLS]", "."]
  # Per side: "cat" tops 1 of 2 captions (and caption 0 holds it: natural share 1/2); among
  # the images "the" and "dog" (image 0) and "cat" (image 1) each top 1 of 2; image 0's
  # captions hold "dog", image 1 has no caption.
  assert m["max_top_term_share_text"] == pytest.approx(0.5)
  assert m["max_top_term_share_image"] == pytest.approx(0.5)
  text_terms = {t: (s, n) for t, s, n in m["top_terms_text"]}
  assert text_terms["cat"] == (pytest.approx(0.5), pytest.approx(0.5))
  assert text_terms["sun"] == (pytest.approx(0.5), pytest.approx(0.0))
  image_terms = {t: (s, n) for t, s, n in m["top_terms_image"]}
  assert image_terms["dog"] == (pytest.approx(0.5), pytest.approx(0.5))
  assert image_terms["cat"] == (pytest.approx(0.5), pytest.approx(0.5))  # caption 0 has "cat"
  # Over-use: "sun" tops caption 1, which does not say it (+50 points); every image's top
  # terms are words of its captions as often as they say them (no excess).
  assert m["most_overused_text"] == ["sun", pytest.approx(0.5), pytest.approx(0.0)]
  assert m["overuse_text"] == pytest.approx(0.5)
  assert m["overuse_image"] == pytest.approx(0.0)
  lines = "\n".join(lexical.render_markdown(m))
  assert "`cat` 50.0%" in lines and "`[CLS]` 25.0%" in lines
  assert "`sun` 50.0% (0.0%)" in lines
  assert "captions +50.0 points (`sun` in 50.0% of the top-2 lists, its word in 0.0%)" in lines


def test_top_term_shares_count_each_row_once():
  ids = np.array([[5, 5, -1], [5, 6, 7], [8, -1, -1]])
  shares = lexical.top_term_shares(ids, VOCAB, n=2)
  assert shares == [("cat", pytest.approx(2 / 3)), ("dog", pytest.approx(1 / 3))]
  assert lexical.top_term_shares(np.zeros((0, 3), int), VOCAB) == []


def test_natural_shares_per_caption_and_per_image_and_overuse_picks_the_excess():
  token_ids = np.array([[CAT, DOG, -1], [CAT, CAT, SUN], [RED, -1, -1], [DOG, -1, -1]])
  cap_img = np.array([0, 0, 1, 2])  # image 3 has no caption
  want = np.zeros(10)
  want[[CAT, DOG, SUN, RED]] = [0.5, 0.5, 0.25, 0.25]  # a repeated word counts once
  np.testing.assert_allclose(lexical.natural_share_all(token_ids, 10), want)
  want[[CAT, DOG, SUN, RED]] = [0.25, 0.5, 0.25, 0.25]  # images 0 (2 captions), 1, 2 of 4
  natural = lexical.natural_share_all(token_ids, 10, cap_img, 4)
  np.testing.assert_allclose(natural, want)
  assert lexical.natural_shares([DOG, CAT], token_ids, cap_img, 4) == [0.5, 0.25]
  assert lexical.natural_shares([], token_ids) == []
  # "cat" tops all 4 images (+75 points), "red" tops image 1, whose caption says it (+0).
  top = np.array([[CAT, -1], [CAT, RED], [CAT, -1], [CAT, -1]])
  assert lexical.most_overused_term(top, natural) == (CAT, 1.0, 0.25)
  assert lexical.most_overused_term(np.zeros((0, 2), int), natural) == (-1, 0.0, 0.0)
