"""torch_pickle: PyTorch checkpoints read without torch, and pickles that try to run code."""

import os
import pickle
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from jsds_jax.models.trunk import torch_pickle
from jsds_jax.models.trunk import weights

FORMATS = {"zip": True, "legacy": False}


def _state_dict():
  gen = torch.Generator().manual_seed(0)
  base = torch.randn(4, 6, generator=gen)
  return {
      "fp32": torch.randn(3, 5, generator=gen),
      "fp16": torch.randn(7, generator=gen).half(),
      "bf16": torch.randn(2, 3, generator=gen).bfloat16(),
      "int64": torch.arange(-5, 7, dtype=torch.int64).reshape(3, 4),
      "scalar": torch.tensor(12345, dtype=torch.int64),
      "bool": torch.tensor([True, False, True]),
      "empty": torch.zeros(0, 3),
      "base": base,
      "transposed": base.t(),          # non-contiguous view of base's storage
      "row_slice": base[1:3],          # storage offset 6
      "column": base[:, 2],            # offset 2, stride 6
      "param": torch.nn.Parameter(torch.randn(2, 2, generator=gen)),
  }


def _as_numpy(t: torch.Tensor) -> np.ndarray:
  t = t.detach()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _assert_same(ours: dict, ref: dict):
  assert list(ours) == list(ref)
  for name, tensor in ref.items():
    expected = _as_numpy(tensor)
    got = ours[name]
    assert got.dtype == expected.dtype, name
    assert got.shape == expected.shape, name
    # Compare bits: exact, and NaN-safe.
    assert got.tobytes() == np.ascontiguousarray(expected).tobytes(), name
    assert got.flags.c_contiguous and got.flags.owndata, name


@pytest.mark.parametrize("fmt", FORMATS)
def test_reads_torch_save_exactly(tmp_path, fmt):
  sd = _state_dict()
  path = tmp_path / "model.pth"
  torch.save(sd, path, _use_new_zipfile_serialization=FORMATS[fmt])
  assert zipfile.is_zipfile(path) == (fmt == "zip")
  _assert_same(torch_pickle.load(path), sd)


def test_reads_uint16_untyped_storage(tmp_path):
  # Dtypes without a typed storage class go through _rebuild_tensor_v3 + UntypedStorage.
  sd = {"u16": torch.tensor([0, 1, 65535, 300], dtype=torch.uint16)}
  torch.save(sd, tmp_path / "u.pth")
  got = torch_pickle.load(tmp_path / "u.pth")["u16"]
  np.testing.assert_array_equal(got, np.array([0, 1, 65535, 300], np.uint16))
  assert got.dtype == np.uint16


def test_unwraps_training_checkpoint_and_flattens(tmp_path):
  sd = {"state_dict": {"enc": {"w": torch.ones(2)}, "b": torch.zeros(1)}, "epoch": 3}
  torch.save(sd, tmp_path / "ckpt.pth")
  got = torch_pickle.load(tmp_path / "ckpt.pth")
  assert sorted(got) == ["b", "enc.w"]
  np.testing.assert_array_equal(got["enc.w"], np.ones(2, np.float32))


def test_big_endian_zip(tmp_path):
  sd = {"a": torch.tensor([1.5, -2.25, 3.0]), "b": torch.tensor([1, -2, 1 << 40])}
  little = tmp_path / "little.pth"
  torch.save(sd, little)
  big = tmp_path / "big.pth"
  # Rewrite the archive as a big-endian machine would have written it.
  swap = {"data/0": ">f4", "data/1": ">i8"}
  with zipfile.ZipFile(little) as zin, zipfile.ZipFile(big, "w") as zout:
    for name in zin.namelist():
      data = zin.read(name)
      prefix, _, rest = name.partition("/")
      if rest == "byteorder":
        data = b"big"
      elif rest in swap:
        native = np.frombuffer(data, swap[rest].replace(">", "<"))
        data = native.astype(swap[rest]).tobytes()
      zout.writestr(f"{prefix}/{rest}", data)
  _assert_same(torch_pickle.load(big), sd)


