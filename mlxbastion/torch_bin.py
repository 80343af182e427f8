"""Read ``pytorch_model.bin`` checkpoints without torch and without running code.

A torch checkpoint is a zip archive: ``data.pkl`` describes the state dict and
``data/<key>`` holds each storage's raw bytes. Plain ``pickle.load`` would
import and call whatever the pickle names, so we use an unpickler that knows
only the handful of names a state dict needs and refuses everything else.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
import numpy as np

# torch storage class name -> (numpy dtype to read the bytes as, MLX dtype).
_STORAGES = {
    "FloatStorage": (np.float32, mx.float32),
    "HalfStorage": (np.float16, mx.float16),
    "BFloat16Storage": (np.uint16, mx.bfloat16),
    "DoubleStorage": (np.float64, mx.float32),
    "LongStorage": (np.int64, mx.int64),
    "IntStorage": (np.int32, mx.int32),
    "ShortStorage": (np.int16, mx.int16),
    "CharStorage": (np.int8, mx.int8),
    "ByteStorage": (np.uint8, mx.uint8),
    "BoolStorage": (np.bool_, mx.bool_),
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name


def _rebuild_tensor(storage, offset, size, stride, *_):
    data, mx_dtype = _check_view(storage, offset, size, stride)
    itemsize = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[offset:], shape=tuple(size), strides=[s * itemsize for s in stride]
    )
    array = np.ascontiguousarray(view)
    if mx_dtype == mx.bfloat16:
        return mx.array(array).view(mx.bfloat16)
    return mx.array(array).astype(mx_dtype)


def _check_view(storage, offset, size, stride) -> tuple[np.ndarray, mx.Dtype]:
    """Refuse a tensor whose (offset, size, stride) reads outside its storage.

    as_strided does no bounds checks: a corrupt or crafted file would otherwise
    read other memory, giving garbage or a crash.
    """
    if not (
        isinstance(storage, tuple)
        and len(storage) == 2
        and isinstance(storage[0], np.ndarray)
    ):
        raise pickle.UnpicklingError("a tensor does not refer to a storage")
    data = storage[0]

    def ints(value) -> bool:
        return isinstance(value, (tuple, list)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )

    if not (isinstance(offset, int) and ints(size) and ints(stride)) or len(
        size
    ) != len(stride):
        raise pickle.UnpicklingError(
            f"a tensor has a malformed layout (offset {offset!r}, size {size!r}, "
            f"stride {stride!r})"
        )
    if offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise pickle.UnpicklingError(
            f"a tensor has a negative offset, size or stride (offset {offset}, "
            f"size {tuple(size)}, stride {tuple(stride)})"
        )
    # The last element read is at offset + sum((n - 1) * s); none for size 0.
    end = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1
    if 0 in size:
        end = offset
    if end > len(data):
        raise pickle.UnpicklingError(
            f"a tensor of size {tuple(size)} and stride {tuple(stride)} at offset "
            f"{offset} reads past its storage of {len(data)} elements; the file "
            "is corrupt"
        )
    return storage


def _rebuild_parameter(data, *_):
    return data


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive = archive
        self.prefix = prefix

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a state dict should hold only tensors"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        np_dtype, mx_dtype = _STORAGES[storage_type.name]
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        if len(raw) % np.dtype(np_dtype).itemsize:
            raise pickle.UnpicklingError(
                f"storage {key} holds {len(raw)} bytes, not a whole number of "
                f"{storage_type.name} elements; the file is corrupt"
            )
        return np.frombuffer(raw, dtype=np_dtype), mx_dtype


def load_torch_bin(path: Path) -> dict[str, mx.array]:
    """The tensors of a zip-format ``pytorch_model.bin`` as MLX arrays.

    Raises:
        ValueError: the file is not a zip-format torch checkpoint, is
            truncated, or names anything other than tensors.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            prefix = pkl[: -len("/data.pkl")]
            with archive.open(pkl) as f:
                state = _SafeUnpickler(f, archive, prefix).load()
    except (zipfile.BadZipFile, StopIteration, KeyError, EOFError) as e:
        raise ValueError(
            f"cannot read {path}: not a zip-format PyTorch checkpoint, or "
            f"truncated ({type(e).__name__}); re-download it or use safetensors"
        ) from e
    except pickle.UnpicklingError as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, mx.array):
            raise ValueError(
                f"cannot read {path}: entry {name!r} is a {type(value).__name__}, "
                "not a tensor; a state dict should hold only tensors"
            )
    return dict(state)
