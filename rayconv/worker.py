"""The body of one work unit: read its byte ranges, transform, write chunks, return a receipt.

This is the only code that touches tensor bytes, and it runs wherever the engine puts it (a Ray
actor, or the driver process for ``--executor local``). It takes a plan unit (a description) and
returns a :class:`Receipt` (a few hundred bytes): tensors never leave the worker.

Idempotence: a unit writes into fresh child OCDBT databases named after the unit and a random
attempt tag, and the receipt names them. Only databases named by a recorded receipt are merged at
commit, so a retried or duplicated attempt can never mix partial chunks into the output.
"""

from __future__ import annotations

import os
import secrets
import time
import zlib
from typing import Iterator

import numpy as np
import tensorstore as ts

from rayconv import families, fp8, mapping, quantize, trees
from rayconv.errors import SourceError
from rayconv.mapping import Rule
from rayconv.leaves import Read
from rayconv.plan import Piece, Unit, aqt_paths, block_region, leaf_paths
from rayconv.receipts import JobContext, Receipt
from rayconv.sink.layout import array_kvstore, array_schema, ocdbt_kvstore
from rayconv.source.bytesource import ByteSource, open_source
from rayconv.storage import Location, output_errors


class Sources:
    """Opened shard sources, one per shard, reused across the unit's reads."""

    def __init__(self, uris: tuple[str, ...], scale_uris: tuple[str, ...] = ()) -> None:
        self._uris = uris
        self._scale_uris = scale_uris
        self._open: dict[int, ByteSource] = {}
        self._scales: dict[int, ByteSource] = {}

    def __getitem__(self, shard: int) -> ByteSource:
        if shard not in self._open:
            self._open[shard] = open_source(self._uris[shard])
        return self._open[shard]

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
    sources[read.shard].readinto(read.offset, memoryview(raw.reshape(-1).view(np.uint8)))
    crcs.append((read.shard, read.tensor, read.offset, read.length, zlib.crc32(raw.reshape(-1).view(np.uint8))))
    scale = np.empty(read.scale.length // 4, dtype="<f4")
    sources.scale_file(read.scale.file).readinto(read.scale.offset, memoryview(scale.view(np.uint8)))
    # Scale files are receipted as shard -1-r so the driver checks their records' CRC-32 too (verify_crcs).
    crcs.append((-1 - read.scale.file, read.scale.key, read.scale.offset, read.scale.length,
                 zlib.crc32(scale.view(np.uint8))))
    name = sources.scale_name(read.scale.file)
    fp8.check_scales(scale, f"{name}: {read.scale.key}", read.rows[0])
    return fp8.dequantize(raw, scale)


def _read_into(read: Read, sources: Sources, crcs: list, out: np.ndarray | None = None) -> np.ndarray:
    if read.scale is not None:
        return _read_fp8(read, sources, crcs)
    buffer = np.empty(read.shape, dtype=mapping.BF16) if out is None else out
    raw = buffer.reshape(-1).view(np.uint8)
    sources[read.shard].readinto(read.offset, memoryview(raw))
    crcs.append((read.shard, read.tensor, read.offset, read.length, zlib.crc32(raw)))
    return buffer


def read_block(piece: Piece, sources: Sources, crcs: list) -> mapping.Block:
    """Rows [row0, row1) of G: one read, or the same rows of every shard side by side (mapping.SideBySide).

    Every range is read straight into its place: a multi-shard block is never concatenated, the transform
    places each shard's columns itself (or assembles them, for the transforms that keep rows as rows).
    """
    if len(piece.reads) == 1:
        block: mapping.Block = _read_into(piece.reads[0], sources, crcs)
    else:
        parts = np.empty((len(piece.reads), piece.row1 - piece.row0, piece.reads[0].shape[1]), dtype=mapping.BF16)
        if any(r.shape != parts.shape[1:] for r in piece.reads):
            raise SourceError(f"{piece.reads[0].tensor}: shards of different widths")
        for slot, read in zip(parts, piece.reads):
            part = _read_into(read, sources, crcs, out=slot)
            if part is not slot:  # FP8: dequantized into a new array
                slot[...] = part
        block = mapping.SideBySide(parts)
    whole = block.assemble() if piece.duplicates and isinstance(block, mapping.SideBySide) else block
    for dup in piece.duplicates:
        copy = _read_into(dup, sources, crcs)
        if not np.array_equal(copy.view(np.uint16), whole.view(np.uint16)):
            raise SourceError(
                f"{piece.reads[0].tensor}: the kv-head copy in shard {dup.shard:02d} differs from shard "
                f"{piece.reads[0].shard:02d}; shards that should repeat kv heads do not (wrong --model_path "
                "or corrupt shard)")
    return block


def _slices(region: tuple[tuple[int, int], ...]) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in region)


