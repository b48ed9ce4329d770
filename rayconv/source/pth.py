"""Index a ``torch.save`` zip (``consolidated.NN.pth``) without torch, and read tensors by byte range.

A .pth file is a zip of STORED records: ``<archive>/data.pkl`` describes every tensor as
``_rebuild_tensor_v2(storage, offset, size, stride, …)`` (or ``_rebuild_tensor_v3(…, dtype)`` for
dtypes without a legacy storage class, such as float8) with the storage as a persistent id naming a
record ``<archive>/data/<key>``. We parse the central directory (rayconv/source/torch_zip.py) and the pickle once (a
restricted unpickler that never imports torch and cannot execute anything else), then each tensor is one
contiguous byte range of the file: reading a 250 MB tensor costs 250 MB, not a shard.

The index accepts only what ``torch.load(weights_only=True, map_location="cpu")`` (torch 2.13)
accepts, and reads exactly the bytes torch would read: it follows torch's record lookup (the
archive is the first entry's folder, names match case-insensitively as in miniz), torch's
storage cache (the first reference to a storage key fixes its dtype and size) and torch's
``set_`` bounds rules (offset ≥ 0, every element inside the storage record). Where torch would
accept a file but the answer depends on miniz internals or cannot be served by range reads, the
index refuses it with one line instead: duplicate entry names (miniz's binary search picks one by
position), compressed tensor records, big-endian byte order, non-contiguous or negative-size
tensors, conj/neg metadata, non-string state-dict keys.
"""

from __future__ import annotations

import dataclasses
import pickle
import zipfile
from typing import Any, Mapping

import numpy as np

from rayconv.errors import ConversionError, SourceError
from rayconv.leaves import DTYPES, TensorInfo
from rayconv.source.bytesource import ByteSource
from rayconv.source.torch_zip import ENCRYPTED, Archive, check_container

_FLOATING = frozenset({"bfloat16", "float16", "float32", "float64", "float8_e4m3fn", "float8_e5m2"})

#: torch legacy storage class (``torch.<name>``, used by ``_rebuild_tensor_v2``) → dtype name. There is
#: no ``Float8_e4m3fnStorage``: torch pickles float8 tensors with ``torch.storage.UntypedStorage`` and
#: ``_rebuild_tensor_v3(…, torch.float8_e4m3fn)``, and refuses a pickle that names such a class.
_STORAGE_DTYPES: dict[str, str] = {
    "BFloat16Storage": "bfloat16",
    "HalfStorage": "float16",
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}

#: data.pkl may be deflated (torch decompresses it); bound what it may expand to before reading it.
#: A Meta shard's pickle is ~100 KB; 64 MiB leaves room for a million tensors.
MAX_PICKLE_BYTES = 64 << 20
_INT64_MAX = (1 << 63) - 1
_UINT64_MAX = (1 << 64) - 1


class _Invalid(Exception):
    """Raised inside the unpickler for a file torch would refuse (or rayconv cannot serve); becomes SourceError."""


@dataclasses.dataclass(frozen=True)
class _Storage:
    record: str
    dtype: str  # element dtype of the storage (uint8 for an untyped storage)
    nbytes: int
    start: int  # absolute file offset of the record's data
    crc32: int


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclasses.dataclass(frozen=True)
class _Dtype:
    name: str


class _Rebuilt:
    """Stand-in for a tensor in the unpickled state dict (already validated against its storage)."""

    def __init__(self, storage: _Storage, dtype: str, offset: int, size: tuple[int, ...]) -> None:
        self.storage, self.dtype, self.offset, self.size = storage, dtype, offset, size


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool and floats are refused by torch's set_()


