"""The README's `jsds-search` examples, run against the demo index the README's first command
builds: each must return the top hit the README shows.

The README shows each command with the start of its output:

  $ jsds-search --index runs/demo/eval --k 3 "a whale"
  query: a whale
  ...
    1. score 21.9146  80  ~/.cache/jsds_jax/data/images/whale.jpg
"""

import dataclasses
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

import testing_utils  # tests/testing_utils.py

_COMMAND = re.compile(r"^\$ (jsds-search .*)$")
_FIRST_HIT = re.compile(r"^\s+1\. score \S+(?: \(sparse \S+, dense \S+\))?\s+(\S+)\s+(\S+)$")


@dataclasses.dataclass(frozen=True)
class Example:
  query: str
  k: int
  rerank: str | None
  top_id: str
  top_file: str


def readme_examples(readme: pathlib.Path = testing_utils.REPO / "README.md") -> list[Example]:
  """Every `$ jsds-search ...` line of the README with the first hit shown under it."""
  lines = readme.read_text().splitlines()
  examples = []
  for n, line in enumerate(lines):
    command = _COMMAND.match(line)
    if not command:
      continue
    args = shlex.split(command.group(1))[1:]
    flags = {}
    words = []
    i = 0
    while i < len(args):
      if args[i].startswith("--"):
        flags[args[i][2:]] = args[i + 1]
        i += 2
      else:
        words.append(args[i])
        i += 1
    hit = next((m for m in map(_FIRST_HIT.match, lines[n + 1:n + 8]) if m), None)
    assert hit, f"README line {n + 1}: no '  1. score ...' line under {line!r}"
    examples.append(Example(query=" ".join(words), k=int(flags.get("k", 10)),
                            rerank=flags.get("rerank"), top_id=hit.group(1),
                            top_file=pathlib.Path(hit.group(2)).name))
  return examples


def mismatches(eval_dir: pathlib.Path) -> list[str]:
  """The README examples whose top hit on the index in `eval_dir` is not the one shown."""
  from jsds_jax import search  # pylint: disable=g-import-not-at-top
  searcher = search.Searcher(eval_dir)
  wrong = []
  for ex in readme_examples():
    hits = searcher.search(ex.query, k=ex.k, rerank=None if ex.rerank == "none" else ex.rerank)
    got = (hits[0].image_id, pathlib.Path(hits[0].source).name) if hits else None
    if got != (ex.top_id, ex.top_file):
      wrong.append(f"{ex.query!r}: README shows {ex.top_id} {ex.top_file}, got {got}")
  return wrong


def test_readme_shows_search_examples_with_their_output():
  examples = readme_examples()
  assert len(examples) >= 2
  assert any(ex.rerank == "dense" for ex in examples)
  # The demo's test split is pictures of single things: a query names one of them.
  assert all(ex.top_file.endswith(".jpg") for ex in examples)


def _readme_main_job() -> list[str]:
  """The README's first command's main job (`jsds-run ...`) as its arguments."""
  for line in (testing_utils.REPO / "README.md").read_text().splitlines()[:10]:
    if "jsds-run" in line:
      return shlex.split(line.split(".venv/bin/jsds-run", 1)[1])
  raise AssertionError("README's first lines hold no `.venv/bin/jsds-run ...` command")


@pytest.mark.network
@pytest.mark.slow
def test_readme_search_examples_return_their_stated_top_hit(tmp_path):
  """The README's first command (the demo main job, a few minutes), then its search examples.

  It runs as a user runs it: its own process, one CPU device, XLA's default flags (not the
  suite's fake devices and fast-compile flags). Without the main job's last stage, the CMC
  reranker (`cmc.in_main_job`): no example reranks with it, and the tail and index it leaves are
  the same (test_main.py covers that stage)."""
  args = _readme_main_job()
  assert args[:2] == ["--config", "configs/demo.py"] and args[2] == "--workdir", args
  workdir = tmp_path / "demo"
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
  env.update(PYTHONPATH=str(testing_utils.REPO), JAX_PLATFORMS="cpu")
  log = tmp_path / "main.log"
  with open(log, "w") as f:
    done = subprocess.run(
        [sys.executable, "-m", "jsds_jax.main", *args[:2], "--workdir", str(workdir),
         "--config.cmc.in_main_job=False", "--config.train.progress=False"],
        env=env, stdout=f, stderr=subprocess.STDOUT, cwd=testing_utils.REPO, timeout=1500)
  assert done.returncode == 0, testing_utils.log_tail(log)
  assert mismatches(workdir / "eval") == []
