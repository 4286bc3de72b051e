"""The binaries' front door (jsds_jax/cli.py): --help, one-line user errors, a quiet start.

Each case runs a binary as a user would (a subprocess), because what is under test is what
reaches the terminal and the exit status.
"""

import os
import pathlib
import subprocess
import sys

import pytest

import testing_utils  # tests/testing_utils.py

BINARIES = {  # module -> (console script, flags its --help must list)
    "jsds_jax.main": ("jsds-run", ["--config", "--workdir"]),
    "jsds_jax.encode": ("jsds-encode", ["--config"]),
    "jsds_jax.train": ("jsds-train", ["--config", "--workdir"]),
    "jsds_jax.eval": ("jsds-eval", ["--config", "--checkpoint", "--out", "--split", "--[no]html",
                                    "--batch_size"]),
    "jsds_jax.search": ("jsds-search", ["--index", "--k", "--rerank", "--candidates",
                                        "--checkpoint"]),
}


def _env():
  env = dict(os.environ, PYTHONPATH=str(testing_utils.REPO), JAX_PLATFORMS="cpu",
             HF_HUB_OFFLINE="1")
  env.pop("XLA_FLAGS", None)
  return env


def _run(module, *args, cwd=None, prelude=""):
  """Runs `python -m module args` (after `prelude`, e.g. masking torch); returns the result."""
  code = (f"import runpy, sys\n{prelude}\nsys.argv = [{module!r}] + {list(args)!r}\n"
          f"runpy.run_module({module!r}, run_name='__main__')\n")
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=_env(), cwd=cwd or testing_utils.REPO, timeout=120)


def _one_error_line(result):
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2, result.stderr
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("error: "), result.stderr
  assert "Traceback" not in result.stderr
  return lines[0]


@pytest.mark.parametrize("module", sorted(BINARIES))
def test_help_lists_the_binarys_own_flags_and_an_example(module):
  name, flag_names = BINARIES[module]
  result = _run(module, "--help")
  assert result.returncode == 0, result.stderr
  page = result.stdout
  assert page.startswith(f"{name}: ")
  flag_lines = {line.split()[0] for line in page.splitlines() if line.startswith("  --")}
  assert set(flag_names) | {"--[no]verbose"} <= flag_lines, page
  assert "Try --helpfull" not in page
  examples = page.split("examples:\n")[1].splitlines()
  assert examples and all(line.strip().startswith(name) for line in examples), page


def test_config_typo_is_one_line_naming_the_field_and_the_fix(tmp_path):
  workdir = tmp_path / "run"
  result = _run("jsds_jax.train", "--config", "configs/tiny.py", "--workdir", str(workdir),
                "--config.train.batchsize=8")
  line = _one_error_line(result)
  assert "--config.train.batchsize" in line and "'batch_size'" in line, line
  assert "config_base.py" in line
  assert not workdir.exists()


def test_verbose_adds_the_traceback(tmp_path):
  result = _run("jsds_jax.train", "--config", "configs/tiny.py", "--workdir",
                str(tmp_path / "run"), "--config.train.batchsize=8", "--verbose")
  assert result.returncode == 2
  assert "Traceback" in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("error: --config.train.batchsize")


@pytest.mark.parametrize("args,expected", [
    (["--index", "nowhere", "--k", "0", "a", "cat"], "--k=0"),
    (["--index", "nowhere", "--rerank", "sparse", "cat"], "--rerank"),
    (["--k", "3", "cat"], "--index is required"),
    (["--index", "nowhere", "cat"], "nowhere holds no search index"),
])
def test_search_flag_mistakes_are_one_line(args, expected):
  line = _one_error_line(_run("jsds_jax.search", *args))
  assert expected in line, line


def test_missing_config_file_is_one_line(tmp_path):
  line = _one_error_line(_run("jsds_jax.encode", "--config", "configs/nothere.py"))
  assert "configs/nothere.py" in line and "get_config" in line, line


@pytest.mark.parametrize("field,value", [("sources", "mdi,nope"), ("test_sources", "clipart")])
def test_unknown_corpus_source_is_one_line_before_anything_is_built(tmp_path, field, value):
  # The source list is checked before the corpus is built (npm pack, rendering): a typo must
  # not cost a download, and must name the field, the value and the valid choices.
  cache_dir = tmp_path / "data"
  line = _one_error_line(_run("jsds_jax.encode", "--config", "configs/corpus.py",
                              f"--config.data.cache_dir={cache_dir}",
                              f"--config.encode.cache_root={tmp_path / 'features'}",
                              f"--config.data.{field}={value}"))
  assert f"data.{field}={value!r}" in line, line
  assert "choose from openmoji, twemoji, tabler, mdi, lucide, tuxpaint" in line, line
  assert not cache_dir.exists() and not (tmp_path / "features").exists()