def test_weights_load_state_dict_uses_it(tmp_path):
  sd = {"w": torch.randn(3, 2)}
  torch.save(sd, tmp_path / "pytorch_model.bin")
  path = weights.find_weight_file(tmp_path)
  _assert_same(weights.load_state_dict(path), sd)


class _System:
  """Unpickles to os.system(command): what a malicious checkpoint does."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class _Eval:

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (eval, (f"__import__('os').system({self.command!r})",))


class _Popen:

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    import subprocess  # pylint: disable=g-import-not-at-top
    return (subprocess.Popen, (["sh", "-c", self.command],))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("payload,refused", [
    (_System, f"{os.system.__module__}.system"),
    (_Eval, "builtins.eval"),
    (_Popen, "subprocess.Popen"),
])
def test_refuses_code_execution(tmp_path, fmt, payload, refused):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  # The payload sits after a real tensor, so the reader is mid-way through a real state dict.
  sd = {"w": torch.ones(2), "evil": payload(f"touch {marker}")}
  torch.save(sd, path, _use_new_zipfile_serialization=FORMATS[fmt])
  with pytest.raises(torch_pickle.UnsafePickleError) as err:
    torch_pickle.load(path)
  assert isinstance(err.value, ValueError)
  assert refused in str(err.value) and str(path) in str(err.value)
  assert not marker.exists()


def test_refuses_code_in_hand_made_zip(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "pytorch_model.bin"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps(_System(f"touch {marker}"), protocol=2))
    zf.writestr("archive/byteorder", "little")
  with pytest.raises(torch_pickle.UnsafePickleError, match="system"):
    weights.load_state_dict(path)
  assert not marker.exists()


def test_refuses_code_in_legacy_header(tmp_path):
  # The magic-number pickle comes first in legacy files; it is unpickled restrictively too.
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pth"
  path.write_bytes(pickle.dumps(_System(f"touch {marker}"), protocol=2))
  with pytest.raises(torch_pickle.UnsafePickleError, match="system"):
    torch_pickle.load(path)
  assert not marker.exists()


def test_pickle_cannot_patch_the_loader(tmp_path):
  # BUILD with slot state would setattr on the object it holds; a crafted file must not be
  # able to change the rebuild functions for later loads.
  evil = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n"
          b"N}(X\x0c\x00\x00\x00__defaults__(K\x07tu\x86b.")
  path = tmp_path / "patch.pth"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", evil)
  with pytest.raises(ValueError):
    torch_pickle.load(path)
  assert torch_pickle._rebuild_tensor_v2.__defaults__ == (False, None, None)


def test_rejects_out_of_bounds_views(tmp_path):
  # A record whose strides reach past its storage must fail, not read foreign memory.
  sd = {"w": torch.arange(6, dtype=torch.float32)}
  path = tmp_path / "m.pth"
  torch.save(sd, path)
  with zipfile.ZipFile(path) as zf:
    members = {n: zf.read(n) for n in zf.namelist()}
  pkl = next(n for n in members if n.endswith("/data.pkl"))
  # size (6,) -> (6,), stride (1,) -> (1000,): BININT2 1000 in place of BININT1 1.
  members[pkl] = members[pkl].replace(b"K\x01\x85", b"M\xe8\x03\x85", 1)
  bad = tmp_path / "bad.pth"
  with zipfile.ZipFile(bad, "w") as zf:
    for n, data in members.items():
      zf.writestr(n, data)
  with pytest.raises(ValueError, match="reaches element"):
    torch_pickle.load(bad)


def test_not_a_checkpoint(tmp_path):
  path = tmp_path / "junk.bin"
  path.write_bytes(b"definitely not a pickle")
  with pytest.raises(ValueError, match="neither a zip nor a legacy"):
    torch_pickle.load(path)


def test_does_not_import_torch(tmp_path):
  torch.save({"w": torch.ones(3)}, tmp_path / "m.pth")
  code = ("import sys; from jsds_jax.models.trunk import torch_pickle; "
          f"sd = torch_pickle.load({str(tmp_path / 'm.pth')!r}); "
          "assert sd['w'].tolist() == [1.0, 1.0, 1.0]; "
          "assert not [m for m in sys.modules if m.split('.')[0] == 'torch'], 'torch imported'")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(
      os.path.dirname(os.path.abspath(__file__))))
