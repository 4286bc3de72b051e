"""Tests for jsds_jax/data/demo_tuxpaint.py on a fake stamps tree and a fake .deb.

One test (`network`) downloads and builds the real package (160 MB); the others are offline.
"""

import io
import json
import os
import shutil
import subprocess
import tarfile

import numpy as np
from PIL import Image
import pytest

from jsds_jax.data import demo_tuxpaint as demo
from jsds_jax.data import karpathy
from jsds_jax.data import registry


def _rgba_stamp(width, height, color):
  """A transparent picture with an opaque square of `color` in the middle."""
  array = np.zeros((height, width, 4), np.uint8)
  array[height // 4:3 * height // 4, width // 4:3 * width // 4] = color + (255,)
  return Image.fromarray(array)


def _stamp(root, name, image=None, caption=None, svg=False):
  path = root / name
  path.parent.mkdir(parents=True, exist_ok=True)
  if image is not None:
    image.save(path.with_suffix(".png"))
  if caption is not None:
    path.with_suffix(".txt").write_text(caption + "\nfr.utf8=Une traduction.\n", encoding="utf-8")
  if svg:
    path.with_suffix(".svg").write_text("<svg/>")


def _fake_stamps(root):
  """A stamps tree with every case `find_stamps` distinguishes; 12 usable pictures."""
  _stamp(root, "animals/frog", _rgba_stamp(40, 30, (0, 160, 0)), "  A frog.  ")
  _stamp(root, "animals/frog_mirror", _rgba_stamp(40, 30, (0, 160, 0)))         # no caption
  _stamp(root, "town/big", Image.fromarray(np.full((300, 600, 2), 200, np.uint8)),
         "A big grey picture.", svg=True)                                         # PNG + SVG
  _stamp(root, "town/vector_only", None, "Only an SVG.", svg=True)                # SVG only
  _stamp(root, "town/blank", _rgba_stamp(8, 8, (1, 2, 3)), "   ")                 # empty caption
  palette = Image.new("P", (16, 16), 0)
  palette.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
  palette.paste(1, (4, 4, 12, 12))
  _stamp(root, "symbols/palette", None, "A red square.")
  palette.save(root / "symbols/palette.png", transparency=0)
  (root / "symbols/broken.png").write_bytes(b"\x89PNG not really")              # unreadable
  (root / "symbols/broken.txt").write_text("A broken picture.\n")
  for k in range(10):
    _stamp(root, f"food/fruit/f{k}", _rgba_stamp(20, 20, (10 * k, 0, 0)), f"Fruit number {k}.")


def test_find_stamps_counts_every_case(tmp_path):
  _fake_stamps(tmp_path)
  stamps, counts = demo.find_stamps(tmp_path)
  assert counts == {"png": 16, "no_caption": 1, "empty_caption": 1, "svg_only": 1,
                    "stamps": 14}
  by_name = {s.name: s.caption for s in stamps}
  assert by_name["animals/frog"] == "A frog."
  assert by_name["town/big"] == "A big grey picture."
  assert "animals/frog_mirror" not in by_name and "town/vector_only" not in by_name
  assert [s.name for s in stamps] == sorted(by_name)


def test_build_from_stamps(tmp_path):
  stamps_root, out = tmp_path / "stamps", tmp_path / "out"
  _fake_stamps(stamps_root)
  json_path, summary = demo.build_from_stamps(stamps_root, out, verbose=False)
  assert summary["unreadable"] == 1 and summary["stamps"] == 14
  assert summary["train"] + summary["val"] + summary["test"] == 13
  data = json.loads(json_path.read_text())
  assert data["dataset"] == "demo" and len(data["images"]) == 13
  for record in data["images"]:
    assert record["split"] == demo.split_of(f"{record['filepath']}/{record['filename'][:-4]}")
    assert len(record["sentences"]) == 1
  image_root = demo.demo_paths(out)[1]

  big = np.asarray(Image.open(image_root / "town" / "big.jpg"))
  assert big.shape == (128, 256, 3)  # longer side to 256, aspect kept
  frog = np.asarray(Image.open(image_root / "animals" / "frog.jpg"))
  assert frog.shape == (30, 40, 3)  # small pictures are not enlarged
  assert frog[0, 0].min() >= 240  # transparent corner became white (JPEG: not exactly 255)
  assert abs(int(frog[15, 20, 1]) - 160) <= 12 and frog[15, 20, 0] <= 20
  palette = np.asarray(Image.open(image_root / "symbols" / "palette.jpg"))
  assert palette[0, 0].min() >= 250 and palette[8, 8, 0] >= 240 and palette[8, 8, 2] <= 15

  everything = [karpathy.load_karpathy(json_path, image_root, s)
                for s in ("train", "val", "test") if summary[s]]
  captions = sorted(c for split in everything for c in split.captions)
  assert "A frog." in captions and "A broken picture." not in captions
  assert sum(split.num_images for split in everything) == 13

  # A second run reuses the converted pictures and writes the same JSON.
  mtime = os.stat(image_root / "animals" / "frog.jpg").st_mtime_ns
  first = json_path.read_bytes()
  demo.build_from_stamps(stamps_root, out, verbose=False)
  assert os.stat(image_root / "animals" / "frog.jpg").st_mtime_ns == mtime
  assert json_path.read_bytes() == first
  leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name]
  assert not leftovers