def test_binaries_import_no_transformers_before_their_front_door():
  # cli.quiet_startup must run before transformers' import-time notice; the binaries import
  # it lazily (inside main), which this checks.
  code = ("import sys\nimport jsds_jax.main, jsds_jax.encode, jsds_jax.train, jsds_jax.eval, "
          "jsds_jax.search\nprint(sorted(m for m in ('transformers', 'torch') if m in "
          "sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(), timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[]"


_NOTICES = ("Unable to initialize backend 'tpu'", "PyTorch was not found")
# A binary whose main does what ours do on a plain run: imports transformers lazily and starts
# JAX's backends. torch is masked as it is after a plain install (no test extras).
_PROBE = """
import sys
sys.modules["torch"] = None
from absl import app
from absl import flags
from jsds_jax import cli

def main(argv):
  import transformers
  import jax
  print(jax.devices()[0].platform)

flags.DEFINE_string("x", "", "unused")
{runner}
"""


@pytest.mark.parametrize("runner,quiet", [
    ('cli.run(main, cli.Command("probe", "a probe", "", ["x"], ["probe"]))', True),
    ("app.run(main)", False),  # without the front door both notices show: the check can fail
])
def test_plain_run_shows_no_tpu_or_pytorch_notice(runner, quiet):
  env = dict(_env(), JAX_PLATFORMS="")  # let JAX probe every platform, as on a user's machine
  env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
  result = subprocess.run([sys.executable, "-c", _PROBE.format(runner=runner)],
                          capture_output=True, text=True, env=env, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "cpu"
  shown = [n for n in _NOTICES if n in result.stderr]
  assert shown == ([] if quiet else list(_NOTICES)), result.stderr


def _karpathy_with_bad_items(tmp_path):
  """A Karpathy dataset whose test split has a corrupt image (images[2]) and an empty caption
  (images[3])."""
  import json  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = tmp_path / "images"
  root.mkdir()
  records = []
  for r, split in enumerate(["train"] * 4 + ["val", "test"]):
    Image.fromarray(np.full((8, 8, 3), 30 * r, np.uint8)).save(root / f"img{r}.png")
    records.append({"filename": f"img{r}.png", "split": split,
                    "imgid": r, "sentences": [{"raw": f"picture number {r}"}]})
  (root / "img2.png").write_bytes(b"\x89PNG broken")
  records[3]["sentences"][0]["raw"] = "  "
  path = tmp_path / "data.json"
  path.write_text(json.dumps({"images": records}))
  return path, root


def test_bad_data_is_one_line_listing_every_bad_item_and_nothing_is_written(tmp_path):
  path, root = _karpathy_with_bad_items(tmp_path)
  cache = tmp_path / "features"
  result = _run("jsds_jax.encode", "--config", "configs/tiny.py", "--config.data.name=karpathy",
                f"--config.data.json={path}", f"--config.data.image_root={root}",
                f"--config.encode.cache_root={cache}")
  line = _one_error_line(result)
  assert "data.json: 2 bad items in split 'train'" in line, line
  assert "images[2] (" in line and "img2.png) is not a readable image" in line, line
  assert "images[3] (img3.png) sentences[0].raw is an empty" in line, line
  assert "--config.data.skip_bad=True" in line
  assert not cache.exists()


def _terminal_lines(text):
  """What a terminal shows of `text`: after each "\r" the line is overwritten from its start."""
  lines = []
  for line in text.split("\n"):
    shown = ""
    for part in line.split("\r"):
      shown = part + shown[len(part):]
    lines.append(shown.rstrip())
  return lines


@pytest.mark.parametrize("through_bars", [True, False])
def test_a_log_line_during_a_progress_bar_gets_its_own_line(through_bars):
  import io  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  from jsds_jax import cli  # pylint: disable=g-import-not-at-top
  out = io.StringIO()
  bar = tqdm.tqdm(total=10, file=out, desc="train", mininterval=0, ascii=True)
  bar.update(3)
  line = "I1202 train.py:641] step 3: val R@1 12.5\n"
  (cli.BarSafeStream(out) if through_bars else out).write(line)
  bar.update(1)
  bar.close()
  shown = [s for s in _terminal_lines(out.getvalue()) if "val R@1" in s]
  assert len(shown) == 1
  # Without the wrapper (the control) the log text lands on the bar's line.
  assert shown[0].startswith("I1202") == through_bars, shown
