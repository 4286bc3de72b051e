"""Tests for the offline corpus (jsds_jax/data/corpus.py and its sources) on small fixtures.

The npm tarballs are made here, laid out like the real packages and named as `npm pack` names
them, and placed where the build looks first, so nothing is downloaded.
"""

import io
import json
import tarfile

import ml_collections
import numpy as np
from PIL import Image
import pytest

from jsds_jax.data import captions as cap
from jsds_jax.data import corpus
from jsds_jax.data import demo_tuxpaint
from jsds_jax.data import emoji
from jsds_jax.data import icons
from jsds_jax.data import karpathy
from jsds_jax.data import npm_package
from jsds_jax.data import registry
from jsds_jax.data import svg_render
from jsds_jax.data.corpus_source import emoji_concept
from jsds_jax.data.split import BadItemError
from jsds_jax import encode


def _svg(color, width=24, height=24, shape=None):
  shape = shape or f'<rect x="4" y="4" width="{width - 8}" height="{height - 8}" fill="{color}"/>'
  return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
          f'viewBox="0 0 {width} {height}">{shape}</svg>')


def _circle(color, r):
  return _svg(color, shape=f'<circle cx="12" cy="12" r="{r}" fill="{color}"/>')


# --- captions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name, words", [
    ("account-network-outline", "account network outline"),
    ("alarmClockCheck", "alarm clock check"),
    ("a_b_2", "a b 2"),
    ("arrow2x", "arrow 2 x"),
    ("HTTPServer", "http server"),
    ("  --  ", ""),
])
def test_split_name(name, words):
  assert cap.split_name(name) == words


def test_join_tags_drops_repeats_and_the_name_and_stops():
  tags = ["Face", "grin", "face", "text-align", " ", 7, "happy  smile", "grinning face"]
  assert cap.join_tags(tags, exclude=["grinning face"]) == "grin, text align, 7, happy smile"
  assert cap.join_tags(tags, exclude=["grinning face"], max_tags=2) == "grin, text align"
  assert cap.join_tags([], exclude=["x"]) == ""


def test_unique_captions():
  assert cap.unique_captions(["  A  frog ", "a frog", "", "tags, here"]) == ("A frog",
                                                                             "tags, here")


def test_emoji_hexcodes_and_concepts():
  assert emoji.normalize_hexcode("31-20e3") == emoji.normalize_hexcode("0031-FE0F-20E3")
  assert emoji.normalize_hexcode("2764-fe0f") == "2764"
  assert emoji_concept("1F44B-1F3FB") == emoji_concept("1F44B") == "emoji:1F44B"
  assert emoji_concept("1F3FB") == "emoji:1F3FB"  # a modifier alone stays itself


# --- fake packages ----------------------------------------------------------------------------


def _openmoji_files():
  meta = [
      {"hexcode": "1F600", "annotation": "grinning face", "tags": "face, grin, happy",
       "openmoji_tags": "smile", "skintone": "", "skintone_base_hexcode": ""},
      {"hexcode": "1F44B", "annotation": "waving hand", "tags": "hand, wave, waving",
       "openmoji_tags": "", "skintone": "", "skintone_base_hexcode": ""},
      {"hexcode": "1F44B-1F3FB", "annotation": "waving hand: light skin tone",
       "tags": "hand, wave, waving", "openmoji_tags": "", "skintone": "1",
       "skintone_base_hexcode": "1F44B"},
      {"hexcode": "1F438", "annotation": "frog", "tags": "face", "openmoji_tags": "",
       "skintone": "", "skintone_base_hexcode": ""},                        # no SVG
      {"hexcode": "E000", "annotation": "  ", "tags": "", "openmoji_tags": "", "skintone": ""},
  ]
  files = {"data/openmoji.json": json.dumps(meta).encode()}
  for k, hexcode in enumerate(("1F600", "1F44B", "1F44B-1F3FB", "E000", "2B50")):
    files[f"color/svg/{hexcode}.svg"] = _circle(f"#{40 * k:02x}8000", 8 + k).encode()
  return files


