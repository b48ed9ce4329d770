"""A unit's writer: chunk-aligned regions into the unit's own child OCDBT databases, one per output.

Idempotence: a unit writes into fresh child databases named after the unit and a random attempt tag, and the
receipt names them (:meth:`OcdbtWriter.written`). Only databases named by a recorded receipt are merged at commit
(rayconv.sink.commit), so a retried or duplicated attempt can never mix partial chunks into the output.
"""

from __future__ import annotations

import secrets

import numpy as np
import tensorstore as ts

from rayconv.plan import Unit
from rayconv.receipts import JobContext
from rayconv.sink.places import array_kvstore, array_schema, ocdbt_kvstore
from rayconv.storage import Location, output_errors
from rayconv.trees import Kind


class OcdbtWriter:
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
        self.dbs = {kind: f"{unit.id}{secrets.token_hex(4)}" for kind in ctx.kinds}  # fresh per attempt
        self._items = {kind: Location.parse(uri) for kind, uri in ctx.items.items()}
        self._stores: dict[tuple[Kind, tuple[str, ...]], ts.TensorStore] = {}
        self._databases: dict[Kind, ts.KvStore] = {}
        self._context = ts.Context({"data_copy_concurrency": {"limit": 2}, "file_io_concurrency": {"limit": 16}})
        self._batch_bytes = batch_bytes
        self._txn = ts.Transaction()
        self._staged: list[tuple[Kind, ts.Future]] = []
        self._staged_bytes = 0
        self._committing: ts.Future | None = None
        self.bytes_written = 0

    def _database(self, kind: Kind) -> ts.KvStore:
        """This unit's child database of one output, opened once (its arrays are prefixes of it)."""
        if kind not in self._databases:
            with output_errors(self._items[kind]):
                self._databases[kind] = ts.KvStore.open(ocdbt_kvstore(self._items[kind], self.dbs[kind]),
                                                        context=self._context).result()
        return self._databases[kind]

    def _store(self, kind: Kind, path: tuple[str, ...]) -> ts.TensorStore:
        key = (kind, path)
        if key not in self._stores:
            array = self.ctx.arrays[kind][path]
            kvstore = array_kvstore(self._database(kind), array)
            with output_errors(self._items[kind]):
                self._stores[key] = ts.open(array_schema(array, self.ctx.compression), kvstore=kvstore, open=True,
                                            assume_metadata=True, context=self._context).result()
        return self._stores[key]

    def write(self, kind: Kind, path: tuple[str, ...], region: tuple[slice, ...], array: np.ndarray) -> None:
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

    def written(self) -> dict[str, str]:
        """What the receipt carries: output name → this unit's child database id (what the commit merges)."""
        return {kind.name: db for kind, db in self.dbs.items()}
