"""Tests for jsds_jax/data/karpathy.py: loading, error messages, skip_bad, the writer."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from jsds_jax.data import karpathy
from jsds_jax.data.split import BadItemError


def _record(r, split, n_captions=2, folder="val2014", cocoid=True, **extra):
  record = {"filepath": folder, "filename": f"img{r}.jpg", "split": split, "imgid": r,
            "sentences": [{"raw": f" caption {c} of image {r} ", "tokens": []}
                          for c in range(n_captions)]}
  if cocoid:
    record["cocoid"] = 1000 + r
  record.update(extra)
  return record


def _dataset(tmp_path, records, dataset="coco", make_images=True):
  """Writes the JSON and a small distinct image per record; returns (json, image_root)."""
  root = tmp_path / "images"
  for r, record in enumerate(records):
    if make_images and isinstance(record, dict) and "filename" in record:
      folder = root / str(record.get("filepath", ""))
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(np.full((5, 7, 3), 10 * r, np.uint8)).save(folder / record["filename"])
  path = tmp_path / "captions.json"
  path.write_text(json.dumps({"images": records, "dataset": dataset}))
  return path, root


COCO = [_record(0, "train"), _record(1, "test", 3), _record(2, "restval"), _record(3, "val"),
        _record(4, "test", 1, folder="train2014")]


def test_loads_a_split_with_ids_captions_and_images(tmp_path):
  path, root = _dataset(tmp_path, COCO)
  split, skipped = karpathy.load_karpathy_with_skips(path, root, "test")
  assert split.dataset == "coco" and split.split == "test"
  assert list(split.image_ids) == ["1001", "1004"]
  assert list(split.captions) == ["caption 0 of image 1", "caption 1 of image 1",
                                  "caption 2 of image 1", "caption 0 of image 4"]
  np.testing.assert_array_equal(split.caption_image_index, [0, 0, 0, 1])
  assert split.caption_image_index.dtype == np.int64
  assert split.image_sources[1] == os.path.join(root, "train2014", "img4.jpg")
  image = split.load_image(1)
  assert image.shape == (5, 7, 3) and abs(int(image[0, 0, 0]) - 40) <= 2
  assert not any(skipped.values())
  examples = list(split.examples())
  assert [e[1:] for e in examples][-1] == ("caption 0 of image 4", "1004")


def test_train_takes_restval_for_coco_unless_told_otherwise(tmp_path):
  path, root = _dataset(tmp_path, COCO)
  assert list(karpathy.load_karpathy(path, root, "train").image_ids) == ["1000", "1002"]
  no_restval = karpathy.load_karpathy(path, root, "train", include_restval=False)
  assert list(no_restval.image_ids) == ["1000"]
  assert list(karpathy.load_karpathy(path, root, "restval").image_ids) == ["1002"]
  flickr, root = _dataset(tmp_path, COCO, dataset="flickr30k")
  assert list(karpathy.load_karpathy(flickr, root, "train").image_ids) == ["1000"]


def test_ids_fall_back_to_imgid_then_filename(tmp_path):
  records = [_record(0, "test", cocoid=False), _record(1, "test", cocoid=False)]
  del records[1]["imgid"]
  path, root = _dataset(tmp_path, records, dataset="flickr30k")
  split = karpathy.load_karpathy(path, root, "test", dataset_name="f30k")
  assert list(split.image_ids) == ["0", "img1.jpg"]
  assert split.dataset == "f30k"


def test_duplicate_ids_are_an_error(tmp_path):
  records = [_record(0, "test"), _record(1, "test")]
  records[1]["cocoid"] = 1000
  path, root = _dataset(tmp_path, records)
  with pytest.raises(BadItemError, match=r"captions.json: images\[0\] and images\[1\].*'1000'"):
    karpathy.load_karpathy(path, root, "test")


def test_malformed_json_names_file_line_and_column(tmp_path):
  path = tmp_path / "broken.json"
  path.write_text('{"images": [\n  {"filename": "a.jpg",\n   "split": "test" oops}]}')
  with pytest.raises(BadItemError, match=r"broken.json: not valid JSON: .* line 3, column 20"):
    karpathy.load_karpathy(path, tmp_path, "test")
  path.write_text('{"annotations": []}')
  with pytest.raises(BadItemError, match=r'broken.json: expected .*"images" list'):
    karpathy.load_karpathy(path, tmp_path, "test")
  with pytest.raises(FileNotFoundError, match="absent.json"):
    karpathy.load_karpathy(tmp_path / "absent.json", tmp_path, "test")


@pytest.mark.parametrize("mutate, pattern", [
    (lambda r: r.pop("filename"), r"images\[1\] has no 'filename'"),
    (lambda r: r.pop("sentences"), r"images\[1\] has no 'sentences'"),
    (lambda r: r.update(sentences=[]), r"images\[1\] has an empty 'sentences' list"),
    (lambda r: r["sentences"][1].pop("raw"), r"images\[1\] \(img1.jpg\) sentences\[1\].raw has no"),
    (lambda r: r["sentences"][1].update(raw=" \t\n"),
     r"images\[1\] \(img1.jpg\) sentences\[1\].raw is an empty or whitespace-only caption"),
    (lambda r: r.update(filepath=3), r"images\[1\] has a 'filepath' that is not a string"),
])
def test_bad_records_name_file_record_and_field(tmp_path, mutate, pattern):
  records = [_record(0, "test"), _record(1, "test", 3)]
  mutate(records[1])
  path, root = _dataset(tmp_path, records)
  with pytest.raises(BadItemError, match="captions.json: " + pattern):
    karpathy.load_karpathy(path, root, "test")


def test_record_without_split_is_an_error_even_with_skip_bad(tmp_path):
  records = [_record(0, "test"), _record(1, "test")]
  del records[1]["split"]
  path, root = _dataset(tmp_path, records)
  with pytest.raises(BadItemError, match=r"captions.json: images\[1\] has no 'split'"):
    karpathy.load_karpathy(path, root, "test", skip_bad=True)


def test_unknown_split_lists_the_available_ones(tmp_path):
  path, root = _dataset(tmp_path, COCO)
  with pytest.raises(ValueError, match=r"no split 'testing'.*restval \(1 images\).*test \(2 "
                                       r"images\)"):
    karpathy.load_karpathy(path, root, "testing")


def test_a_few_missing_images_are_listed_and_counted(tmp_path):
  records = [_record(r, "test") for r in range(10)]
  path, root = _dataset(tmp_path, records)
  for r in (2, 5):
    os.remove(root / "val2014" / f"img{r}.jpg")
  with pytest.raises(BadItemError) as info:
    karpathy.load_karpathy(path, root, "test")
  message = str(info.value)
  assert "captions.json" in message and "2 of 10 image files of split 'test'" in message
  assert r"images[2] -> " in message and "img5.jpg" in message
  assert "probably wrong" not in message


def test_a_wrong_image_root_is_called_out(tmp_path):
  records = [_record(r, "test") for r in range(8)]
  path, _ = _dataset(tmp_path, records)
  wrong = tmp_path / "elsewhere"
  wrong.mkdir()
  with pytest.raises(BadItemError) as info:
    karpathy.load_karpathy(path, wrong, "test")
  message = str(info.value)
  assert "8 of 8" in message and "and 3 more" in message
  assert "All of them are missing, so image_root is probably wrong" in message
  assert f"{wrong / 'val2014'} does not exist" in message


def test_skip_bad_drops_and_counts(tmp_path):
  records = [_record(0, "test", 3), _record(1, "test"), _record(2, "test"), _record(3, "test"),
             _record(4, "test")]
  records[0]["sentences"][1]["raw"] = "   "     # one empty caption, image kept
  records[1]["sentences"] = [{"raw": ""}, {"tokens": []}]  # no caption left: image dropped
  del records[2]["filename"]                     # bad record
  path, root = _dataset(tmp_path, records)
  os.remove(root / "val2014" / "img3.jpg")       # missing image
  split, skipped = karpathy.load_karpathy_with_skips(path, root, "test", skip_bad=True)
  assert list(split.image_ids) == ["1000", "1004"]
  assert list(split.captions) == ["caption 0 of image 0", "caption 2 of image 0",
                                  "caption 0 of image 4", "caption 1 of image 4"]
  np.testing.assert_array_equal(split.caption_image_index, [0, 0, 1, 1])
  assert skipped == {"bad_records": 1, "bad_captions": 1, "empty_captions": 2,
                     "missing_images": 1, "images_without_captions": 1}
  assert split.load_image(1).shape == (5, 7, 3)


def test_unreadable_image_raises_at_load_time_naming_it(tmp_path):
  path, root = _dataset(tmp_path, [_record(0, "test")])
  (root / "val2014" / "img0.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(BadItemError, match=r"images\[0\] \(.*img0.jpg\) is not a readable image"):
    karpathy.load_karpathy(path, root, "test")
  split = karpathy.load_karpathy(path, root, "test", check_images=False)
  with pytest.raises(BadItemError, match="img0.jpg"):
    split.load_image(0)


def test_every_bad_item_is_reported_at_once(tmp_path):
  records = [_record(r, "test") for r in range(6)]
  records[3]["sentences"][0]["raw"] = ""
  del records[4]["filename"]
  path, root = _dataset(tmp_path, records)
  (root / "val2014" / "img2.jpg").write_bytes(b"not a jpeg")
  os.remove(root / "val2014" / "img5.jpg")
  with pytest.raises(BadItemError) as info:
    karpathy.load_karpathy(path, root, "test")
  message = str(info.value)
  assert "captions.json: 4 bad items in split 'test'" in message
  for item in (r"images[2] (", "img2.jpg) is not a readable image",
               "images[3] (img3.jpg) sentences[0].raw is an empty", "images[4] has no 'filename'",
               "images[5] -> "):
    assert item in message, message
  assert "--config.data.skip_bad=True" in message


def test_many_bad_items_show_the_first_and_a_count(tmp_path):
  records = [_record(r, "test") for r in range(15)]
  for record in records[:13]:
    record["sentences"][0]["raw"] = " "
  path, root = _dataset(tmp_path, records)
  with pytest.raises(BadItemError) as info:
    karpathy.load_karpathy(path, root, "test")
  message = str(info.value)
  assert "13 bad items" in message and "and 3 more" in message
  assert "images[9] (" in message and "images[10] (" not in message


def test_find_missing_files(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "x.jpg").write_bytes(b"")
  paths = [str(tmp_path / "a" / "x.jpg"), str(tmp_path / "a" / "y.jpg"),
           str(tmp_path / "b" / "x.jpg")]
  assert karpathy.find_missing_files(paths) == [1, 2]


def test_write_karpathy_round_trips_atomically(tmp_path):
  records = [karpathy.make_record("a.png", "train", ["A red circle.", "Its d\u00e9cor"], 0, 0,
                                  filepath="x"),
             karpathy.make_record("b.png", "test", ["Two  words "], 1, 2)]
  assert records[0]["sentences"][1]["tokens"] == ["its", "d\u00e9cor"]
  assert records[1]["sentids"] == [2] and records[0]["sentences"][0]["tokens"] == [
      "a", "red", "circle"]
  path = karpathy.write_karpathy(tmp_path / "out" / "d.json", records, dataset="demo")
  assert sorted(os.listdir(path.parent)) == ["d.json"]  # no temporary file left behind
  data = json.loads(path.read_text(encoding="utf-8"))
  assert data["dataset"] == "demo" and data["images"] == records
  with pytest.raises(ValueError, match=r"records\[0\]"):
    karpathy.write_karpathy(tmp_path / "bad.json", [{"split": "test", "filename": "a.png"}])
  assert not (tmp_path / "bad.json").exists()
