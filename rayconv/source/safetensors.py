"""Index a ``.safetensors`` file without loading it: every tensor becomes one byte range.

The format is an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data, with
offsets relative to the end of the header. We read the first 8 bytes and the header (two range reads per
file, bounded by :data:`MAX_HEADER_BYTES`) and validate it as strictly as the safetensors library does
(known dtypes, ``shape × itemsize == end − begin``, tensors sorted, contiguous and non-overlapping, the
data ending exactly at the end of the file) plus what JSON alone would let through (a name listed
twice). Workers then read rows of a tensor with one ranged read each, exactly as for ``.pth`` shards:
no ``safe_open`` of whole files, no mmap.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import ml_dtypes
import numpy as np

from rayconv import jsonio
from rayconv.errors import SourceError
from rayconv.source.bytesource import ByteSource
from rayconv.leaves import TensorInfo

#: The safetensors library refuses headers above 100 MB; so do we (a 405B file's header is ~20 KB).
MAX_HEADER_BYTES = 100_000_000

#: safetensors dtype tag → numpy dtype of the stored elements.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


def _dtype_name(dtype: np.dtype) -> str:
    """TensorInfo's dtype spelling (the .pth reader's): "bfloat16" or numpy's name."""
    return "bfloat16" if dtype == np.dtype(ml_dtypes.bfloat16) else dtype.name


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise SourceError(f"tensor {key} is listed twice")
        seen[key] = value
    return seen


def parse_header(header: bytes, data_size: int, name: str) -> dict[str, TensorInfo]:
    """Validate a header's JSON against the ``data_size`` bytes that follow it → {tensor: TensorInfo}.

    ``TensorInfo.offset`` is relative to the start of the data here; :func:`index_safetensors` makes
    it absolute.
    """
    try:
        entries = jsonio.loads(header, max_bytes=MAX_HEADER_BYTES, object_pairs_hook=_no_duplicates)
    except SourceError as exc:
        raise SourceError(f"{name}: header: {exc}") from None
    except jsonio.JSONError as exc:
        raise SourceError(f"{name} has a corrupt safetensors header ({exc})") from None
    if not isinstance(entries, dict):
        raise SourceError(f"{name} has a corrupt safetensors header (not a JSON object)")
    metadata = entries.pop("__metadata__", None)
    # The safetensors library reads __metadata__ as Option<HashMap<String, String>>: null or a str → str map.
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise SourceError(f"{name} has a corrupt safetensors header (__metadata__ must be a map of strings to "
                          "strings, as the safetensors library requires)")
    ranges: list[tuple[int, int, str]] = []
    tensors: dict[str, TensorInfo] = {}
    for key, entry in entries.items():
        if not (isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= set(entry)):
            raise SourceError(f"{name}: header entry {key} lacks dtype, shape or data_offsets")
        dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise SourceError(f"{name}: tensor {key} has unknown dtype {entry['dtype']!r}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
            raise SourceError(f"{name}: tensor {key} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise SourceError(f"{name}: tensor {key} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise SourceError(f"{name}: tensor {key} spans {end - begin} bytes, but {entry['dtype']} "
                              f"{shape} needs {nbytes}")
        ranges.append((begin, end, key))
        tensors[key] = TensorInfo(name=key, dtype=_dtype_name(dtype), shape=tuple(shape), offset=begin, nbytes=nbytes)
    position = 0
    for begin, end, key in sorted(ranges):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves a gap at byte {position}"
            raise SourceError(f"{name}: tensor {key} {what} (data_offsets [{begin}, {end}]; corrupt header)")
        position = end
    if position > data_size:
        raise SourceError(f"{name} is truncated: its header places tensor data up to byte {position} of the data "
                          f"section, which holds {data_size}")
    if position < data_size:
        raise SourceError(f"{name} has {data_size - position} bytes after its last tensor (corrupt header or "
                          "not a safetensors file)")
    return tensors


def index_safetensors(source: ByteSource, display: str | None = None) -> dict[str, TensorInfo]:
    """Read and validate one file's header → {tensor name: TensorInfo with absolute offsets}.

    Raises SourceError for anything that is not an intact safetensors file, naming the file.
    """
    name = display or source.uri
    size = source.size()
    if size < 8:
        raise SourceError(f"{name} is truncated ({size} bytes): not a safetensors file")
    (length,) = struct.unpack("<Q", source.read(0, 8))
    if length > MAX_HEADER_BYTES:
        raise SourceError(f"{name}: header length {length} exceeds {MAX_HEADER_BYTES} bytes (not a safetensors "
                          "file, or corrupt)")
    if 8 + length > size:
        raise SourceError(f"{name} is truncated: its header needs {8 + length} bytes, the file has {size}")
    tensors = parse_header(source.read(8, length), size - 8 - length, name)
    base = 8 + length
    return {key: TensorInfo(info.name, info.dtype, info.shape, base + info.offset, info.nbytes)
            for key, info in tensors.items()}
