"""Turn finished units into an Orbax checkpoint: merge, describe, mark committed — in that order.

The commit protocol, in one place:

1. write each array's ``zarr.json`` (and the ``step`` scalar) into the root OCDBT database and
   graft every recorded child database into it, in one atomic tensorstore transaction — the same
   merge Orbax's multi-host finalize performs, but over exactly the databases the ledger names;
2. write Orbax's JSON: ``_METADATA`` (tree metadata with the value types MaxText's own converter
   records), ``_sharding``, ``array_metadatas/process_0``, ``_CHECKPOINT_METADATA``;
3. write ``commit_success.txt`` in the item directory, then in the step directory;
4. on a local filesystem, rename the staging directory into place.

Until step 3 (GCS) or step 4 (local), nothing looks like a finished checkpoint to Orbax.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import numpy as np
import tensorstore as ts

from rayconv import trees
from rayconv.plan import ArraySpec
from rayconv.sink.layout import OutputLayout, array_spec, ocdbt_kvstore
from rayconv.storage import Location, output_errors

# Tree paths and Orbax's JSON depend on the MaxText layout: see rayconv.trees (OutputLayout.tree).
PYTREE_HANDLER = trees.LEGACY_PYTREE_HANDLER  # kept for importers; the layouts name their handlers


def tree_metadata(kind: str, arrays: list[ArraySpec], tree: trees.TreeLayout = trees.LINEN) -> dict[str, Any]:
    """``_METADATA`` as Orbax 0.12 writes it for MaxText's trees (see :meth:`rayconv.trees.TreeLayout.tree_metadata`)."""
    return tree.tree_metadata(kind, arrays)


def merge_databases(item: Location, arrays: list[ArraySpec], dbs: Iterable[str], *, with_step: bool,
                    compression: str | None) -> None:
    """Step 1: one atomic transaction on the root database."""
    context = ts.Context({"file_io_concurrency": {"limit": 64}})
    txn = ts.Transaction(atomic=True)
    root = ts.KvStore.open(ocdbt_kvstore(item), context=context).result()
    futures = [ts.open(array_spec(item, a, None, compression), create=True, delete_existing=False,
                       context=context, transaction=txn) for a in arrays]
    for future in futures:
        future.result()
    if with_step:
        step_spec = {"driver": "zarr3", "kvstore": dict(ocdbt_kvstore(item), path="step/"),
                     "metadata": {"shape": [], "data_type": "int64", "fill_value": 0,
                                  "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": []}},
                                  "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]},
                     "store_data_equal_to_fill_value": True}
        step = ts.open(step_spec, create=True, context=context, transaction=txn).result()
        step.write(np.asarray(0, dtype=np.int64)).result()
    target = root.with_transaction(txn)
    for db in dbs:
        child = ts.KvStore.open(ocdbt_kvstore(item, db), context=context).result()
        child.experimental_copy_range_to(target).result()
    txn.commit_async().result()


def commit_output(layout: OutputLayout, arrays: list[ArraySpec], dbs: list[str], *, compression: str | None,
                  custom_metadata: dict[str, Any] | None, started_ns: int) -> Location:
    """Steps 1-4 for one output; returns the final item location (what MaxText loads).

    ``custom_metadata`` None: what the layout's MaxText writer records (``layout.tree``)."""
    item = layout.item(staging=True)
    kind = layout.kind
    tree = layout.tree
    with output_errors(item):
        merge_databases(item, arrays, dbs, with_step=layout.step_leaf, compression=compression)
    item.write_bytes("_METADATA", json.dumps(tree.tree_metadata(kind, arrays)).encode())
    item.write_bytes("_sharding", json.dumps(tree.sharding_file(arrays)).encode())
    item.write_bytes("array_metadatas/process_0", json.dumps(tree.array_metadatas(arrays)).encode())
    final_item = layout.item(staging=False)
    if layout.has_step:
        step = layout.staging_root
        step.write_bytes("_CHECKPOINT_METADATA", json.dumps(
            tree.checkpoint_metadata(kind, True, custom_metadata, started_ns)).encode())
        item.write_bytes("commit_success.txt", f"Checkpoint commit was successful to {final_item.uri}".encode())
        step.write_bytes("commit_success.txt", f"Checkpoint commit was successful to {layout.final_root.uri}".encode())
    else:
        item.write_bytes("_CHECKPOINT_METADATA", json.dumps(
            tree.checkpoint_metadata(kind, False, custom_metadata, started_ns)).encode())
        item.write_bytes("commit_success.txt", f"Checkpoint commit was successful to {final_item.uri}".encode())
    if layout.staging_root != layout.final_root:
        if layout.final_root.exists():
            layout.final_root.delete_all()
        layout.staging_root.rename(layout.final_root)
    return final_item
