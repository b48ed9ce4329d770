"""Leaf types: what a source tensor is (``TensorInfo``), what a piece reads (``Read``, ``ScaleRead``) and what an
output array is (``ArraySpec``).

They are plain data shared by the readers, the planner, the workers and the sinks; keeping them here, with no
import from the rest of rayconv, is what lets each of those import them without importing one another.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_dtypes
import numpy as np

#: torch dtype name → numpy dtype. The names are TensorInfo.dtype values.
DTYPES: dict[str, np.dtype] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: ``offset`` is absolute in the file, rows are contiguous."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    crc32: int | None = None  # of the whole storage record, when the tensor covers all of it
    #: (record start, record bytes, record CRC-32) when the tensor covers only part of its storage record
    #: (``torch.save(big[:n])``): the CRC check must see the rest of the record too (rayconv.checksum).
    record: tuple[int, int, int] | None = None

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes

    def row_range(self, start: int, stop: int) -> tuple[int, int]:
        """(offset, length) of rows [start, stop) of a C-contiguous tensor."""
        return self.offset + start * self.row_bytes, (stop - start) * self.row_bytes


@dataclasses.dataclass(frozen=True)
class ScaleRead:
    """The float32 row scales of an FP8 read: a byte range of ``plan.scale_files[file]`` (see rayconv.fp8)."""

    file: int
    key: str
    offset: int
    length: int


@dataclasses.dataclass(frozen=True)
class Read:
    """One contiguous byte range of one source file: rows [row0, row1) of a tensor."""

    file: int  # file index into Plan.tensor_files: a consolidated.NN.pth (Meta shard s is file s) or a .safetensors file
    tensor: str  # the tensor's name in that file
    offset: int
    length: int
    rows: tuple[int, int]
    shape: tuple[int, ...]  # shape of the rows read
    scale: ScaleRead | None = None  # set for float8 rows: dequantize with these scales (FP8 SKU)


def np_dtype(name: str) -> Any:
    """An output dtype name (``ArraySpec.dtype``) as numpy understands it."""
    return {"bfloat16": ml_dtypes.bfloat16, "int4": ml_dtypes.int4}.get(name, name)


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One leaf array of an output tree."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str  # "bfloat16" | "int8" | "int4" | "int64"
    chunks: tuple[int, ...]

    @property
    def param_name(self) -> str:
        return ".".join(self.path)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(np_dtype(self.dtype)).itemsize
