"""Reads a legacy-format (pre-1.6, non-zip) PyTorch state dict into NumPy, without torch.

The legacy file is a sequence of pickles: magic number, protocol version, system info, the
state dict (tensors refer to storages by persistent id), the list of storage keys, then for
each key an int64 element count followed by the raw little-endian storage bytes (see
``torch/serialization.py``, ``_legacy_save`` / ``_legacy_load``). Tensors are rebuilt from
(storage, offset, size, stride), so non-contiguous layouts (e.g. channels-last weights
converted from TensorFlow) come out right.
"""

import collections
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclass
class _StorageRef:
    key: str
    dtype: type


@dataclass
class _LazyTensor:
    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor_v2(storage, offset, size, stride, *unused):
    return _LazyTensor(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
    return data


class _StorageType:
    def __init__(self, name):
        if name not in _STORAGE_DTYPES:
            raise ValueError(f"unsupported storage type torch.{name}")
        self.dtype = _STORAGE_DTYPES[name]


class _Unpickler(pickle.Unpickler):
    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        # Refusing everything else keeps a crafted file from running code.
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _numel, view_metadata = pid
        if kind != "storage" or view_metadata is not None:
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        return _StorageRef(str(key), storage_type.dtype)


def load_legacy_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Loads a legacy PyTorch ``.pth`` state dict as NumPy arrays.

    Args:
        path: a file written by ``torch.save(..., _use_new_zipfile_serialization=False)``.

    Returns:
        {parameter name: array} in the file's order, each array C-contiguous with the
        tensor's shape and dtype (e.g. conv weights float32 [out, in, kh, kw]).

    Raises:
        ValueError: not a legacy PyTorch file, or a layout this reader does not handle.
    """
    with open(path, "rb") as f:
        if pickle.load(f) != LEGACY_MAGIC:
            raise ValueError(f"{path}: not a legacy PyTorch file (magic number differs)")
        pickle.load(f)  # protocol version
        sys_info = pickle.load(f)
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path}: big-endian files are not supported")
        state = _Unpickler(f).load()
        keys = pickle.load(f)
        storages = {}
        dtypes = {t.storage.key: t.storage.dtype for t in state.values() if isinstance(t, _LazyTensor)}
        for key in keys:
            numel = int(np.frombuffer(f.read(8), "<i8")[0])
            dtype = np.dtype(dtypes.get(key, np.uint8))
            storages[key] = np.frombuffer(f.read(numel * dtype.itemsize), dtype)
    out = {}
    for name, t in state.items():
        if not isinstance(t, _LazyTensor):
            continue
        base = storages[t.storage.key]
        if t.size == ():
            out[name] = np.array(base[t.offset])
            continue
        item = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[t.offset:], shape=t.size, strides=tuple(s * item for s in t.stride))
        out[name] = np.ascontiguousarray(view)
    return out
