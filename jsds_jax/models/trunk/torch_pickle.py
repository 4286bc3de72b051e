"""Reading PyTorch `.pth` / `.bin` state dicts into numpy, without torch and without running code.

`torch.save` writes a pickle whose tensors point at raw storages through persistent ids. Two
layouts exist:

  zip (torch >= 1.6): `<name>/data.pkl` holds the object pickle, `<name>/data/<key>` each
    storage's raw bytes, `<name>/byteorder` ("little" / "big", absent in old files: little).
  legacy (`_use_new_zipfile_serialization=False`, and every file written before 1.6): five
    pickles back to back (magic number, protocol version 1001, sys info, the object pickle, the
    list of storage keys), then for each key an 8-byte element count and the storage's bytes.

A plain `pickle.load` (or `torch.load(weights_only=False)`) calls whatever global the file
names, so a crafted checkpoint runs arbitrary code. Here every global goes through a restricted
`find_class` that knows only the handful of names a state dict uses and maps them to numpy
rebuilders; anything else raises `UnsafePickleError` before it is called.
"""

import _compat_pickle
from collections.abc import Mapping
import collections
import dataclasses
import functools
import io
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch.<Name>Storage -> element dtype. These typed storage classes are what tensors of these
# dtypes name in their persistent ids.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexDoubleStorage": np.complex128,
    "ComplexFloatStorage": np.complex64,
}

# torch.<dtype> globals, named by `_rebuild_tensor_v3` (dtypes without a typed storage class,
# whose storage is then an UntypedStorage of raw bytes).
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64,
    "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "int64": np.int64, "long": np.int64,
    "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16,
    "int8": np.int8,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "bool": np.bool_,
    "complex64": np.complex64, "cfloat": np.complex64,
    "complex128": np.complex128, "cdouble": np.complex128,
}


class UnsafePickleError(ValueError):
  """A checkpoint's pickle names a global that a plain state dict never needs."""


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
  """What `torch.FloatStorage` & co. unpickle to: only their element dtype matters."""
  dtype: np.dtype | None  # None: an UntypedStorage (raw bytes, dtype given by the tensor)


@dataclasses.dataclass(frozen=True, slots=True)
class _DType:
  """What a `torch.<dtype>` global unpickles to."""
  dtype: np.dtype


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageRef:
  """A storage named by a persistent id; its bytes are read after unpickling."""
  key: str
  dtype: np.dtype | None
  nbytes: int
  byte_offset: int = 0  # legacy storage views start inside their root storage


@dataclasses.dataclass(frozen=True, slots=True)
class _TensorRef:
  """A tensor as (storage, offset, size, stride) in elements, materialised after unpickling."""
  storage: _StorageRef
  dtype: np.dtype
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


class _TensorMarker:
  """Stands in for `torch.Tensor` / `torch.nn.Parameter` as `_rebuild_from_type_v2`'s type."""

  __slots__ = ()

  def __repr__(self):
    return "<torch.Tensor>"


def _as_int_tuple(value, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) for v in value):
    raise ValueError(f"malformed tensor record: {what} is {value!r}")
  return tuple(int(v) for v in value)