class _Writer:
    """Writes chunk-aligned regions into this unit's child databases, batched into transactions.

    Each OCDBT commit writes a data file, a b-tree node and a manifest (each fsynced), so committing
    every chunk on its own costs more kernel time than the data. Writes are staged in a transaction
    and committed once ``batch_bytes`` have accumulated; one batch commits while the next fills, so
    memory holds at most two batches of output arrays (tensorstore references them, never copies).
    The batch depends on the destination (:func:`rayconv.job.commit_batch_bytes`): each commit rewrites every
    written database's manifest, one object that Cloud Storage lets be rewritten about once a second.
    """

    def __init__(self, ctx: JobContext, unit: Unit, batch_bytes: int) -> None:
        self.ctx = ctx
        self.dbs = {kind: f"{unit.id}{secrets.token_hex(4)}" for kind in ctx.kinds}
        self._items = {kind: Location.parse(uri) for kind, uri in ctx.items.items()}
        self._stores: dict[tuple[str, tuple[str, ...]], ts.TensorStore] = {}
        self._databases: dict[str, ts.KvStore] = {}
        self._context = ts.Context({"data_copy_concurrency": {"limit": 2}, "file_io_concurrency": {"limit": 16}})
        self._batch_bytes = batch_bytes
        self._txn = ts.Transaction()
        self._staged: list[tuple[str, ts.Future]] = []
        self._staged_bytes = 0
        self._committing: ts.Future | None = None
        self.bytes_written = 0

    def _database(self, kind: str) -> ts.KvStore:
        """This unit's child database of one output, opened once (its arrays are prefixes of it)."""
        if kind not in self._databases:
            with output_errors(self._items[kind]):
                self._databases[kind] = ts.KvStore.open(ocdbt_kvstore(self._items[kind], self.dbs[kind]),
                                                        context=self._context).result()
        return self._databases[kind]

    def _store(self, kind: str, path: tuple[str, ...]) -> ts.TensorStore:
        key = (kind, path)
        if key not in self._stores:
            array = self.ctx.arrays[kind][path]
            kvstore = array_kvstore(self._database(kind), array)
            with output_errors(self._items[kind]):
                self._stores[key] = ts.open(array_schema(array, self.ctx.compression), kvstore=kvstore, open=True,
                                            assume_metadata=True, context=self._context).result()
        return self._stores[key]

    def write(self, kind: str, path: tuple[str, ...], region: tuple[slice, ...], array: np.ndarray) -> None:
        store = self._store(kind, path).with_transaction(self._txn)
        # The array is never modified afterwards, so tensorstore may write from it without a copy.
        self._staged.append((kind, store[region].write(array, can_reference_source_data_indefinitely=True)))
        self._staged_bytes += array.nbytes
        self.bytes_written += array.nbytes

    def _commit(self) -> None:
        for kind, future in self._staged:
            with output_errors(self._items[kind]):
                future.result()
        self._wait_commit()
        self._committing = self._txn.commit_async()
        self._txn, self._staged, self._staged_bytes = ts.Transaction(), [], 0

    def _wait_commit(self) -> None:
        if self._committing is not None:
            with output_errors(next(iter(self._items.values()))):
                self._committing.result()
            self._committing = None

    def piece_done(self) -> None:
        if self._staged_bytes >= self._batch_bytes:
            self._commit()

    def flush(self) -> None:
        """Commit everything staged and wait until it is durable."""
        if self._staged:
            self._commit()
        self._wait_commit()


def _scanned_region(region: tuple[slice, ...], layer: int) -> tuple[slice, ...]:
    return region[:1] + (slice(layer, layer + 1),) + region[1:]


def piece_outputs(ctx: JobContext, rule: Rule, piece: Piece, block: mapping.Block) -> Iterator[
        tuple[str, tuple[str, ...], tuple[slice, ...], np.ndarray]]:
    """Everything one block of G becomes: (output kind, leaf path, region, array) per destination.

    The single definition of what rayconv writes; ``run_unit`` writes it and ``rayconv verify``
    compares it with what is stored.
    """
    spec = ctx.spec
    tree = trees.get(ctx.layout)
    array = mapping.to_layer_block(rule, block, spec)
    region = _slices(block_region(rule, spec, piece.row0, piece.row1))
    for kind in ctx.kinds:
        if kind == "scanned":
            if rule.per_layer:
                yield (kind, leaf_paths(rule, 0, kind, tree), _scanned_region(region, piece.layer),
                       np.expand_dims(array, 1))
            else:
                yield kind, leaf_paths(rule, None, kind, tree), region, array
        elif kind == "unscanned" or not rule.quantized:
            yield kind, leaf_paths(rule, piece.layer, kind, tree), region, array
        else:
            bits = quantize.QUANT_TYPES[ctx.quantize_type][0]
            qvalue, scale = quantize.quantize(array, rule.contraction, bits)
            qpath, spath = aqt_paths(rule, piece.layer, tree)
            yield kind, qpath, region, qvalue
            scale_region = tuple(slice(0, 1) if axis in rule.contraction else s for axis, s in enumerate(region))
            yield kind, spath, scale_region, scale


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
    sources = Sources(ctx.shards, ctx.scale_files)
    writer = _Writer(ctx, unit, batch_bytes=ctx.batch_bytes)
    crcs: list = []
    bytes_read = 0
    for piece in unit.pieces:
        block = read_block(piece, sources, crcs)
        bytes_read += sum(r.length + (r.scale.length if r.scale else 0) for r in piece.reads)
        bytes_read += sum(r.length for r in piece.duplicates)
        for kind, path, region, array in piece_outputs(ctx, rules[piece.rule], piece, block):
            writer.write(kind, path, region, array)
        # Overlap: the next pieces are read and transformed while a full batch commits.
        writer.piece_done()
        del block
    writer.flush()
    return Receipt(unit=unit.id, dbs=writer.dbs, bytes_read=bytes_read, bytes_written=writer.bytes_written,
                   seconds=time.monotonic() - start, crcs=crcs, worker=f"{os.uname().nodename}:{os.getpid()}",
                   peak_rss=_peak_rss())
