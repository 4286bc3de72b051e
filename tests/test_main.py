"""The main job (`jsds-run`) on the tiny config: encode -> train -> eval of the best checkpoint."""

import json

import pytest

from jsds_jax import main as main_lib
from jsds_jax.models.trunk import backbones
import testing_utils  # tests/testing_utils.py


def _tiny_config(tmp_path):
  config = testing_utils.load_config("tiny")
  config.data.cache_dir = str(tmp_path / "data")
  config.encode.cache_root = str(tmp_path / "features")
  config.data.num_images = 20  # 16 train (2 steps of 8 per epoch), 2 val, 2 test images
  config.train.num_epochs = 2
  return config


@pytest.mark.slow
def test_main_job_ends_with_the_eval_and_rerank_tables(tmp_path, capsys, monkeypatch):
  """encode -> train -> (`cmc.in_main_job`) a CMC in workdir/cmc -> eval: the eval table, the
  report paths, first stage alone vs + CMC; one backbone load; a second run finds everything
  finished and trains nothing."""
  config = _tiny_config(tmp_path)
  config.cmc.in_main_job = True
  config.cmc.candidates_root = str(tmp_path / "cands")
  config.cmc.mlp_dim = 32
  config.cmc.num_candidates = 8
  config.cmc.batch_size = 8       # 32 t2i (captions) + 16 i2t (images) queries: 6 steps
  config.cmc.num_epochs = 1
  config.cmc.val_k = 8
  config.cmc.rerank_ks = (2, 16)
  workdir = tmp_path / "run"
  loads = []
  load = backbones.load_backbone
  monkeypatch.setattr(backbones, "load_backbone", lambda c: loads.append(c.name) or load(c))
  out = main_lib.run_pipeline(config, workdir)
  assert loads == ["tiny"]  # encode, train and eval share one loaded backbone
  printed = capsys.readouterr().out
  assert "Feature cache:" in printed and "training completed at step 4" in printed
  assert "| retriever | t2i R@1 | t2i R@5 | t2i R@10 |" in printed
  for kind in ("dense", "sparse", "integrated"):
    assert f"| {kind} |" in printed
  eval_dir = workdir / main_lib.EVAL_DIR
  assert f"HTML report: {eval_dir / 'report.html'}" in printed
  assert (eval_dir / "report.html").read_text().startswith("<!DOCTYPE html>")
  saved = json.loads((eval_dir / "report.json").read_text())
  assert saved == json.loads(json.dumps(out["report"]))
  # 2 test images with 2 captions each: every R@5 is 100%.
  assert saved["t2i"]["sparse"]["R@5"] == 100.0
  assert 0 <= saved["t2i"]["dense"]["R@1"] <= 100.0
  assert saved["i2t"]["integrated"]["R@10"] == 100.0
  assert "best" in saved["checkpoint"]
  # 2 test images: the report says its recalls mean nothing.
  assert [n for n in saved["notes"] if n.startswith("the split has only 2 images: R@5, R@10 are")]

  # The CMC stage and the rerank table.
  assert out["cmc"]["status"] == "completed" and out["cmc"]["step"] == 6
  assert "CMC reranker: training completed at step 6 of 6" in printed
  assert "First stage alone vs + CMC over its top K" in printed
  table = saved["rerank"]["table"]
  assert set(table) == {"sparse", "dense", "integrated"}
  # 2 test images: K = 16 is capped at 2 for t2i.
  assert list(table["integrated"]["t2i"]["cmc"]) == ["2"]
  assert (eval_dir / "rerank.html").exists()
  assert (workdir / main_lib.CMC_DIR / "result.json").exists()
  again = main_lib.run_pipeline(config, workdir)
  assert again["cmc"]["step"] == 6 and again["report"]["rerank"] == out["report"]["rerank"]
