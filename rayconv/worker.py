"""The body of one work unit: read its byte ranges, transform, write chunks, return a receipt.

This is the only code that touches tensor bytes, and it runs wherever the engine puts it (a Ray
actor, or the driver process for ``--executor local``). It takes a plan unit (a description) and
returns a :class:`Receipt` (a few hundred bytes): tensors never leave the worker.

What a block becomes and how it is written are the target's (``ctx.target``: its values for a piece and its
writer, e.g. rayconv.targets.maxtext); the receipt carries what the writer returns, unread here.
"""

from __future__ import annotations

import os
import time

import numpy as np

from rayconv import families, fp8, mapping
from rayconv.checksum import crc32
from rayconv.errors import SourceError
from rayconv.leaves import Read
from rayconv.plan import Piece, Unit
from rayconv.receipts import JobContext, Receipt
from rayconv.source.bytesource import ByteSource, open_source


class Sources:
    """The opened source files (Meta shards, safetensors files), one per file index, reused across the unit's reads."""

    def __init__(self, uris: tuple[str, ...], scale_uris: tuple[str, ...] = ()) -> None:
        self._uris = uris
        self._scale_uris = scale_uris
        self._open: dict[int, ByteSource] = {}
        self._scales: dict[int, ByteSource] = {}

    def __getitem__(self, file: int) -> ByteSource:
        if file not in self._open:
            self._open[file] = open_source(self._uris[file])
        return self._open[file]

    def scale_name(self, index: int) -> str:
        return self._scale_uris[index].split("?", 1)[0]

    def scale_file(self, index: int) -> ByteSource:
        """fp8_scales_{index}.pt of an FP8 checkpoint."""
        if index not in self._scales:
            self._scales[index] = open_source(self._scale_uris[index])
        return self._scales[index]


def _read_fp8(read: Read, sources: Sources, crcs: list) -> np.ndarray:
    """float8 rows and their float32 row scales (two range reads), dequantized to bf16 (rayconv.fp8)."""
    raw = np.empty(read.shape, dtype=fp8.FP8)
    sources[read.file].readinto(read.offset, memoryview(raw.reshape(-1).view(np.uint8)))
    crcs.append((read.file, read.tensor, read.offset, read.length, crc32(raw.reshape(-1).view(np.uint8))))
    scale = np.empty(read.scale.length // 4, dtype="<f4")
    sources.scale_file(read.scale.file).readinto(read.scale.offset, memoryview(scale.view(np.uint8)))
    # Scale files are receipted as shard -1-r so the driver checks their records' CRC-32 too (verify_crcs).
    crcs.append((-1 - read.scale.file, read.scale.key, read.scale.offset, read.scale.length,
                 crc32(scale.view(np.uint8))))
    name = sources.scale_name(read.scale.file)
    fp8.check_scales(scale, f"{name}: {read.scale.key}", read.rows[0])
    return fp8.dequantize(raw, scale)


def _read_into(read: Read, sources: Sources, crcs: list, out: np.ndarray | None = None) -> np.ndarray:
    if read.scale is not None:
        return _read_fp8(read, sources, crcs)
    buffer = np.empty(read.shape, dtype=mapping.BF16) if out is None else out
    raw = buffer.reshape(-1).view(np.uint8)
    sources[read.file].readinto(read.offset, memoryview(raw))
    crcs.append((read.file, read.tensor, read.offset, read.length, crc32(raw)))
    return buffer


def read_block(piece: Piece, sources: Sources, crcs: list) -> mapping.Block:
    """Rows [row0, row1) of G: one read, the same rows of every shard side by side (mapping.SideBySide), or the
    same rows of a range of experts stacked ``[experts, rows, cols]`` (an expert piece).

    Every range is read straight into its place: a multi-shard block is never concatenated, the transform
    places each shard's columns itself (or assembles them, for the transforms that keep rows as rows).
    """
    if len(piece.reads) == 1 and piece.experts is None:
        block: mapping.Block = _read_into(piece.reads[0], sources, crcs)
    else:
        parts = np.empty((len(piece.reads), piece.row1 - piece.row0, piece.reads[0].shape[1]), dtype=mapping.BF16)
        if any(r.shape != parts.shape[1:] for r in piece.reads):
            raise SourceError(f"{piece.reads[0].tensor}: shards of different widths")
        for slot, read in zip(parts, piece.reads):
            part = _read_into(read, sources, crcs, out=slot)
            if part is not slot:  # FP8: dequantized into a new array
                slot[...] = part
        # An expert piece's reads are its experts' same rows: stacked [experts, rows, cols] is the block the
        # expert transforms take; other multi-read pieces are one matrix's shards side by side.
        block = parts if piece.experts is not None else mapping.SideBySide(parts)
    whole = block.assemble() if piece.duplicates and isinstance(block, mapping.SideBySide) else block
    for dup in piece.duplicates:
        copy = _read_into(dup, sources, crcs)
        if not np.array_equal(copy.view(np.uint16), whole.view(np.uint16)):
            raise SourceError(
                f"{piece.reads[0].tensor}: the kv-head copy in shard {dup.file:02d} differs from shard "
                f"{piece.reads[0].file:02d}; shards that should repeat kv heads do not (wrong --model_path "
                "or corrupt shard)")
    return block


def _peak_rss() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (ImportError, OSError):
        return 0


def run_unit(ctx: JobContext, unit: Unit) -> Receipt:
    """Execute one unit; raises ConversionError on bad input. Safe to run again."""
    start = time.monotonic()
    rules = families.rules(ctx.spec)
    sources = Sources(ctx.tensor_files, ctx.scale_files)
    target = ctx.target
    writer = target.writer(ctx, unit)
    crcs: list = []
    bytes_read = 0
    for piece in unit.pieces:
        block = read_block(piece, sources, crcs)
        bytes_read += sum(r.length + (r.scale.length if r.scale else 0) for r in piece.reads)
        bytes_read += sum(r.length for r in piece.duplicates)
        for kind, path, region, array in target.piece_values(ctx, rules[piece.rule], piece, block):
            writer.write(kind, path, region, array)
        # Overlap: the next pieces are read and transformed while a full batch commits.
        writer.piece_done()
        del block
    writer.flush()
    return Receipt(unit=unit.id, dbs=writer.written(), bytes_read=bytes_read, bytes_written=writer.bytes_written,
                   seconds=time.monotonic() - start, crcs=crcs, worker=f"{os.uname().nodename}:{os.getpid()}",
                   peak_rss=_peak_rss())
