"""Reads PyTorch checkpoints into numpy arrays without PyTorch.

`load_state_dict(path)` understands three formats:

* torch's zip format (torch >= 1.6, the default of `torch.save`): an archive holding
  `<folder>/data.pkl` (the pickled object, tensors as persistent references) and one
  `<folder>/data/<key>` record of raw bytes per storage;
* torch's legacy format (`_use_new_zipfile_serialization=False`, and everything written
  before 1.6): consecutive pickles (magic number, protocol version, system info, the object,
  the list of storage keys) followed by the raw storages, each preceded by its element count;
* `.safetensors` (timm's hub format), read with `safetensors.numpy`.

Unpickling is restricted: only the few globals a state dict needs are resolved (ordered
dicts, the tensor and parameter rebuild functions, the storage types and dtypes), each to a
local stand-in; any other global is an error naming it, so no code from the file runs.
Tensors are rebuilt from their storage with numpy (offset, size and stride, then copied).
A crafted file cannot make the reader allocate more than the file holds: each pickle is
first walked to refuse values longer than the data left, every tensor's declared shape,
stride and offset is checked against its storage's size before any storage is read, and an
object the pickle references several times is read once.

Nested dicts (RD4AD's `{'bn': ..., 'decoder': ...}`, `{'state_dict': ...}` wrappers) come back
nested, as plain dicts; the converters in `ccl_jax.weights.convert` pick the parts they need. A
corrupt, truncated or unsupported file is a `ValueError` naming the file and the problem;
nothing is returned partially.
"""
from __future__ import annotations

import codecs
import collections
import dataclasses
import io
import math
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from typing import Any, Callable

import numpy as np

# What torch's legacy format writes first.
LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL_VERSION = 1001

# Storage classes (module `torch`, or `torch.cuda` in legacy files written from GPU) and the
# element type of their data. bfloat16 has no numpy type: it is widened exactly to float32.
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
# torch dtypes as pickled by `_rebuild_tensor_v3` (module `torch`), and their element types.
_TORCH_DTYPES = {
    "float64": "float64", "double": "float64", "float32": "float32", "float": "float32",
    "float16": "float16", "half": "float16", "bfloat16": "bfloat16", "int64": "int64",
    "long": "int64", "int32": "int32", "int": "int32", "int16": "int16", "short": "int16",
    "int8": "int8", "uint8": "uint8", "uint16": "uint16", "uint32": "uint32",
    "uint64": "uint64", "bool": "bool", "complex64": "complex64", "cfloat": "complex64",
    "complex128": "complex128", "cdouble": "complex128",
}
_UNTYPED = "untyped"  # byte storages (torch.UntypedStorage): the tensor carries the dtype


def _itemsize(dtype: str) -> int:
  if dtype == _UNTYPED:
    return 1
  if dtype == "bfloat16":
    return 2
  return np.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: str


@dataclasses.dataclass(frozen=True)
class _TorchDtype:
  dtype: str


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  """A storage named in the pickle; its bytes are read after unpickling."""
  key: str
  dtype: str  # element type, or _UNTYPED
  numel: int  # elements of `dtype` (bytes when untyped)
  base_offset: int = 0  # elements into the stored record (legacy storage views)


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  storage: _StorageRef
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]
  dtype: str


class _Malformed(Exception):
  """A record inside the pickle has the wrong form (reported as a corrupt file)."""


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(
      isinstance(v, int) and not isinstance(v, bool) for v in value):
    raise _Malformed(f"tensor {what} {value!r} is not a tuple of integers")
  return tuple(value)


def _tensor_ref(storage: Any, storage_offset: Any, size: Any, stride: Any,
                dtype: str | None = None) -> _TensorRef:
  if not isinstance(storage, _StorageRef):
    raise _Malformed(f"tensor storage is a {type(storage).__name__}, not a storage reference")
  if not isinstance(storage_offset, int) or storage_offset < 0:
    raise _Malformed(f"tensor storage offset {storage_offset!r} is invalid")
  size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
  if len(size) != len(stride) or any(s < 0 for s in size + stride):
    raise _Malformed(f"tensor size {size} and stride {stride} do not fit together")
  if dtype is None:
    if storage.dtype == _UNTYPED:
      raise _Malformed("a byte storage needs a dtype (_rebuild_tensor_v3)")
    dtype = storage.dtype
  elif storage.dtype not in (_UNTYPED, dtype):
    raise _Malformed(f"tensor dtype {dtype} does not match its {storage.dtype} storage")
  return _TensorRef(storage, storage_offset, size, stride, dtype)


