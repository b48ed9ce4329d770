"""The export plan, pure: which rows of which HF tensor come from which region of which leaf, and land where.

Every HF tensor is a rule's global matrix G (the family's rules, read with an HF-format spec: Llama's q/k rows
half-split), and ``Transform.invert`` turns a block of the per-layer MaxText array into the rows of G it holds.
Cutting G into row blocks is cutting the per-layer array along ``Transform.row_axis`` (whole heads for q/k/v:
``mapping.row_quantum``), so a *piece* is

* the HF tensor, its rule and layer, the rows ``[a, b)`` of G;
* the source: the leaf and the region of it (the layer axis at 1 for a scanned leaf: one layer; an ``{expert}``
  rule's tensor is one expert's slot on ``mapping.EXPERT_AXIS`` of the stacked leaf), which is all a worker
  reads — tensorstore fetches only the zarr chunks the region touches;
* the destination: the file and the absolute byte range of those rows (:meth:`PlannedTensor.rows`), fixed by
  :func:`rayconv.targets.safetensors_files.plan_files` before any worker starts.

Pieces are cut so that one fits the worker's memory (:func:`piece_budget`, convert's model of
:mod:`rayconv.job`): a 405B embedding (128256 × 16384 bf16, 4.2 GB) is dozens of row blocks, never one array.
Units group consecutive pieces of one file (so a finished file's units are all done). On gs:// each piece is
one part object of its file, and GCS composes at most 1023 of them: a file needing more is refused up front.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

import numpy as np

from rayconv import families, mapping
from rayconv.errors import OutputError
from rayconv.exporting.model import leaf_name
from rayconv.job import GiB, MEMORY_PER_PIECE_BYTE, WORKER_BASE_BYTES
from rayconv.models import ModelSpec
from rayconv.source.orbax import MaxTextCheckpoint
from rayconv.targets.safetensors_files import DEFAULT_MAX_SHARD_SIZE, SafetensorsPlan, plan_files
from rayconv.targets.safetensors_writer import MAX_PARTS

#: Output bytes one unit gathers at most (its pieces run one after another in one worker): small enough that
#: a 405B export spreads over many workers and a resume loses little, large enough to keep per-call costs small.
UNIT_BYTES = 256 << 20
#: Numpy dtypes of the outputs ``--dtype`` offers (MaxText's ``weight_dtype``).
OUTPUT_DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows ``[rows[0], rows[1])`` of one HF tensor: read ``region`` of ``leaf``, write ``span`` of ``file``."""

    tensor: str
    rule: int  # index into the family's rules for the spec
    layer: int | None
    rows: tuple[int, int]
    leaf: str
    region: tuple[tuple[int, int], ...]  # [start, stop) per axis of the leaf
    file: str
    span: tuple[int, int]  # absolute byte range in the file

    @property
    def nbytes(self) -> int:
        return self.span[1] - self.span[0]


@dataclasses.dataclass(frozen=True)
class Unit:
    """Consecutive pieces of one file, run by one worker one after another."""

    id: str
    file: str
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    files: SafetensorsPlan
    units: tuple[Unit, ...]
    dtype: str
    piece_budget: int

    def fingerprint(self) -> str:
        """What the output is: its files' headers (names, shapes, dtype, byte ranges) and how the work is cut."""
        digest = hashlib.sha256()
        for file in self.files.files:
            digest.update(file.name.encode() + b"\0" + file.header)
        digest.update(json.dumps([dataclasses.asdict(u) for u in self.units]).encode())
        return digest.hexdigest()[:16]

    def unit_files(self) -> dict[str, list[Unit]]:
        out: dict[str, list[Unit]] = {f.name: [] for f in self.files.files}
        for unit in self.units:
            out[unit.file].append(unit)
        return out


def piece_budget(worker_memory_gb: float) -> int:
    """Bytes of one piece (the larger of its source and output bytes) a worker of this size may hold: convert's
    memory model (:mod:`rayconv.job`: read buffer, transformed copies, float32 temporaries of the query scaling)."""
    return max(1 << 20, int((worker_memory_gb * GiB - WORKER_BASE_BYTES) / MEMORY_PER_PIECE_BYTE))


def tensors(spec: ModelSpec) -> list[tuple[str, mapping.Rule, int, int | None, int | None, tuple[int, ...]]]:
    """[(HF name, rule, rule index, layer, expert, G shape)] of every tensor the spec's family writes; an
    ``{expert}`` rule's leaf holds one tensor per expert (its slot on ``mapping.EXPERT_AXIS``), others None."""
    out = []
    for index, rule in enumerate(families.rules(spec)):
        shape = mapping.global_shape(rule, spec)
        for layer in (range(spec.n_layers) if rule.per_layer else (None,)):
            for expert in families.experts(rule, spec):
                names = {} if expert is None else {"expert": expert}
                out.append((rule.source_key("hf", layer, **names), rule, index, layer, expert, shape))
    return out


