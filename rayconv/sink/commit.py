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

import base64
import json
import time
from typing import Any, Iterable

import numpy as np
import tensorstore as ts

from rayconv.plan import ArraySpec
from rayconv.sink.layout import OutputLayout, array_spec, ocdbt_kvstore
from rayconv.storage import Location, output_errors

PYTREE_HANDLER = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"
_SINGLE_DEVICE = json.dumps({"sharding_type": "SingleDeviceSharding", "device_str": "cpu:0"})


def _key_metadata(path: tuple[str, ...], sequence_keys: Iterable[int] = ()) -> list[dict[str, Any]]:
    sequence = set(sequence_keys)
    return [{"key": part, "key_type": 1 if i in sequence else 2} for i, part in enumerate(path)]


def _entry(path: tuple[str, ...], value: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    # Orbax keys tree_metadata by the repr of the key tuple; list indices ("scale", "0") are sequence keys.
    seq = [i for i, part in enumerate(path) if part.isdigit() and i > 0 and path[i - 1] == "scale"]
    return repr(path), {"key_metadata": _key_metadata(path, seq), "value_metadata": value}


def _empty_kernel_paths(arrays: list[ArraySpec]) -> list[tuple[str, ...]]:
    """int8: quantized kernels are replaced by empty dicts under params/params (MaxText's tree)."""
    paths = []
    for array in arrays:
        if array.path[:2] == ("params", "aqt") and array.path[-1] == "qvalue":
            module = array.path[2:-4]  # strip AqtDotGeneral_0/qrhs/frozen/qvalue
            paths.append(("params", "params") + module + ("kernel",))
    return paths


def tree_metadata(kind: str, arrays: list[ArraySpec]) -> dict[str, Any]:
    """``_METADATA`` as Orbax 0.12 writes it for MaxText's trees."""
    entries: dict[str, Any] = {}
    if kind != "int8":
        entries.update([_entry(("step",), {"value_type": "scalar", "skip_deserialize": False})])
    for array in arrays:
        entries.update([_entry(array.path, {"value_type": "jax.Array", "skip_deserialize": False,
                                            "write_shape": list(array.chunks)})])
        if array.path[-1] == "qvalue":
            frozen = array.path[:-1]
            entries.update([
                _entry(frozen + ("sparsity_mask",), {"value_type": "None", "skip_deserialize": True}),
                _entry(frozen + ("scale_t",), {"value_type": "None", "skip_deserialize": True}),
                _entry(frozen + ("bias",), {"value_type": "List", "skip_deserialize": True}),
            ])
    for path in _empty_kernel_paths(arrays):
        entries.update([_entry(path, {"value_type": "Dict", "skip_deserialize": True})])
    if kind != "int8":
        entries.update([_entry(("opt_state",), {"value_type": "Dict", "skip_deserialize": True})])
    return {
        "tree_metadata": entries,
        "use_ocdbt": True,
        "use_zarr3": True,
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": None,
    }


def _sharding_file(arrays: list[ArraySpec]) -> dict[str, str]:
    return {base64.urlsafe_b64encode(a.param_name.encode()).decode(): _SINGLE_DEVICE for a in arrays}


def _array_metadatas(arrays: list[ArraySpec]) -> dict[str, Any]:
    return {"array_metadatas": [
        {"array_metadata": {"param_name": a.param_name, "write_shape": list(a.chunks), "chunk_shape": list(a.chunks),
                            "ext_metadata": None}} for a in arrays]}


def _checkpoint_metadata(item_handlers: Any, custom: dict[str, Any], started_ns: int) -> dict[str, Any]:
    return {"item_handlers": item_handlers, "metrics": {}, "performance_metrics": {},
            "init_timestamp_nsecs": started_ns, "commit_timestamp_nsecs": time.time_ns(), "custom_metadata": custom}


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
                  custom_metadata: dict[str, Any], started_ns: int) -> Location:
    """Steps 1-4 for one output; returns the final item location (what MaxText loads)."""
    item = layout.item(staging=True)
    kind = layout.kind
    with output_errors(item):
        merge_databases(item, arrays, dbs, with_step=layout.has_step, compression=compression)
    item.write_bytes("_METADATA", json.dumps(tree_metadata(kind, arrays)).encode())
    item.write_bytes("_sharding", json.dumps(_sharding_file(arrays)).encode())
    item.write_bytes("array_metadatas/process_0", json.dumps(_array_metadatas(arrays)).encode())
    final_item = layout.item(staging=False)
    if layout.has_step:
        step = layout.staging_root
        step.write_bytes("_CHECKPOINT_METADATA", json.dumps(
            _checkpoint_metadata({"items": PYTREE_HANDLER}, custom_metadata, started_ns)).encode())
        item.write_bytes("commit_success.txt", f"Checkpoint commit was successful to {final_item.uri}".encode())
        step.write_bytes("commit_success.txt", f"Checkpoint commit was successful to {layout.final_root.uri}".encode())
    else:
        item.write_bytes("_CHECKPOINT_METADATA", json.dumps(
            _checkpoint_metadata(PYTREE_HANDLER, custom_metadata, started_ns)).encode())
        item.write_bytes("commit_success.txt", f"Checkpoint commit was successful to {final_item.uri}".encode())
    if layout.staging_root != layout.final_root:
        if layout.final_root.exists():
            layout.final_root.delete_all()
        layout.staging_root.rename(layout.final_root)
    return final_item
