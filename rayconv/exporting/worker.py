"""One export unit: read each piece's region, undo MaxText's transform, write the bytes where the plan put them.

The job context (:class:`ExportContext`, a few KB: the checkpoint's description, the spec, the planned files'
headers and sizes) goes once to each worker; the engine's executors call its :meth:`ExportContext.run` for a
unit (``rayconv.engine.units``) and get a small :class:`ExportReceipt` back. A piece is processed as MaxText's
``to_huggingface.py`` processes a tensor: a float32 (trainer's) leaf is first rounded to bf16 (round to nearest
even, as its restore with ``weight_dtype=bfloat16`` does), then ``Transform.invert`` (``mapping.from_layer_block``,
HF-format spec) gives the rows of the HF tensor (``--dtype float32``: restored and transformed in float32, as
MaxText's ``weight_dtype=float32``), which are written at their offset:
``pwrite`` into the preallocated partial file (fsynced before the receipt, so a recorded unit's bytes survive a
host crash), or one part object on gs:// (:mod:`rayconv.targets.safetensors_writer`).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import socket
import time
from typing import Any

import numpy as np

from rayconv import families, mapping
from rayconv.exporting.plan import Piece, Unit
from rayconv.models import ModelSpec
from rayconv.source.orbax import MaxTextCheckpoint
from rayconv.storage import Location
from rayconv.targets import safetensors_writer
from rayconv.targets.safetensors_files import PlannedFile
from rayconv.tunables import Tunables
from rayconv.tunables import current as current_tunables


@dataclasses.dataclass
class ExportReceipt:
    """What a finished unit reports: enough to resume (its regions are written) and to account for the run."""

    unit: str
    file: str
    regions: list[tuple[int, int]]
    bytes_read: int
    bytes_written: int
    seconds: float
    worker: str = ""
    peak_rss: int = 0
    node: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ExportReceipt":
        data = dict(data)
        data["regions"] = [tuple(r) for r in data["regions"]]
        return cls(**data)


def compute_dtype(dtype: str) -> np.dtype:
    """What the leaves are restored as before the transform: MaxText's ``weight_dtype`` (``--dtype``)."""
    return mapping.BF16 if dtype == "bfloat16" else np.dtype(np.float32)


def read_piece(checkpoint: MaxTextCheckpoint, leaf: str, region: tuple[tuple[int, int], ...], scanned: bool,
               dtype: np.dtype) -> tuple[np.ndarray, int]:
    """(the region as a per-layer block in ``dtype``, bytes read): the layer axis dropped; float32 → bf16 rounds to
    nearest even (ml_dtypes, as jax's astype in MaxText's restore), bf16 → float32 is exact."""
    value = checkpoint.read(leaf, tuple(slice(a, b) for a, b in region))
    nbytes = value.nbytes
    if scanned:
        value = value[:, 0]
    if value.dtype != dtype:
        value = value.astype(dtype)
    return np.ascontiguousarray(value), nbytes


@dataclasses.dataclass(frozen=True)
class ExportContext:
    """What every export worker needs besides its unit; shipped once per worker."""

    checkpoint: MaxTextCheckpoint
    spec: ModelSpec
    output: str
    files: dict[str, PlannedFile]
    dtype: str
    tunables: Tunables = dataclasses.field(default_factory=current_tunables)
    #: The executors parse a Ray worker's answer with this (``rayconv.engine.executors``).
    receipt_type = ExportReceipt
    #: No commit step on a committer actor: the driver publishes the files itself.
    needs_committer = False

    def run(self, unit: Unit) -> ExportReceipt:
        return run_unit(self, unit)


def piece_rows(checkpoint: MaxTextCheckpoint, spec: ModelSpec, rule: mapping.Rule, piece: Piece,
               dtype: np.dtype) -> tuple[np.ndarray, int]:
    """(the piece's rows of its HF tensor, source bytes read): what the export writes at ``piece.span``."""
    scanned = checkpoint.scanned and piece.layer is not None
    block, nbytes = read_piece(checkpoint, piece.leaf, piece.region, scanned, dtype)
    # An {expert} piece's block is one expert's slot: its rows keep that axis of length 1 (the same bytes).
    rows = mapping.from_layer_block(rule, block, spec)
    if rows.nbytes != piece.nbytes:
        raise AssertionError(f"{piece.tensor} rows {piece.rows}: {rows.nbytes} bytes, planned {piece.nbytes}")
    return rows, nbytes


def run_unit(ctx: ExportContext, unit: Unit) -> ExportReceipt:
    """Run one unit's pieces in order; only one piece's arrays are alive at a time."""
    started = time.monotonic()
    rules = families.rules(ctx.spec)
    directory = Location.parse(ctx.output)
    writer = safetensors_writer.open_writer(directory, ctx.files[unit.file])
    bytes_read, dtype = 0, compute_dtype(ctx.dtype)
    try:
        for piece in unit.pieces:
            rows, nbytes = piece_rows(ctx.checkpoint, ctx.spec, rules[piece.rule], piece, dtype)
            bytes_read += nbytes
            writer.write(piece.span[0], rows)
            del rows
        if directory.is_local:  # the receipt promises the bytes are on disk
            fd = os.open(writer.partial, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        writer.close()
    return ExportReceipt(unit=unit.id, file=unit.file, regions=[p.span for p in unit.pieces], bytes_read=bytes_read,
                         bytes_written=unit.nbytes, seconds=time.monotonic() - started,
                         worker=f"{socket.gethostname()}:{os.getpid()}",
                         peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
