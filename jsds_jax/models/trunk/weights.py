"""Finding checkpoint files and reading them into flat numpy state dicts, without torch.

A checkpoint is named either by a local directory (what `save_pretrained` writes, or a package
folder) or by a Hugging Face model id, which is fetched with `huggingface_hub` where the user has
a network. Tests and CI only ever use local directories.
"""

import os
import pathlib

import numpy as np

from jsds_jax.models.trunk import torch_pickle

# Preferred first: safetensors needs no unpickling at all.
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def resolve_checkpoint(name_or_dir: str) -> pathlib.Path:
  """Returns a local directory for `name_or_dir`: the directory itself or a hub snapshot.

  Raises:
    FileNotFoundError: the path does not exist and does not look like a hub id, or the hub is
      not reachable (offline).
  """
  path = pathlib.Path(os.path.expanduser(name_or_dir))
  if path.exists():
    return path
  if name_or_dir.startswith((".", "/", "~")) or name_or_dir.count("/") != 1:
    raise FileNotFoundError(f"checkpoint directory '{name_or_dir}' does not exist")
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    return pathlib.Path(huggingface_hub.snapshot_download(
        name_or_dir, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.bin", "*.model"]))
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f"'{name_or_dir}' is not a local directory and could not be fetched from the Hugging "
        f"Face hub ({type(e).__name__}: {e}). Download it elsewhere with save_pretrained and "
        "pass the directory.") from e


def find_weight_file(directory: pathlib.Path) -> pathlib.Path:
  """The weights file inside a checkpoint directory (safetensors preferred)."""
  for name in _WEIGHT_FILES:
    if (directory / name).exists():
      return directory / name
  shards = sorted(directory.glob("model-*.safetensors"))
  if shards:
    return shards[0]
  raise FileNotFoundError(
      f"no weights in '{directory}': expected one of {', '.join(_WEIGHT_FILES)}")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a weights file into {name: np.ndarray} without executing pickled code.

  Supports `.safetensors` (also sharded `model-0000x-of-0000n.safetensors` next to each other)
  and PyTorch `.bin` / `.pth` / `.pt` files in both the zip and the legacy format. bf16 tensors
  come back as `ml_dtypes.bfloat16` arrays.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"weights file '{path}' does not exist")
  if path.suffix == ".safetensors":
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    files = (sorted(path.parent.glob("model-*-of-*.safetensors"))
             if path.name.startswith("model-") else [path])
    out = {}
    for f in files:
      out.update(safetensors.numpy.load_file(str(f)))
    return out
  return torch_pickle.load(path)
