"""Index a ``torch.save`` zip (``consolidated.NN.pth``) without torch, and read tensors by byte range.

A .pth file is a zip of STORED records: ``<prefix>/data.pkl`` describes every tensor as
``_rebuild_tensor_v2(storage, offset, size, stride)`` with the storage as a persistent id naming a
record ``<prefix>/data/<key>``. We parse the central directory and the pickle once (a restricted
unpickler that never imports torch and cannot execute anything else), then each tensor is one
contiguous byte range of the file: reading a 250 MB tensor costs 250 MB, not a shard.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import struct
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from rayconv.errors import SourceError
from rayconv.source.bytesource import ByteSource, RangeFile

#: torch storage class name → numpy dtype of the stored elements.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "HalfStorage": np.dtype(np.float16),
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "Float8_e4m3fnStorage": np.dtype(ml_dtypes.float8_e4m3fn),
}

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zipfile's sizeFileHeader layout (30 bytes)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: ``offset`` is absolute in the file, rows are contiguous."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    crc32: int | None = None  # of the whole storage record, when the tensor covers all of it

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(ml_dtypes.bfloat16) if self.dtype == "bfloat16" else np.dtype(self.dtype)

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes

    def row_range(self, start: int, stop: int) -> tuple[int, int]:
        """(offset, length) of rows [start, stop) of a C-contiguous tensor."""
        return self.offset + start * self.row_bytes, (stop - start) * self.row_bytes


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    dtype: np.dtype
    numel: int


class _Rebuilt:
    """Stand-in for a tensor in the unpickled state dict."""

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_args):  # noqa: ANN001 - pickle callback
    return _Rebuilt(storage, storage_offset, size, stride)


class _StorageType:
    def __init__(self, name: str) -> None:
        self.name = name


class _IndexUnpickler(pickle.Unpickler):
    """Resolves only what a weights-only state dict may contain."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a weights file")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        return _Storage(key=str(key), dtype=_STORAGE_DTYPES[storage_type.name], numel=int(numel))


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for dim in reversed(shape):
        strides.append(acc)
        acc *= dim
    return tuple(reversed(strides))


def index_pth(source: ByteSource, display: str | None = None) -> dict[str, TensorInfo]:
    """Parse a .pth file's zip directory and pickle into {tensor name: TensorInfo}.

    Raises SourceError for anything that is not an intact torch zip checkpoint (truncated file,
    missing records, non-contiguous tensors), naming the file.
    """
    name = display or source.uri
    try:
        archive = zipfile.ZipFile(RangeFile(source))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise SourceError(f"{name} is not a readable torch checkpoint (truncated or corrupt zip: {exc})") from None
    with archive:
        infos = {info.filename: info for info in archive.infolist()}
        pkl = next((n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise SourceError(f"{name} has no data.pkl: not a torch.save checkpoint")
        prefix = pkl[: -len("data.pkl")]
        try:
            state = _IndexUnpickler(archive.open(pkl)).load()
        except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, KeyError, ValueError) as exc:
            raise SourceError(f"{name}: cannot parse its tensor index ({exc})") from None
        if not isinstance(state, Mapping):
            raise SourceError(f"{name} does not hold a state dict")

        record_offsets: dict[str, tuple[int, zipfile.ZipInfo]] = {}
        tensors: dict[str, TensorInfo] = {}
        for key, value in state.items():
            if not isinstance(value, _Rebuilt):
                continue
            storage = value.storage
            record = f"{prefix}data/{storage.key}"
            info = infos.get(record)
            if info is None:
                raise SourceError(f"{name}: tensor {key} points at missing record {record}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise SourceError(f"{name}: record {record} is compressed; cannot range-read it")
            if record not in record_offsets:
                header = source.read(info.header_offset, _LOCAL_HEADER.size)
                fields = _LOCAL_HEADER.unpack(header)
                if fields[0] != b"PK\x03\x04":
                    raise SourceError(f"{name}: bad local header for {record} (corrupt file)")
                start = info.header_offset + _LOCAL_HEADER.size + fields[10] + fields[11]
                record_offsets[record] = (start, info)
            start, info = record_offsets[record]
            itemsize = storage.dtype.itemsize
            if info.file_size != storage.numel * itemsize:
                raise SourceError(f"{name}: record {record} has {info.file_size} bytes, expected "
                                  f"{storage.numel * itemsize}")
            if value.stride != _contiguous_strides(value.size) and math.prod(value.size) > 1:
                raise SourceError(f"{name}: tensor {key} is not contiguous (stride {value.stride})")
            nbytes = math.prod(value.size) * itemsize
            whole = value.offset == 0 and nbytes == info.file_size
            tensors[key] = TensorInfo(
                name=key,
                dtype="bfloat16" if storage.dtype == np.dtype(ml_dtypes.bfloat16) else storage.dtype.name,
                shape=value.size,
                offset=start + value.offset * itemsize,
                nbytes=nbytes,
                crc32=info.CRC if whole else None,
            )
        end = max((t.offset + t.nbytes for t in tensors.values()), default=0)
        if end > source.size():
            raise SourceError(f"{name} is truncated: tensor data ends at byte {end}, file has {source.size()}")
        return tensors


def read_rows(source: ByteSource, info: TensorInfo, start: int = 0, stop: int | None = None,
              out: np.ndarray | None = None) -> np.ndarray:
    """Read rows [start, stop) of a tensor into a new (or the given) C-contiguous array."""
    stop = info.shape[0] if stop is None else stop
    shape = (stop - start,) + tuple(info.shape[1:]) if info.shape else ()
    if out is None:
        out = np.empty(shape, dtype=info.np_dtype)
    elif out.shape != shape or out.dtype != info.np_dtype or not out.flags.c_contiguous:
        raise ValueError(f"output buffer {out.shape}/{out.dtype} does not fit {shape}/{info.np_dtype}")
    offset, length = info.row_range(start, stop) if info.shape else (info.offset, info.nbytes)
    source.readinto(offset, memoryview(out.reshape(-1).view(np.uint8)))
    return out