def _rebuild(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any, metadata: Any,
             dtype: str, v3: bool) -> _Rebuilt:
    """torch's ``t.set_(storage, storage_offset, size, stride)`` checks, then rayconv's contiguity rule."""
    if not isinstance(storage, _Storage):
        raise _Invalid(f"a tensor's storage is {type(storage).__name__}, not a storage record")
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
        raise _Invalid(f"tensor size/stride must be sequences, got {type(size).__name__}/{type(stride).__name__}")
    size, stride = tuple(size), tuple(stride)
    if not all(_is_int(v) for v in (storage_offset, *size, *stride)):
        raise _Invalid(f"tensor offset/size/stride must be integers, got {storage_offset!r}/{size!r}/{stride!r}")
    if len(size) != len(stride):
        raise _Invalid(f"tensor size {list(size)} and stride {list(stride)} differ in length")
    if not all(-_INT64_MAX - 1 < v <= _INT64_MAX for v in (storage_offset, *size, *stride)):
        raise _Invalid(f"tensor offset/size/stride overflow int64 ({storage_offset}, {list(size)}, {list(stride)})")
    if storage_offset < 0:
        raise _Invalid(f"tensor storage offset {storage_offset} is negative")
    if any(v < 0 for v in size):
        raise _Invalid(f"tensor size {list(size)} is negative")
    numel = 1
    for v in size:  # c10::safe_multiply_u64, in order: an early overflow is fatal even if a later dim is 0
        numel *= v
        if numel > _UINT64_MAX:
            raise _Invalid(f"tensor size {list(size)} overflows")
    if numel > _INT64_MAX:
        raise _Invalid(f"tensor size {list(size)} overflows")
    if type(requires_grad) is not bool:
        raise _Invalid(f"requires_grad must be a bool, got {requires_grad!r}")
    if requires_grad and (v3 or dtype not in _FLOATING):
        raise _Invalid(f"a {dtype} tensor cannot require gradients here (torch refuses it)")
    if metadata:
        if not isinstance(metadata, dict):
            raise _Invalid(f"tensor metadata must be a dict, got {type(metadata).__name__}")
        raise _Invalid(f"tensor metadata {sorted(map(str, metadata))} (conj/neg views) is not supported")
    itemsize = DTYPES[dtype].itemsize
    span = itemsize
    for v in size:
        span *= max(v, 1)
    if span > _INT64_MAX:  # an empty tensor torch accepts, but no array can have this shape
        raise _Invalid(f"tensor size {list(size)} is too large")
    if numel:
        extent = storage_offset
        for dim, step in zip(size, stride):
            if dim > 1 and step < 0:
                raise _Invalid(f"tensor stride {list(stride)} is negative")
            extent += (dim - 1) * step
        needed = (extent + 1) * itemsize
        if needed > storage.nbytes:
            raise _Invalid(f"tensor (offset {storage_offset}, size {list(size)}, stride {list(stride)}) "
                           f"needs {needed} bytes of record {storage.record}, which has {storage.nbytes}")
        expected = 1
        for dim, step in zip(reversed(size), reversed(stride)):
            if dim != 1:
                if step != expected:
                    raise _Invalid(f"tensor size {list(size)} stride {list(stride)} is not contiguous")
                expected *= dim
    return _Rebuilt(storage, dtype, storage_offset, size)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,  # noqa: ANN001
                       metadata=None):  # noqa: ANN001 - pickle callback with torch's exact arity
    dtype = storage.dtype if isinstance(storage, _Storage) else "uint8"
    return _rebuild(storage, storage_offset, size, stride, requires_grad, metadata, dtype, v3=False)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,  # noqa: ANN001
                       metadata=None):  # noqa: ANN001 - pickle callback with torch's exact arity
    if not isinstance(dtype, _Dtype):
        raise _Invalid(f"tensor dtype {dtype!r} is not a torch dtype rayconv reads")
    return _rebuild(storage, storage_offset, size, stride, requires_grad, metadata, dtype.name, v3=True)


def _encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise _Invalid(f"unexpected _codecs.encode({type(obj).__name__}, {encoding!r}) in a weights file")
    return obj.encode(encoding, errors)