def _piece_rows(rule: mapping.Rule, spec: ModelSpec, shape: tuple[int, ...], itemsize: int, budget: int,
                chunk_rows: int) -> int:
    """Rows of G per piece: whole heads, within the budget, a multiple of the source chunk when it fits."""
    if rule.transform.row_axis is None:
        return shape[0]
    quantum = mapping.row_quantum(rule, spec)
    row_bytes = math.prod(shape[1:]) * itemsize
    rows = max(quantum, budget // max(1, row_bytes) // quantum * quantum)
    step = math.lcm(quantum, chunk_rows)
    if step <= rows:
        rows = rows // step * step
    return min(rows, shape[0])


def output_dtype(dtype: str) -> np.dtype:
    if dtype not in OUTPUT_DTYPES:
        raise OutputError(f"--dtype {dtype!r}: choose one of {', '.join(OUTPUT_DTYPES)}")
    return mapping.BF16 if dtype == "bfloat16" else np.dtype(np.float32)


def plan_output_files(spec: ModelSpec, dtype: str, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> SafetensorsPlan:
    """MaxText's files for the spec's tensors in ``dtype`` (its split, the safetensors library's headers)."""
    return plan_files([(name, output_dtype(dtype), shape) for name, _, _, _, _, shape in tensors(spec)],
                      max_shard_size=max_shard_size, style="maxtext")


def build_plan(checkpoint: MaxTextCheckpoint, spec: ModelSpec, *, dtype: str = "bfloat16",
               max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, budget: int, gcs: bool = False,
               unit_bytes: int = UNIT_BYTES, files: SafetensorsPlan | None = None) -> ExportPlan:
    """The plan for a checkpoint already checked against the spec (:func:`rayconv.exporting.model.check_checkpoint`).
    ``files``: the output files' layout when it is given (``rayconv verify`` reads it from an export), else
    MaxText's split at ``max_shard_size``."""
    out_size = output_dtype(dtype).itemsize
    listed = tensors(spec)
    files = files or plan_output_files(spec, dtype, max_shard_size)
    pieces: list[Piece] = []
    for name, rule, index, layer, expert, shape in listed:
        leaf = checkpoint.leaves[leaf_name(rule, layer, checkpoint.scanned)]
        in_size = np.dtype(np.float32).itemsize if leaf.dtype == "float32" else 2
        axis = rule.transform.row_axis
        quantum = mapping.row_quantum(rule, spec)
        scanned = checkpoint.scanned and layer is not None
        leaf_axis = None if axis is None else axis + (1 if scanned and axis >= 1 else 0)
        chunk_rows = leaf.chunks[leaf_axis] * quantum if leaf_axis is not None else 1
        step = _piece_rows(rule, spec, shape, max(in_size, out_size), budget, chunk_rows)
        planned = files.tensors[name]
        for begin in range(0, shape[0], step):
            end = min(begin + step, shape[0])
            region = [(0, n) for n in mapping.layer_shape(rule, spec)]
            if axis is not None:
                region[axis] = (begin // quantum, end // quantum)
            if expert is not None:  # the expert's slot of the stacked leaf: one HF tensor
                region[mapping.EXPERT_AXIS] = (expert, expert + 1)
            if scanned:
                region.insert(1, (layer, layer + 1))
            pieces.append(Piece(name, index, layer, (begin, end), leaf.name, tuple(region), planned.file,
                                planned.rows(begin, end)))
    pieces.sort(key=lambda p: (p.file, p.span))
    units: list[Unit] = []
    current: list[Piece] = []
    for piece in pieces:
        if current and (current[0].file != piece.file or sum(p.nbytes for p in current) + piece.nbytes > unit_bytes):
            units.append(Unit(f"u{len(units):05d}", current[0].file, tuple(current)))
            current = []
        current.append(piece)
    if current:
        units.append(Unit(f"u{len(units):05d}", current[0].file, tuple(current)))
    if gcs:
        for file in files.files:
            count = sum(1 for p in pieces if p.file == file.name)
            if count >= MAX_PARTS:
                raise OutputError(f"{file.name} would be written in {count} regions; Cloud Storage composes at most "
                                  f"{MAX_PARTS - 1}: give a smaller --max_shard_size or a larger --worker_memory_gb")
    return ExportPlan(files, tuple(units), dtype, budget)


def describe(plan: ExportPlan) -> dict[str, Any]:
    pieces = [p for u in plan.units for p in u.pieces]
    return {"fingerprint": plan.fingerprint(), "files": len(plan.files.files), "units": len(plan.units),
            "pieces": len(pieces), "bytes": plan.files.total_size,
            "largest_piece_bytes": max((p.nbytes for p in pieces), default=0), "dtype": plan.dtype}
