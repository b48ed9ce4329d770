"""Hugging Face safetensors files as an output: every byte's place fixed before any worker starts.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (padded with spaces to a multiple
of 8), then the tensors' bytes back to back. Given the ordered list of (name, dtype, shape) an export writes,
:func:`plan_files` decides — exactly as MaxText 0.2.5's ``to_huggingface.py`` (``utils.shard_checkpoint`` +
``safetensors.numpy.save_file``) or transformers' ``save_pretrained`` would — which file each tensor goes to, each
file's header bytes and each tensor's absolute byte range. Workers can then write rows of a tensor straight into
their byte range (:mod:`rayconv.targets.safetensors_writer`), in any order, on any host, and the finished files
are byte-identical to the libraries' own.

What the safetensors library (0.8.0, the Rust ``serialize``) does, and this module reproduces:

* tensors are laid out by dtype, largest dtype *tag* first in the library's ``Dtype`` enum order (``U64``,
  ``I64``, ``F64``, ``F32``, …, ``BOOL``), then by name (byte order); the header lists them in that order;
* ``__metadata__`` (transformers and MaxText both pass ``{"format": "pt"}``) comes first;
* the JSON is compact (serde_json: no spaces, non-ASCII written raw, control characters escaped);
* the header is padded with spaces to a multiple of 8 bytes, so the data starts 8-byte aligned.

The file split (who goes where) follows one of two writers (:data:`STYLES`):

* ``maxtext`` — ``to_huggingface.py``: tensors in sorted name order; a file is closed when the next tensor would
  take it past ``max_shard_size`` (3 GiB by default, data bytes only); one file → ``model.safetensors`` and no
  index; else ``model-0000K-of-0000N.safetensors`` and ``model.safetensors.index.json`` = ``json.dump({"metadata":
  {"total_size"}, "weight_map"}, indent=2)`` (no trailing newline);
* ``transformers`` — ``save_pretrained`` (huggingface_hub's splitter): tensors in the given order; a tensor larger
  than the limit gets a file of its own while the current file stays open; the index carries ``total_parameters``
  too and is written with ``sort_keys=True`` plus a newline.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Iterable, Sequence

import numpy as np

from rayconv.errors import OutputError
from rayconv.source.safetensors import DTYPES

#: MaxText 0.2.5's ``utils.DEFAULT_MAX_SHARD_SIZE`` (3 GiB; its comment says 3GB).
DEFAULT_MAX_SHARD_SIZE = 3 * 1024 ** 3
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: What transformers and MaxText put in every file's header.
PT_METADATA = {"format": "pt"}
STYLES = ("maxtext", "transformers")

#: The safetensors library's ``Dtype`` enum, in declaration order (its derived ``Ord``): the data layout sorts
#: tensors by this, descending.
_DTYPE_ORDER = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16",
                "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")
_RANK = {tag: i for i, tag in enumerate(_DTYPE_ORDER)}
_TAG_OF = {dtype: tag for tag, dtype in DTYPES.items()}


def dtype_tag(dtype: Any) -> str:
    """The safetensors tag (``"BF16"``) of a tag, a numpy dtype or a dtype name (``"bfloat16"``)."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    try:
        tag = _TAG_OF.get(np.dtype(dtype))
    except TypeError:
        tag = None
    if tag is None:
        raise OutputError(f"dtype {dtype!r} has no safetensors form")
    return tag


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    """One tensor's place: ``file`` and the absolute byte range ``[start, start + nbytes)`` in it."""

    name: str
    dtype: str  # safetensors tag
    shape: tuple[int, ...]
    file: str
    start: int
    nbytes: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one index of axis 0 (a row): rows ``[a, b)`` are the contiguous range :meth:`rows` gives."""
        if not self.shape:
            return self.nbytes
        return self.nbytes // self.shape[0] if self.shape[0] else 0

    def rows(self, begin: int, end: int) -> tuple[int, int]:
        """Absolute byte range ``(start, stop)`` of rows ``[begin, end)`` (C order: axis 0 is outermost)."""
        count = self.shape[0] if self.shape else 1
        if not 0 <= begin <= end <= count:
            raise ValueError(f"{self.name}: rows [{begin}, {end}) outside [0, {count})")
        return self.start + begin * self.row_bytes, self.start + end * self.row_bytes


@dataclasses.dataclass(frozen=True)
class PlannedFile:
    """One output file: its name, its complete header (length prefix + padded JSON) and its size."""

    name: str
    header: bytes
    size: int
    tensors: tuple[str, ...]  # in data order


@dataclasses.dataclass(frozen=True)
class SafetensorsPlan:
    """Every output file and every tensor's byte range; ``index`` is the index file's bytes (None: one file)."""

    files: tuple[PlannedFile, ...]
    tensors: dict[str, PlannedTensor]
    index: bytes | None

    @property
    def total_size(self) -> int:
        """Data bytes over all files (the index's ``metadata.total_size``)."""
        return sum(t.nbytes for t in self.tensors.values())

    def file(self, name: str) -> PlannedFile:
        for planned in self.files:
            if planned.name == name:
                return planned
        raise KeyError(name)


def _json(value: Any) -> bytes:
    """serde_json's compact form (what the safetensors library writes)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def layout(entries: Sequence[tuple[str, str, tuple[int, ...]]],
           metadata: dict[str, str] | None = PT_METADATA) -> tuple[bytes, list[tuple[str, int, int]]]:
    """One file: (header bytes with length prefix and padding, [(name, absolute start, nbytes)] in data order)."""
    order = sorted(entries, key=lambda e: (-_RANK[e[1]], e[0].encode("utf-8")))
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": dict(metadata)}
    spans, offset = [], 0
    for name, tag, shape in order:
        nbytes = math.prod(shape) * DTYPES[tag].itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        spans.append((name, offset, nbytes))
        offset += nbytes
    text = _json(header)
    text += b" " * (-len(text) % 8)
    prefix = len(text).to_bytes(8, "little") + text
    return prefix, [(name, len(prefix) + begin, nbytes) for name, begin, nbytes in spans]


def _split_maxtext(items: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """``utils.shard_checkpoint``: sorted names; a new file when the next tensor would pass the limit."""
    files: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sorted(items):
        if size + nbytes > limit and files[-1]:
            files.append([])
            size = 0
        files[-1].append(name)
        size += nbytes
    return files


def _split_transformers(items: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """huggingface_hub's ``split_state_dict_into_shards_factory`` (no shared storages: every tensor is its own)."""
    files: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name, nbytes in items:
        if nbytes > limit:  # alone in a file, appended before the one still being filled
            files.append([name])
            continue
        if size + nbytes > limit:
            files.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        files.append(current)
    return files


def _index(style: str, weight_map: dict[str, str], total_size: int, total_parameters: int) -> bytes:
    if style == "maxtext":
        return json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2).encode()
    index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size}, "weight_map": weight_map}
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()