def test_split_of_is_stable_and_roughly_80_10_10():
  assert demo.split_of("animals/amphibians/frog") == demo.split_of("animals/amphibians/frog")
  splits = [demo.split_of(f"category/picture_{k}") for k in range(3000)]
  fractions = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
  assert abs(fractions["train"] - 0.8) < 0.03
  assert abs(fractions["val"] - 0.1) < 0.02 and abs(fractions["test"] - 0.1) < 0.02


def _ar(path, members):
  """Writes a Debian-style ar archive of {name: bytes}."""
  with open(path, "wb") as f:
    f.write(b"!<arch>\n")
    for name, data in members.items():
      f.write(f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode())
      f.write(data + (b"\n" if len(data) % 2 else b""))


def _fake_deb(path, stamps_root):
  """A .deb whose data.tar.xz holds `stamps_root` at usr/share/tuxpaint/stamps, plus noise."""
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
    tar.add(stamps_root, arcname="./" + demo.STAMPS_DIR)
    sound = tarfile.TarInfo("./" + demo.STAMPS_DIR + "/animals/frog.ogg")
    sound.size = 3
    tar.addfile(sound, io.BytesIO(b"ogg"))
    doc = tarfile.TarInfo("./usr/share/doc/tuxpaint-stamps-default/copyright")
    doc.size = 3
    tar.addfile(doc, io.BytesIO(b"GPL"))
  path.parent.mkdir(parents=True, exist_ok=True)
  _ar(path, {"debian-binary": b"2.0\n", "control.tar.xz": b"", "data.tar.xz": buffer.getvalue()})
  return path


def test_extract_stamps_keeps_pictures_and_captions_only(tmp_path):
  _fake_stamps(tmp_path / "src")
  deb = _fake_deb(tmp_path / "pkg.deb", tmp_path / "src")
  stamps_root = demo.extract_stamps(deb, tmp_path / "extracted")
  assert stamps_root == tmp_path / "extracted" / demo.STAMPS_DIR
  assert (stamps_root / "animals" / "frog.png").read_bytes() == (
      tmp_path / "src" / "animals" / "frog.png").read_bytes()
  assert not (stamps_root / "animals" / "frog.ogg").exists()
  assert not (tmp_path / "extracted" / "usr" / "share" / "doc").exists()
  if shutil.which("dpkg-deb"):  # our ar writer makes a package dpkg itself accepts
    listing = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                             check=True).stdout
    assert len(listing) > 0


def test_build_demo_end_to_end_from_a_placed_deb_and_registry(tmp_path):
  _fake_stamps(tmp_path / "src")
  cache = tmp_path / "cache"
  _fake_deb(cache / "download" / f"{demo.PACKAGE}_1.0_all.deb", tmp_path / "src")
  json_path = demo.build_demo(cache, verbose=False)
  assert json_path == demo.demo_paths(cache)[0] and json_path.is_file()
  assert not (cache / "extracted").exists()  # intermediate tree removed once built
  assert demo.build_demo(cache, verbose=False) == json_path  # finished build: nothing redone
  split = registry.load_split({"name": "demo", "cache_dir": str(cache)}, "train")
  assert split.dataset == "demo" and split.num_images == split.num_captions > 0
  assert split.load_image(0).ndim == 3


def test_download_errors_say_what_to_do(tmp_path, monkeypatch):
  monkeypatch.setattr(demo.shutil, "which", lambda name: "/usr/bin/apt-get")
  monkeypatch.setattr(demo.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
      a, 100, "", "E: Unable to locate package tuxpaint-stamps-default"))
  with pytest.raises(demo.DemoDataError, match="sudo apt-get update"):
    demo.download_deb(tmp_path)
  assert not list(tmp_path.iterdir())  # the private download folder is cleaned up
  monkeypatch.setattr(demo.shutil, "which", lambda name: None)
  with pytest.raises(demo.DemoDataError, match="packages.debian.org"):
    demo.download_deb(tmp_path)


def test_not_a_deb_is_reported(tmp_path):
  (tmp_path / "x.deb").write_bytes(b"PK\x03\x04 a zip")
  with pytest.raises(demo.DemoDataError, match="x.deb is not a Debian package"):
    demo.extract_stamps(tmp_path / "x.deb", tmp_path / "out")


@pytest.mark.network
@pytest.mark.slow
def test_real_package_download_and_build(tmp_path):
  """Downloads the real 160 MB package from Debian and builds the demo data (about a minute)."""
  if shutil.which("apt-get") is None:
    pytest.skip("apt-get is not available")
  json_path = demo.build_demo(tmp_path, verbose=False)
  data = json.loads(json_path.read_text())
  splits = {s: sum(r["split"] == s for r in data["images"]) for s in ("train", "val", "test")}
  assert sum(splits.values()) > 700 and min(splits.values()) > 50
  test = karpathy.load_karpathy(json_path, demo.demo_paths(tmp_path)[1], "test")
  image = test.load_image(0)
  assert image.dtype == np.uint8 and max(image.shape[:2]) <= 256
  assert any(c == "A frog." for c in karpathy.load_karpathy(
      json_path, demo.demo_paths(tmp_path)[1], "train").captions)