def _twemoji_files():
  svgs = {f"{name}.svg": _circle(color, 9).encode() for name, color in (
      ("1f600", "#ffcc00"), ("1f44b", "#ffcc01"), ("1f44b-1f3fb", "#ffcc02"),
      ("31-20e3", "#0000ff"), ("e50a", "#000000"))}
  names = [
      {"label": "grinning face", "hexcode": "1F600", "tags": ["face", "grin"]},
      {"label": "waving hand", "hexcode": "1F44B", "tags": ["hand", "wave"],
       "skins": [{"label": "waving hand: light skin tone", "hexcode": "1F44B-1F3FB"}]},
      {"label": "keycap: 1", "hexcode": "0031-FE0F-20E3", "tags": ["keycap"]},
  ]
  return svgs, {"en/data.json": json.dumps(names).encode()}


def _tabler_files():
  meta = {
      "heart": {"name": "heart", "category": "Shapes", "tags": ["love", "like", "heart"],
                "styles": {"outline": {}, "filled": {}}},
      "a-b": {"name": "a-b", "category": "", "tags": ["ab test", "split-test"],
              "styles": {"outline": {}}},
      "ghost": {"name": "ghost", "category": "", "tags": [], "styles": {"outline": {}}},
  }
  return {"icons.json": json.dumps(meta).encode(),
          "icons/outline/heart.svg": _svg("#000000").encode(),
          "icons/filled/heart.svg": _circle("#000000", 10).encode(),
          "icons/outline/a-b.svg": _circle("#000000", 5).encode(),
          "icons/outline/unlisted.svg": _circle("#000000", 3).encode()}


GLYPHS = 30


def _mdi_files():
  meta = [
      {"id": "A", "baseIconId": "A", "name": "account", "aliases": ["user", "person"],
       "tags": ["Account / User"]},
      {"id": "B", "baseIconId": "A", "name": "account-outline", "aliases": [], "tags": []},
      {"id": "C", "baseIconId": "C", "name": "heart-pulse", "aliases": [], "tags": []},
      {"id": "D", "baseIconId": "D", "name": "heart-copy", "aliases": [], "tags": []},
  ]
  # Enough plain icons that every split has some (the named ones above all hash to train).
  glyphs = {f"glyph-{k}": _svg(f"#{k:02x}0000") for k in range(GLYPHS)}
  meta += [{"id": name, "baseIconId": name, "name": name, "aliases": [], "tags": []}
           for name in glyphs]
  return {"meta.json": json.dumps(meta).encode(),
          **{f"svg/{name}.svg": svg.encode() for name, svg in glyphs.items()},
          "svg/account.svg": _circle("#111111", 7).encode(),
          "svg/account-outline.svg": _circle("#111111", 6).encode(),
          "svg/heart-pulse.svg": _circle("#111111", 4).encode(),
          "svg/heart-copy.svg": _circle("#111111", 4).encode(),           # the same picture
          "svg/broken.svg": b"<svg"}


def _lucide_files():
  return {"tags.json": json.dumps({"heart": ["love", "like"], "sun": ["weather"],
                                   "bad": []}).encode(),
          "icons/heart.svg": _circle("#000000", 11).encode(),
          "icons/sun.svg": _circle("#ffaa00", 6).encode(),
          "icons/bad.svg": b"<svg xmlns='http://www.w3.org/2000/svg'><rect width='oops",
          "icons/old-heart.svg": _circle("#000000", 11).encode()}


PACKAGES = {
    emoji.OPENMOJI_PACKAGE: _openmoji_files(),
    emoji.TWEMOJI_PACKAGE: _twemoji_files()[0],
    emoji.EMOJIBASE_PACKAGE: _twemoji_files()[1],
    icons.TABLER_PACKAGE: _tabler_files(),
    icons.MDI_PACKAGE: _mdi_files(),
    icons.LUCIDE_PACKAGE: _lucide_files(),
}