# Stand-ins for the torch functions a state-dict pickle calls. They only record what the
# tensor is; the data is read from the storages afterwards.
def _rebuild_tensor(storage, storage_offset, size, stride):
  return _tensor_ref(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _tensor_ref(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(dtype, _TorchDtype):
    raise _Malformed(f"tensor dtype {dtype!r} is not a torch dtype")
  return _tensor_ref(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  if not isinstance(data, _TensorRef):
    raise _Malformed(f"parameter data is a {type(data).__name__}, not a tensor")
  return data


def _codecs_encode(text, encoding="utf-8"):
  # Protocol-2 pickles spell bytes objects as _codecs.encode(str, 'latin1').
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise _Malformed("_codecs.encode is only accepted for latin1 bytes")
  return codecs.encode(text, encoding)


def _torch_size(values=()):
  return tuple(_int_tuple(values, "size"))


def _allowed_globals() -> dict[tuple[str, str], Any]:
  allowed: dict[tuple[str, str], Any] = {
      ("collections", "OrderedDict"): collections.OrderedDict,
      ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
      ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
      ("torch", "Size"): _torch_size,
      ("_codecs", "encode"): _codecs_encode,
  }
  for name, dtype in _STORAGE_DTYPES.items():
    allowed[("torch", name)] = _StorageType(dtype)
    allowed[("torch.cuda", name)] = _StorageType(dtype)
  for module in ("torch", "torch.storage"):
    allowed[(module, "UntypedStorage")] = _StorageType(_UNTYPED)
    allowed[(module, "TypedStorage")] = _StorageType(_UNTYPED)
  for name, dtype in _TORCH_DTYPES.items():
    allowed[("torch", name)] = _TorchDtype(dtype)
  return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class UnsafeCheckpointError(ValueError):
  """The pickle names a global outside the state-dict allowlist."""


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only allowlisted globals; storages go through `persistent_load`."""

  def __init__(self, file, path: str, persistent_load: Callable[[Any], Any] | None):
    super().__init__(file)
    self._path = path
    self._persistent = persistent_load

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except (KeyError, TypeError):
      raise UnsafeCheckpointError(
          f"{self._path}: refusing to load global {module}.{name}: only plain state dicts "
          "(tensors in nested dicts/lists) can be read without PyTorch.") from None

  def persistent_load(self, pid: Any) -> Any:
    if self._persistent is None:
      raise _Malformed(f"unexpected persistent reference {pid!r}")
    return self._persistent(pid)


def _storage_from_pid(pid: Any, legacy: bool) -> _StorageRef:
  """('storage', type, key, location, numel[, view_metadata]) -> a storage reference."""
  if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
    kind = pid[0] if isinstance(pid, tuple) and pid else pid
    raise _Malformed(f"unsupported persistent reference {kind!r} (only storages are read)")
  expected = 6 if legacy else 5
  if len(pid) != expected:
    raise _Malformed(f"storage reference {pid!r} has {len(pid)} fields, expected {expected}")
  storage_type, key, _, numel = pid[1:5]
  if not isinstance(storage_type, _StorageType):
    raise _Malformed(f"storage type {storage_type!r} is not a storage class")
  if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
    raise _Malformed(f"storage reference {pid!r} is malformed")
  if legacy and pid[5] is not None:
    view = pid[5]
    if (not isinstance(view, tuple) or len(view) != 3
        or not all(isinstance(v, int) for v in view[1:])):
      raise _Malformed(f"storage view {view!r} is malformed")
    _, offset, view_size = view
    if offset < 0 or view_size < 0 or offset + view_size > numel:
      raise _Malformed(f"storage view {view!r} lies outside its storage of {numel} elements")
    return _StorageRef(key, storage_type.dtype, view_size, offset)
  return _StorageRef(key, storage_type.dtype, numel)


def _tensor_from_bytes(ref: _TensorRef, data: bytes, byteorder: str) -> np.ndarray:
  """Gathers a tensor's elements from its storage record (raw bytes of the whole storage)."""
  storage = ref.storage
  item = _itemsize(ref.dtype)
  start = storage.base_offset * _itemsize(storage.dtype)
  stored = storage.numel * _itemsize(storage.dtype)
  if start + stored > len(data):
    raise _Malformed(f"storage {storage.key!r} needs {start + stored} bytes but its record "
                     f"has {len(data)} (truncated file?)")
  buffer = data[start:start + stored]
  count = len(buffer) // item
  np_dtype = np.dtype("uint16" if ref.dtype == "bfloat16" else ref.dtype)
  np_dtype = np_dtype.newbyteorder("<" if byteorder == "little" else ">")
  if 0 in ref.size:
    out = np.zeros(ref.size, np_dtype.newbyteorder("="))
  else:
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if last >= count:
      raise _Malformed(f"tensor (offset {ref.offset}, size {ref.size}, stride {ref.stride}) "
                       f"reaches past its storage {storage.key!r} of {count} elements")
    flat = np.frombuffer(buffer, np_dtype, count=count)
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset:], shape=ref.size, strides=[s * item for s in ref.stride],
        writeable=False)
    out = np.array(view, dtype=np_dtype.newbyteorder("="), order="C")
  if ref.dtype == "bfloat16":
    out = (out.astype(np.uint32) << 16).view(np.float32)
  return out


# Sizes, strides and offsets index numpy arrays with int64.
_MAX_INDEX = 2**63 - 1


def _check_tensor(ref: _TensorRef, key: str) -> None:
  """Refuses a tensor that its storage cannot hold, from the pickle alone.

  Runs before any storage is read or any array allocated, so a small crafted file cannot
  make the reader allocate what it declares. Every element must lie inside the storage,
  and the tensor may not have more elements than the storage: the reader copies each
  tensor into its own array, so a stride-0 (expanded) tensor would otherwise cost far more
  memory than the file holds; the parameters and buffers of the models read here are never
  such views.
  """
  storage = ref.storage
  available = storage.numel * _itemsize(storage.dtype) // _itemsize(ref.dtype)
  numel = math.prod(ref.size)
  where = (f"tensor {key!r} declares shape {ref.size} (stride {ref.stride}, offset "
           f"{ref.offset}, {ref.dtype}) but its storage {storage.key!r} holds {available} "
           "element(s)")
  if (any(v > _MAX_INDEX for v in (*ref.size, *ref.stride, ref.offset))
      or numel * _itemsize(ref.dtype) > _MAX_INDEX):
    raise _Malformed(f"{where}; the sizes overflow")
  if numel == 0:
    return
  if numel > available:
    raise _Malformed(f"{where}; a tensor may not have more elements ({numel}) than its "
                     "storage")
  last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
  if last >= available:
    raise _Malformed(f"{where}; its element {last} lies past the storage's end")


def _check_tensors(obj: Any, key: str = "", seen: set[int] | None = None) -> None:
  """`_check_tensor` on every tensor of an unpickled object; `key` names its place.

  Each object is visited once: the pickle memo lets a few bytes reference one container
  many times (2**n leaves from n levels of `[x, x]`).
  """
  seen = set() if seen is None else seen
  if id(obj) in seen:
    return
  seen.add(id(obj))
  if isinstance(obj, _TensorRef):
    _check_tensor(obj, key or "<top level>")
    return
  if isinstance(obj, dict):
    items = obj.items()
  elif isinstance(obj, (list, tuple)):
    items = enumerate(obj)
  else:
    return
  for k, value in items:
    name = k if isinstance(k, str) else repr(k)
    _check_tensors(value, f"{key}/{name}" if key else name, seen)


def _materialise(obj: Any, load: Callable[[_TensorRef], np.ndarray],
                 done: dict[int, Any] | None = None) -> Any:
  """`obj` with its tensors read; an object the pickle references several times is read
  once and shared (as torch shares a tied tensor), so the memo cannot multiply memory."""
  done = {} if done is None else done
  if id(obj) in done:
    return done[id(obj)]
  if isinstance(obj, _TensorRef):
    out = load(obj)
  elif isinstance(obj, _StorageRef):
    raise _Malformed(f"a bare storage ({obj.key!r}) is not a tensor")
  elif isinstance(obj, (_StorageType, _TorchDtype)) or callable(obj):
    raise _Malformed(f"unexpected value {obj!r} in the state dict")
  elif isinstance(obj, dict):
    out = {k: _materialise(v, load, done) for k, v in obj.items()}
  elif isinstance(obj, list):
    out = [_materialise(v, load, done) for v in obj]
  elif isinstance(obj, tuple):
    out = tuple(_materialise(v, load, done) for v in obj)
  else:
    return obj
  done[id(obj)] = out
  return out


class _BoundedReader:
  """A file view that refuses reads past `end` instead of attempting them."""

  def __init__(self, file, end: int):
    self._file, self._end = file, end

  def read(self, n: int = -1) -> bytes:
    left = self._end - self._file.tell()
    if n is None or n < 0:
      n = left
    if n > left:
      raise _Malformed(f"the pickle declares a value of {n} bytes but only {left} remain "
                       "(truncated or crafted file?)")
    return self._file.read(n)

  def readline(self) -> bytes:
    return self._file.readline()


def _check_pickle_lengths(file, end: int) -> None:
  """Walks the pickle at `file`'s position (which is restored) without building anything.

  The C unpickler allocates a bytes or string value's declared length before reading it,
  so a few bytes declaring 1.8 GB would allocate that much before failing; pickletools
  reads through `_BoundedReader`, which refuses any length beyond the end of the data.
  """
  start = file.tell()
  for _ in pickletools.genops(_BoundedReader(file, end)):
    pass
  file.seek(start)


# Errors that corrupt input makes the standard library raise.
_CORRUPT = (pickle.UnpicklingError, _Malformed, EOFError, zipfile.BadZipFile, zlib.error,
            struct.error, KeyError, IndexError, TypeError, AttributeError, ValueError,
            OverflowError, UnicodeDecodeError, RecursionError, MemoryError)


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise _Malformed("no single <folder>/data.pkl record: not a torch.save zip archive "
                       f"(records: {names[:8]})")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if f"{prefix}byteorder" in names:
      byteorder = archive.read(f"{prefix}byteorder").decode("ascii").strip()
      if byteorder not in ("little", "big"):
        raise _Malformed(f"unknown byteorder record {byteorder!r}")
    raw = archive.read(pickles[0])
    data = io.BytesIO(raw)
    _check_pickle_lengths(data, len(raw))
    unpickler = _RestrictedUnpickler(data, path,
                                     lambda pid: _storage_from_pid(pid, legacy=False))
    obj = unpickler.load()
    _check_tensors(obj)
    records: dict[str, bytes] = {}

    def load(ref: _TensorRef) -> np.ndarray:
      key = ref.storage.key
      if key not in records:
        name = f"{prefix}data/{key}"
        if name not in names:
          raise _Malformed(f"storage record {name!r} is missing")
        records[key] = archive.read(name)  # checks the CRC
      return _tensor_from_bytes(ref, records[key], byteorder)

    return _materialise(obj, load)


def _load_legacy(path: str) -> Any:
  file_size = os.path.getsize(path)
  with open(path, "rb") as f:

    def unpickle(persistent_load=None):
      _check_pickle_lengths(f, file_size)
      return _RestrictedUnpickler(f, path, persistent_load).load()

    magic = unpickle()
    if magic != LEGACY_MAGIC_NUMBER:
      raise _Malformed("wrong magic number: not a torch.save file")
    protocol = unpickle()
    if protocol != LEGACY_PROTOCOL_VERSION:
      raise _Malformed(f"unsupported legacy protocol version {protocol!r}")
    sys_info = unpickle()
    if not isinstance(sys_info, dict):
      raise _Malformed("system info record is not a dict")
    byteorder = "little" if sys_info.get("little_endian", True) else "big"
    storages: dict[str, _StorageRef] = {}

    def persistent_load(pid: Any) -> _StorageRef:
      ref = _storage_from_pid(pid, legacy=True)
      known = storages.setdefault(ref.key, dataclasses.replace(
          ref, numel=pid[4], base_offset=0))
      if known.dtype != ref.dtype:
        raise _Malformed(f"storage {ref.key!r} is referenced with two element types")
      return ref

    obj = unpickle(persistent_load)
    _check_tensors(obj)
    keys = unpickle()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
      raise _Malformed("storage key list is malformed")
    if set(storages) - set(keys):
      raise _Malformed(f"storages {sorted(set(storages) - set(keys))[:5]} are not in the file")
    records: dict[str, bytes] = {}
    for key in keys:
      if key not in storages:
        raise _Malformed(f"storage {key!r} is listed but no tensor uses it")
      header = f.read(8)
      if len(header) != 8:
        raise _Malformed(f"file ends before storage {key!r} (truncated file?)")
      numel = int.from_bytes(header, byteorder, signed=True)
      nbytes = numel * _itemsize(storages[key].dtype)
      if numel < storages[key].numel:
        raise _Malformed(f"storage {key!r} holds {numel} elements, the pickle says "
                         f"{storages[key].numel}")
      left = file_size - f.tell()
      if nbytes > left:
        raise _Malformed(f"storage {key!r} needs {nbytes} bytes but the file ends after "
                         f"{left} (truncated file?)")
      data = f.read(nbytes)
      if len(data) != nbytes:
        raise _Malformed(f"storage {key!r} needs {nbytes} bytes but the file ends after "
                         f"{len(data)} (truncated file?)")
      records[key] = data
    return _materialise(obj, lambda ref: _tensor_from_bytes(ref, records[ref.storage.key],
                                                            byteorder))


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    from safetensors.numpy import load_file
  except ImportError as e:
    raise ImportError("Reading .safetensors files needs the `safetensors` package "
                      "(pip install safetensors).") from e
  try:
    return dict(load_file(path))
  except Exception as e:  # safetensors raises its own error type on corrupt input
    raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def _looks_like_safetensors(head: bytes, size: int) -> bool:
  if len(head) < 9:
    return False
  header_len = int.from_bytes(head[:8], "little")
  return 0 < header_len <= size - 8 and head[8:9] == b"{"


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a PyTorch checkpoint (zip, legacy pickle or safetensors) into numpy arrays.

  Returns the saved dict with every tensor replaced by a numpy array (bfloat16 widened to
  float32); nested dicts, lists and plain Python values are kept. Raises ValueError naming
  the file for corrupt or truncated files and for globals outside the state-dict
  allowlist (`UnsafeCheckpointError`, a ValueError), FileNotFoundError for a missing file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No checkpoint file at {path!r}.")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(16)
  if path.endswith(".safetensors") or _looks_like_safetensors(head, size):
    return _load_safetensors(path)
  if head.startswith(b"PK"):
    loader, kind = _load_zip, "torch zip archive"
  elif head.startswith(b"\x80"):
    loader, kind = _load_legacy, "legacy torch pickle"
  else:
    raise ValueError(f"{path}: not a PyTorch checkpoint (expected a torch.save zip archive, a "
                     f"legacy torch pickle or a safetensors file; the file starts with "
                     f"{head[:8]!r}).")
  try:
    obj = loader(path)
  except UnsafeCheckpointError:
    raise
  except _CORRUPT as e:
    message = str(e) if isinstance(e, _Malformed) else f"{type(e).__name__}: {e}"
    if isinstance(e, zipfile.BadZipFile) and "not a zip file" in str(e):
      message = "the zip directory at the end of the file is missing or damaged; truncated?"
    raise ValueError(f"{path}: corrupt or truncated {kind} ({message}).") from e
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict.")
  return obj