class _IndexUnpickler(pickle.Unpickler):
    """Resolves only what a weights-only state dict may contain; validates each storage as torch loads it."""

    def __init__(self, data: bytes, archive: Archive) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.loaded: dict[Any, _Storage] = {}  # torch's loaded_storages: the first reference to a key wins

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if (module, name) == ("torch._utils", "_rebuild_tensor_v3"):
            return _rebuild_tensor_v3
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 pickles bytes; torch allows it
            return _encode
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return _StorageType("uint8")
        if module == "torch" and name in DTYPES:
            return _Dtype(name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a weights file")

    def persistent_load(self, pid: Any) -> _Storage:
        if type(pid) is not tuple or not pid:
            raise _Invalid(f"unexpected persistent id {pid!r}")
        tag = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if tag != "storage" or len(pid) != 5:
            raise _Invalid(f"unexpected persistent id {pid!r} (torch expects ('storage', type, key, location, numel))")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise _Invalid(f"persistent id names {storage_type!r}, not a storage type")
        if key in self.loaded:
            return self.loaded[key]
        if not isinstance(numel, int) or numel < 0:
            raise _Invalid(f"storage {key!r} has element count {numel!r}")
        record = f"data/{key}"
        info = self.archive.find(record)
        if info is None:
            raise _Invalid(f"a tensor points at missing record {self.archive.prefix}{record}")
        nbytes = int(numel) * DTYPES[storage_type.dtype].itemsize
        if info.file_size != nbytes:
            raise _Invalid(f"record {info.filename} has {info.file_size} bytes, its storage says {nbytes}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise _Invalid(f"record {info.filename} is compressed; rayconv range-reads STORED records only")
        if info.flag_bits & ENCRYPTED:
            raise _Invalid(f"record {info.filename} is encrypted")
        if info.compress_size != info.file_size:
            raise _Invalid(f"STORED record {info.filename} has {info.compress_size} stored bytes for "
                           f"{info.file_size} (corrupt zip directory)")
        start = self.archive.data_start(info)
        if start + nbytes > self.archive.source.size():
            raise SourceError(f"{self.archive.name} is truncated: record {info.filename} ends at byte "
                              f"{start + nbytes}, file has {self.archive.source.size()}")
        storage = _Storage(record=info.filename, dtype=storage_type.dtype, nbytes=nbytes, start=start, crc32=info.CRC)
        if nbytes:  # torch caches only storages with data (typed_storage._data_ptr() != 0)
            self.loaded[key] = storage
        return storage


def _clip(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def index_pth(source: ByteSource, display: str | None = None) -> dict[str, TensorInfo]:
    """Parse a .pth file's zip directory and pickle into {tensor name: TensorInfo}.

    Raises SourceError (one line naming the file) for anything ``torch.load(weights_only=True)`` would
    refuse, and for the ambiguous or unservable files listed in the module docstring.
    """
    name = display or source.uri
    archive = Archive(source, name)
    with archive.zip:
        check_container(archive)
        if archive.find("data.pkl") is None:
            raise SourceError(f"{name} has no {archive.prefix}data.pkl: not a torch.save checkpoint")
        data = archive.read_small("data.pkl", MAX_PICKLE_BYTES)
        try:
            state = _IndexUnpickler(data, archive).load()
        except ConversionError:
            raise
        except _Invalid as exc:  # hostile values can have huge reprs: keep the line short
            raise SourceError(f"{name}: {_clip(str(exc))}") from None
        except Exception as exc:  # noqa: BLE001 - any failure to parse hostile bytes is the file's fault
            raise SourceError(f"{name}: cannot parse its tensor index ({type(exc).__name__}: {_clip(str(exc))})") from None
    if not isinstance(state, Mapping):
        raise SourceError(f"{name} does not hold a state dict")

    tensors: dict[str, TensorInfo] = {}
    for key, value in state.items():
        if not isinstance(value, _Rebuilt):
            continue
        if not isinstance(key, str):
            raise SourceError(f"{name}: state dict key {key!r} is not a string")
        storage, itemsize = value.storage, DTYPES[value.dtype].itemsize
        count = 1
        for dim in value.size:
            count *= dim
        nbytes = count * itemsize
        offset = storage.start + value.offset * itemsize if nbytes else storage.start
        whole = value.offset == 0 and nbytes == storage.nbytes
        part = None if whole or not nbytes else (storage.start, storage.nbytes, storage.crc32)
        tensors[key] = TensorInfo(name=key, dtype=value.dtype, shape=value.size, offset=offset, nbytes=nbytes,
                                  crc32=storage.crc32 if whole else None, record=part)
    end = max((t.offset + t.nbytes for t in tensors.values()), default=0)
    if end > source.size():
        raise SourceError(f"{name} is truncated: tensor data ends at byte {end}, file has {source.size()}")
    return tensors


def read_rows(source: ByteSource, info: TensorInfo, start: int = 0, stop: int | None = None,
              out: np.ndarray | None = None) -> np.ndarray:
    """Read rows [start, stop) of a tensor into a new (or the given) C-contiguous array."""
    stop = (info.shape[0] if info.shape else 0) if stop is None else stop
    shape = (stop - start,) + tuple(info.shape[1:]) if info.shape else ()
    if out is None:
        out = np.empty(shape, dtype=info.np_dtype)
    elif out.shape != shape or out.dtype != info.np_dtype or not out.flags.c_contiguous:
        raise ValueError(f"output buffer {out.shape}/{out.dtype} does not fit {shape}/{info.np_dtype}")
    offset, length = info.row_range(start, stop) if info.shape else (info.offset, info.nbytes)
    source.readinto(offset, memoryview(out.reshape(-1).view(np.uint8)))
    return out