def _write_tarball(path, files):
  path.parent.mkdir(parents=True, exist_ok=True)
  with tarfile.open(path, "w:gz") as tar:
    for name, data in {**files, "package.json": b"{}"}.items():
      info = tarfile.TarInfo(f"package/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _place_packages(download_dir):
  for spec, files in PACKAGES.items():
    _write_tarball(download_dir / npm_package.tarball_name(spec), files)


def _fake_demo(cache):
  """A finished demo build: the JSON and two JPEG pictures."""
  records = []
  for k, (name, caption) in enumerate((("animals/frog", "A frog."), ("town/house", "A house."))):
    folder, filename = name.rsplit("/", 1)
    path = cache / demo_tuxpaint.IMAGES_DIR / folder / f"{filename}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (0, 160, 0)).save(path)
    records.append(karpathy.make_record(f"{filename}.jpg", "train", [caption], imgid=k,
                                        first_sentid=k, filepath=folder))
  karpathy.write_karpathy(demo_tuxpaint.demo_paths(cache)[0], records, dataset="demo")


# --- sources ----------------------------------------------------------------------------------


def test_read_openmoji():
  items, bad = emoji.read_openmoji([_openmoji_files()])
  by_key = {i.key: i for i in items}
  assert sorted(by_key) == ["1F44B", "1F44B-1F3FB", "1F600"]
  assert by_key["1F600"].captions == ("grinning face", "grin, happy, smile")
  assert by_key["1F44B-1F3FB"].captions == ("waving hand: light skin tone",)  # no shared tags
  assert by_key["1F44B-1F3FB"].concept == by_key["1F44B"].concept == "emoji:1F44B"
  assert len(bad) == 3
  assert any("1F438" in b and "color/svg/1F438.svg" in b for b in bad)
  assert any("E000" in b and "empty annotation" in b for b in bad)
  assert any("2B50" in b and "no entry" in b for b in bad)


def test_read_twemoji_matches_names_across_spellings():
  items, bad = emoji.read_twemoji(list(_twemoji_files()))
  by_key = {i.key: i for i in items}
  assert by_key["31-20e3"].captions == ("keycap: 1",)  # its one tag is in the name
  assert by_key["1f600"].captions == ("grinning face", "grin")
  assert by_key["1f600"].concept == "emoji:1F600"  # the same concept as openmoji's 1F600
  assert by_key["1f44b-1f3fb"].concept == "emoji:1F44B"
  assert bad == ["twemoji e50a.svg: no English name for E50A in emojibase-data"]


def test_read_icon_sets():
  items, bad = icons.read_tabler([_tabler_files()])
  by_key = {i.key: i for i in items}
  assert by_key["outline/heart"].captions == ("heart", "love, like, shapes")
  assert by_key["filled/heart"].captions == ("heart filled",)
  assert by_key["filled/heart"].concept == by_key["outline/heart"].concept == "icon:heart"
  assert by_key["outline/a-b"].captions == ("a b", "ab test, split test")
  assert sorted(bad) == ["tabler icons/outline/unlisted.svg: no entry in icons.json (no name)",
                         "tabler outline/ghost: in icons.json but icons/outline/ghost.svg is "
                         "not in the package"]

  items, bad = icons.read_mdi([_mdi_files()])
  by_key = {i.key: i for i in items}
  assert by_key["account"].captions == ("account", "user, person")  # "Account / User" split
  assert by_key["account-outline"].concept == "icon:account"      # via baseIconId
  assert bad == ["mdi svg/broken.svg: no entry in meta.json (no name)"]

  items, bad = icons.read_lucide([_lucide_files()])
  assert {i.key: i.captions for i in items}["heart"] == ("heart", "love, like")
  assert {i.key: i.concept for i in items}["heart"] == "icon:heart"  # tabler's heart's too
  assert bad == ["lucide icons/old-heart.svg: no entry in tags.json (an alias file of a "
                 "renamed icon)"]


# --- rendering --------------------------------------------------------------------------------


def test_render_svg_on_white_keeps_the_aspect():
  wide = ('<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20" viewBox="0 0 40 20">'
          '<rect width="40" height="20" fill="#ff0000"/></svg>')
  image = svg_render.render_svg(wide, 32, "wide")
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8
  assert image[0, 0].tolist() == [255, 255, 255]  # padding above the picture is white
  assert image[16, 16].tolist() == [255, 0, 0]    # the picture fills the middle rows
  assert image[16, 0].tolist() == [255, 0, 0]     # ...from edge to edge
  empty = svg_render.render_svg(_svg("none"), 16, "empty")
  assert empty.min() == 255  # nothing drawn: transparent became white, not black


def test_render_svg_names_a_bad_picture():
  with pytest.raises(BadItemError, match="cannot render SVG lucide bad"):
    svg_render.render_svg("<svg", 16, "lucide bad")


# --- build, select, load ----------------------------------------------------------------------


@pytest.fixture
def built(tmp_path):
  cache = tmp_path / "data"
  _place_packages(cache / "corpus" / "download")
  _fake_demo(cache)
  json_path = corpus.build_corpus(cache / "corpus", tuxpaint_cache=cache, image_size=32,
                                  verbose=False)
  return cache, json_path


def test_build_corpus(built):
  cache, json_path = built
  data = json.loads(json_path.read_text())
  records = data["images"]
  assert data["dataset"] == "corpus"
  ids = [r["imgid"] for r in records]
  assert len(ids) == len(set(ids)) == 3 + 4 + 3 + (3 + GLYPHS) + 2 + 2
  assert {r["split"] for r in records} == {"train", "val", "test"}
  assert "openmoji/1F44B-1F3FB" in ids and "tuxpaint/animals/frog" in ids
  by_concept = {}
  for r in records:
    assert r["split"] == corpus.split_of(r["concept"])
    assert r["license"] and r["origin"] and r["source"] == r["imgid"].split("/")[0]
    by_concept.setdefault(r["concept"], set()).add(r["split"])
    image = np.asarray(Image.open(cache / "corpus" / r["filepath"] / r["filename"]))
    if r["source"] != "tuxpaint":
      assert image.shape == (32, 32, 3)
  assert all(len(splits) == 1 for splits in by_concept.values())
  assert {r["source"] for r in records if r["concept"] == "icon:heart"} == {"tabler", "lucide"}
  frog = next(r for r in records if r["imgid"] == "tuxpaint/animals/frog")
  assert [s["raw"] for s in frog["sentences"]] == ["A frog."]
  assert frog["license"] == corpus.TUXPAINT_LICENSE

  report = json.loads((cache / "corpus" / corpus.REPORT_NAME).read_text())
  assert report["sources"]["mdi"]["license"] == "Apache-2.0"
  assert report["sources"]["mdi"]["images"] == 3 + GLYPHS
  left_out = report["left_out"]
  assert "mdi heart-pulse: the same SVG as heart-copy" in left_out["mdi"]
  assert any(b.startswith("cannot render SVG lucide bad") for b in left_out["lucide"])
  assert len(left_out["openmoji"]) == 3 and len(left_out["twemoji"]) == 1

  # A finished build is not redone; a rebuild reuses the rendered pictures, same JSON.
  png = cache / "corpus" / "images" / "mdi" / "account.png"
  mtime = png.stat().st_mtime_ns
  assert corpus.build_corpus(cache / "corpus", cache, verbose=False) == json_path
  first = json_path.read_bytes()
  json_path.unlink()
  corpus.build_corpus(cache / "corpus", cache, image_size=32, verbose=False)
  assert png.stat().st_mtime_ns == mtime and json_path.read_bytes() == first
  assert not [p for p in (cache / "corpus").rglob("*") if ".tmp-" in p.name]


def test_select_holds_out_a_source(built):
  _, json_path = built
  train_sources = tuple(s for s in corpus.ALL_SOURCES if s != "mdi")
  path, name = corpus.select(json_path, train_sources, ("mdi",))
  assert name == "corpus-openmoji+twemoji+tabler+lucide+tuxpaint-test-mdi"
  records = json.loads(path.read_text())["images"]
  assert all((r["source"] == "mdi") == (r["split"] == "test") for r in records)
  everything = json.loads(json_path.read_text())["images"]
  held_out = {r["imgid"] for r in everything if r["source"] == "mdi" and r["split"] != "train"}
  assert len(held_out) >= 4 and {r["split"] for r in everything if r["imgid"] in held_out} == {
      "val", "test"}
  assert {r["imgid"] for r in records if r["split"] == "test"} == held_out  # val joins test
  assert len(records) == sum(r["source"] != "mdi" for r in everything) + len(held_out)
  # A test source that is also trained on keeps its own test split only.
  path, name = corpus.select(json_path, ("mdi", "tabler"), ("mdi",))
  assert name == "corpus-tabler+mdi-test-mdi"
  tested = {r["imgid"] for r in json.loads(path.read_text())["images"] if r["split"] == "test"}
  assert tested == {r["imgid"] for r in everything if r["source"] == "mdi"
                    and r["split"] == "test"}
  assert corpus.select(json_path, corpus.ALL_SOURCES, corpus.ALL_SOURCES) == (json_path,
                                                                              "corpus")
  # A test cap keeps a fixed hash-chosen subset of the test pictures, and nothing else changes.
  path, name = corpus.select(json_path, train_sources, ("mdi",), max_test_images=2)
  assert name == "corpus-openmoji+twemoji+tabler+lucide+tuxpaint-test-mdi-2test"
  capped = json.loads(path.read_text())["images"]
  capped_test = sorted(r["imgid"] for r in capped if r["split"] == "test")
  assert len(capped_test) == 2 and set(capped_test) <= held_out
  first_two = sorted(held_out, key=corpus._hash_rank)[:2]  # pylint: disable=protected-access
  assert capped_test == sorted(first_two)
  assert len(capped) == len(records) - len(held_out) + 2
  with pytest.raises(corpus.CorpusError, match="no pictures of source.*phosphor"):
    corpus.select(json_path, ("phosphor",), ("phosphor",))


def test_registry_and_cache_names(built):
  cache, _ = built
  config = ml_collections.ConfigDict({"name": "corpus", "cache_dir": str(cache),
                                      "sources": "", "test_sources": "",
                                      "max_test_images": 0})
  splits = {}
  for split in ("train", "val", "test"):
    try:
      splits[split] = registry.load_split(config, split)
    except ValueError:  # a tiny fixture may leave a split empty
      continue
  assert sum(s.num_images for s in splits.values()) == 17 + GLYPHS
  assert set(splits) == {"train", "val", "test"}
  assert {s.dataset for s in splits.values()} == {"corpus"}
  assert encode.dataset_key(config) == "corpus"
  some = next(iter(splits.values()))
  assert some.load_image(0).dtype == np.uint8
  config.sources, config.test_sources = "mdi, tabler", "lucide"
  assert encode.dataset_key(config) == "corpus-tabler+mdi-test-lucide"
  config.max_test_images = 5
  assert encode.dataset_key(config) == "corpus-tabler+mdi-test-lucide-5test"
  config.max_test_images = -1
  with pytest.raises(ValueError, match="data.max_test_images=-1"):
    registry.load_split(config, "train")
  config.max_test_images = 0
  config.sources = "mdi,nope"
  with pytest.raises(ValueError, match="data.sources='mdi,nope': unknown source.*nope"):
    registry.load_split(config, "train")


def test_npm_package_errors(tmp_path, monkeypatch):
  assert npm_package.tarball_name("@mdi/svg@7.4.47") == "mdi-svg-7.4.47.tgz"
  with pytest.raises(ValueError, match="name@version"):
    npm_package.tarball_name("openmoji")
  monkeypatch.setattr(npm_package.shutil, "which", lambda name: None)
  with pytest.raises(npm_package.PackageError, match="npm pack openmoji@1.0.*openmoji-1.0.tgz"):
    npm_package.download_tarball("openmoji@1.0", tmp_path)
  (tmp_path / "x.tgz").write_bytes(b"not gzip")
  with pytest.raises(npm_package.PackageError, match="x.tgz is not a readable npm tarball"):
    npm_package.read_files(tmp_path / "x.tgz", lambda path: True)


def test_missing_renderer_says_how_to_install(monkeypatch):
  import builtins  # pylint: disable=g-import-not-at-top
  real_import = builtins.__import__

  def no_resvg(name, *args, **kwargs):
    if name == "resvg_py":
      raise ImportError("No module named 'resvg_py'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_resvg)
  with pytest.raises(svg_render.MissingRendererError, match=r"jsds-jax\[corpus\]"):
    svg_render.render_svg(_svg("#000000"), 16, "x")