def _tensor_ref(storage, storage_offset, size, stride, dtype=None) -> _TensorRef:
  if not isinstance(storage, _StorageRef):
    raise ValueError(f"malformed tensor record: storage is {type(storage).__name__}")
  dtype = dtype if dtype is not None else storage.dtype
  if dtype is None:
    raise ValueError("malformed tensor record: an untyped storage without a tensor dtype")
  if not isinstance(storage_offset, int):
    raise ValueError(f"malformed tensor record: storage offset is {storage_offset!r}")
  return _TensorRef(storage, np.dtype(dtype), int(storage_offset),
                    _as_int_tuple(size, "size"), _as_int_tuple(stride, "stride"))


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _tensor_ref(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata  # autograd state means nothing for weights
  return _tensor_ref(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(dtype, _DType):
    raise ValueError(f"malformed tensor record: dtype is {dtype!r}")
  return _tensor_ref(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  del requires_grad, backward_hooks, state
  return data


_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter,
               _rebuild_parameter_with_state)


def _rebuild_from_type_v2(func, new_type, args, state):
  # Tensor subclasses pickle as (rebuild function, their type, args, __dict__); only plain
  # tensors and parameters are accepted, and their Python-level state is dropped.
  del state
  if (not isinstance(func, functools.partial) or func.func not in _REBUILDERS
      or not isinstance(new_type, _TensorMarker) or not isinstance(args, tuple)):
    raise ValueError(f"malformed tensor record: _rebuild_from_type_v2({func!r}, {new_type!r})")
  return func(*args)


def _allowed_global(module: str, name: str):
  """The stand-in for global `module.name`, or None when it is not allowed.

  Functions are handed out as fresh `functools.partial` wrappers (and markers as fresh
  instances) because a pickle's BUILD opcode can set attributes on any object it holds; a
  crafted file must not be able to alter this module's functions for later loads.
  """
  functions = {
      ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
      ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
      ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
  }
  if (module, name) in functions:
    return functools.partial(functions[module, name])
  if (module, name) == ("collections", "OrderedDict"):
    return collections.OrderedDict
  if (module, name) == ("torch", "Size"):
    return tuple
  if (module, name) in (("torch", "Tensor"), ("torch._tensor", "Tensor"),
                        ("torch.nn.parameter", "Parameter")):
    return _TensorMarker()
  if (module, name) in (("torch", "UntypedStorage"), ("torch.storage", "UntypedStorage")):
    return _StorageType(None)
  # Tensors saved from a GPU in old torch versions name torch.cuda.<Name>Storage.
  if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
    return _StorageType(np.dtype(_STORAGE_DTYPES[name]))
  if module == "torch" and name in _TORCH_DTYPES:
    return _DType(np.dtype(_TORCH_DTYPES[name]))
  return None


class _RestrictedUnpickler(pickle.Unpickler):
  """An Unpickler that resolves only allow-listed globals and records storages.

  Args:
    file: binary file positioned at a pickle.
    source: the checkpoint path, for error messages.
    legacy: persistent ids carry a sixth element (storage view metadata) in the legacy format.
    storages: filled with {key: _StorageRef} for every root storage the pickle names.
  """

  def __init__(self, file, source: str, legacy: bool, storages: dict[str, _StorageRef]):
    super().__init__(file)
    self._source = source
    self._legacy = legacy
    self._storages = storages

  def load(self):
    try:
      return super().load()
    except ValueError:  # ours (UnsafePickleError included) already say what is wrong
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{self._source}: malformed pickle ({type(e).__name__}: {e})") from e

  def find_class(self, module, name):
    # Protocol-2 pickles (torch's) spell some modules the Python 2 way (__builtin__ for
    # builtins); name them as Python 3 does, like pickle's own find_class.
    if (module, name) in _compat_pickle.NAME_MAPPING:
      module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    found = _allowed_global(module, name)
    if found is None:
      raise UnsafePickleError(
          f"{self._source}: refusing to load global '{module}.{name}'; a PyTorch state dict "
          "only needs tensors and containers, and this global could run code when unpickled. "
          "If you trust the file, load it with torch and re-save its state_dict() or convert "
          "it to safetensors.")
    return found

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid:
      raise ValueError(f"{self._source}: malformed persistent id {pid!r}")
    kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if kind != "storage":
      raise ValueError(
          f"{self._source}: persistent id of kind '{kind}' (a pickled nn.Module?); only state "
          "dicts of tensors can be read")
    expected = 6 if self._legacy else 5
    if len(pid) != expected:
      raise ValueError(f"{self._source}: malformed storage id {pid!r}")
    storage_type, key, _, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType) or not isinstance(numel, int):
      raise ValueError(f"{self._source}: malformed storage id {pid!r}")
    key = str(key)
    itemsize = 1 if storage_type.dtype is None else storage_type.dtype.itemsize
    root = _StorageRef(key, storage_type.dtype, numel * itemsize)
    if self._storages.setdefault(key, root) != root:
      raise ValueError(f"{self._source}: storage '{key}' is named with two different types")
    if self._legacy and pid[5] is not None:
      # Old torch pickled views into a storage as (view key, element offset, element count).
      _, offset, view_numel = pid[5]
      return _StorageRef(key, storage_type.dtype, int(view_numel) * itemsize,
                         int(offset) * itemsize)
    return root


def _byteswapped(flat: np.ndarray) -> np.ndarray:
  """Element-wise byte swap, also for dtypes (bf16, complex) numpy cannot `newbyteorder`."""
  if flat.dtype.itemsize == 1:
    return flat
  parts = 2 if flat.dtype.kind == "c" else 1
  unit = flat.dtype.itemsize // parts
  raw = flat.view(f"u{unit}").byteswap()
  return raw.view(flat.dtype)


def _materialise(ref: _TensorRef, buffers: Mapping[str, bytes], big_endian: bool,
                 source: str) -> np.ndarray:
  """Copies one tensor out of its storage bytes, honouring offset and strides."""
  data = buffers[ref.storage.key]
  start = ref.storage.byte_offset
  stop = start + ref.storage.nbytes
  if not 0 <= start <= stop <= len(data):
    raise ValueError(f"{source}: storage '{ref.storage.key}' holds {len(data)} bytes, the "
                     f"pickle expects bytes {start}..{stop}")
  itemsize = ref.dtype.itemsize
  flat = np.frombuffer(data, dtype=ref.dtype, count=(stop - start) // itemsize, offset=start)
  count = flat.size
  if big_endian:
    flat = _byteswapped(flat)
  if len(ref.size) != len(ref.stride):
    raise ValueError(f"{source}: tensor size {ref.size} and stride {ref.stride} disagree")
  if any(n == 0 for n in ref.size):
    return np.zeros(ref.size, ref.dtype)
  if ref.offset < 0 or any(n < 0 for n in ref.size) or any(s < 0 for s in ref.stride):
    raise ValueError(f"{source}: negative offset, size or stride in a tensor record")
  # as_strided does no bounds checking, so a corrupt record must not reach it.
  last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
  if last >= count:
    raise ValueError(f"{source}: tensor (offset {ref.offset}, size {ref.size}, stride "
                     f"{ref.stride}) reaches element {last} of a storage of {count}")
  view = np.lib.stride_tricks.as_strided(
      flat[ref.offset:], shape=ref.size, strides=[s * itemsize for s in ref.stride],
      writeable=False)
  return np.array(view, order="C", copy=True)


def _read_zip(path: str) -> tuple[object, dict[str, bytes], bool]:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
      raise ValueError(f"{path}: a zip file without exactly one '<name>/data.pkl'; not a "
                       "torch.save checkpoint")
    prefix = pkls[0][:-len("data.pkl")]
    big_endian = False
    if f"{prefix}byteorder" in names:
      order = zf.read(f"{prefix}byteorder").decode("ascii").strip()
      if order not in ("little", "big"):
        raise ValueError(f"{path}: unknown byteorder '{order}'")
      big_endian = order == "big"
    storages: dict[str, _StorageRef] = {}
    obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), path, False, storages).load()
    buffers = {}
    for key in storages:
      name = f"{prefix}data/{key}"
      if name not in names:
        raise ValueError(f"{path}: storage record '{name}' is missing")
      buffers[key] = zf.read(name)
  return obj, buffers, big_endian


