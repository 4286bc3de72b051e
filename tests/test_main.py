"""The main job (`jsds-run`) on the tiny config: encode -> train -> the test-split table."""

import json
import pathlib

from jsds_jax import main as main_lib

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _tiny_config(tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("tiny_cfg", _ROOT / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.cache_dir = str(tmp_path / "data")
  config.encode.cache_root = str(tmp_path / "features")
  config.data.num_images = 20  # 16 train (2 steps of 8 per epoch), 2 val, 2 test images
  config.train.num_epochs = 2
  return config


def test_main_job_prints_the_test_table(tmp_path, capsys):
  workdir = tmp_path / "run"
  out = main_lib.run_pipeline(_tiny_config(tmp_path), workdir)
  printed = capsys.readouterr().out
  assert "Feature cache:" in printed and "training completed at step 4" in printed
  assert "| scores | t2i R@1 | t2i R@5 | t2i R@10 | i2t R@1 | i2t R@5 | i2t R@10 |" in printed
  for kind in ("dense", "sparse", "integrated"):
    assert f"| {kind} |" in printed
  assert out["table"] in printed
  assert (workdir / main_lib.TABLE_FILE).read_text().strip() == out["table"]
  saved = json.loads((workdir / main_lib.RESULTS_FILE).read_text())
  assert saved["split"] == "test"
  # 2 test images with 2 captions each: every R@5 is 100%.
  assert saved["sparse"]["t2i"]["R@5"] == 100.0
  assert 0 <= saved["dense"]["t2i"]["R@1"] <= 100.0
  assert out["test"]["integrated"]["i2t"]["R@10"] == 100.0