def plan_files(tensors: Iterable[tuple[str, Any, Sequence[int]]], *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
               style: str = "maxtext", metadata: dict[str, str] | None = PT_METADATA) -> SafetensorsPlan:
    """Plan the files for ``tensors`` = [(HF name, dtype, shape)] (order matters for ``transformers`` only)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}")
    if max_shard_size <= 0:
        raise OutputError(f"a maximum file size must be positive, got {max_shard_size}")
    entries: dict[str, tuple[str, str, tuple[int, ...]]] = {}
    for name, dtype, shape in tensors:
        if not name or name == "__metadata__" or name in entries:
            raise OutputError(f"tensor name {name!r} is empty, reserved or listed twice")
        entries[name] = (name, dtype_tag(dtype), tuple(int(n) for n in shape))
    if not entries:
        raise OutputError("nothing to write: no tensors")
    sizes = [(name, math.prod(shape) * DTYPES[tag].itemsize) for name, tag, shape in entries.values()]
    groups = (_split_maxtext if style == "maxtext" else _split_transformers)(sizes, max_shard_size)
    names = [SINGLE_FILE] if len(groups) == 1 else [
        f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    files, planned = [], {}
    for file_name, group in zip(names, groups):
        header, spans = layout([entries[n] for n in group], metadata)
        for name, start, nbytes in spans:
            planned[name] = PlannedTensor(name, entries[name][1], entries[name][2], file_name, start, nbytes)
        size = len(header) + sum(nbytes for _, _, nbytes in spans)
        files.append(PlannedFile(file_name, header, size, tuple(name for name, _, _ in spans)))
    index = None
    if len(groups) > 1:
        weight_map = {name: file_name for file_name, group in zip(names, groups) for name in group}
        total_parameters = sum(math.prod(shape) for _, _, shape in entries.values())
        index = _index(style, weight_map, sum(n for _, n in sizes), total_parameters)
    return SafetensorsPlan(tuple(files), planned, index)