def _read_legacy(path: str) -> tuple[object, dict[str, bytes], bool]:
  storages: dict[str, _StorageRef] = {}

  with open(path, "rb") as f:
    def next_pickle():
      return _RestrictedUnpickler(f, path, True, storages).load()

    try:
      magic = next_pickle()
    except UnsafePickleError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{path}: neither a zip nor a legacy PyTorch checkpoint") from e
    if magic != _LEGACY_MAGIC:
      raise ValueError(f"{path}: neither a zip nor a legacy PyTorch checkpoint (bad magic)")
    protocol = next_pickle()
    if protocol != _LEGACY_PROTOCOL:
      raise ValueError(f"{path}: unsupported legacy protocol version {protocol!r}")
    sys_info = next_pickle()
    big_endian = isinstance(sys_info, Mapping) and sys_info.get("little_endian") is False
    obj = next_pickle()
    keys = next_pickle()
    if not isinstance(keys, list):
      raise ValueError(f"{path}: malformed storage key list")
    buffers = {}
    for key in keys:
      key = str(key)
      if key not in storages:
        raise ValueError(f"{path}: storage '{key}' is listed but never used")
      root = storages[key]
      head = f.read(8)
      if len(head) != 8:
        raise ValueError(f"{path}: truncated at storage '{key}'")
      (numel,) = struct.unpack(">q" if big_endian else "<q", head)
      itemsize = 1 if root.dtype is None else root.dtype.itemsize
      if numel * itemsize != root.nbytes:
        raise ValueError(f"{path}: storage '{key}' holds {numel} elements, the pickle expects "
                         f"{root.nbytes // itemsize}")
      buffers[key] = f.read(root.nbytes)
      if len(buffers[key]) != root.nbytes:
        raise ValueError(f"{path}: truncated in storage '{key}'")
  missing = sorted(set(storages) - set(buffers))
  if missing:
    raise ValueError(f"{path}: storages {missing[:5]} have no data")
  return obj, buffers, big_endian


def _unwrap(obj):
  """Training checkpoints often nest the weights as {"state_dict": ...} or {"model": ...}."""
  for key in ("state_dict", "model"):
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      return obj[key]
  return obj


def _flatten(obj: Mapping, prefix: str, out: dict, materialise) -> None:
  for key, value in obj.items():
    name = f"{prefix}{key}"
    if isinstance(value, _TensorRef):
      out[name] = materialise(value)
    elif isinstance(value, Mapping):
      _flatten(value, f"{name}.", out, materialise)
    # Anything else (epoch counters, lists, strings) is not a weight and is dropped.


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a `torch.save`d state dict into {name: np.ndarray}, executing no pickled code.

  Args:
    path: a `.pth` / `.bin` / `.pt` file in the zip or the legacy format.

  Returns:
    Flat {name: array}; arrays are contiguous copies with torch's shapes and dtypes (bf16 as
    `ml_dtypes.bfloat16`). A top-level {"state_dict": {...}} or {"model": {...}} wrapper is
    unwrapped; nested dicts of tensors are flattened with "." joined names; non-tensor entries
    are dropped.

  Raises:
    UnsafePickleError: the pickle names a global outside the state-dict allow list (such a file
      could run code under `torch.load(weights_only=False)`); nothing from it is called.
    ValueError: the file is not a PyTorch checkpoint or is corrupt.
  """
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    obj, buffers, big_endian = _read_zip(path)
  else:
    obj, buffers, big_endian = _read_legacy(path)
  obj = _unwrap(obj)
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
  out: dict[str, np.ndarray] = {}
  _flatten(obj, "", out, lambda ref: _materialise(ref, buffers, big_endian, path))
  return out
