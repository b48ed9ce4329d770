"""Turn finished units into an Orbax checkpoint: merge, describe, mark committed — in that order.

The commit protocol of one output (the driver records ``committing`` in the ledger before it and
``committed`` after it; docs/architecture.md draws the whole state machine):

1. ``merge``: into a *fresh* root OCDBT database (any root manifest and root data files of an
   interrupted attempt are deleted first), write each array's ``zarr.json`` (and the ``step``
   scalar) and graft every recorded child database, in one atomic tensorstore transaction — the
   merge Orbax's multi-host finalize performs, over exactly the databases the receipts name (each
   is checked to exist first: a missing one would silently become missing chunks);
2. ``metadata``: Orbax's JSON: ``_METADATA`` (tree metadata with the value types MaxText's own
   converter records), ``_sharding``, ``array_metadatas/process_0``, ``_CHECKPOINT_METADATA``;
3. ``item_marker``, ``step_marker``: ``commit_success.txt`` in the item directory, then in the step
   directory (bf16 outputs are CheckpointManager steps; int8 is a bare item);
4. ``rename``: on a local filesystem, rename the staging directory into place.

Until step 3 (GCS) or step 4 (local), nothing looks like a finished checkpoint to Orbax. Every step
is recognisable from storage, so :func:`commit_output` can be called again after a crash at any
instant: a final output carrying its last marker is checked (cheaply) and kept, never rebuilt or
deleted; a complete staging directory is only renamed; anything else is rebuilt from the child
databases, which no step modifies.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
from typing import Any, Iterable

import numpy as np
import tensorstore as ts

from rayconv import jsonio
from rayconv.leaves import ArraySpec
from rayconv.sink.places import DB_PREFIX, OutputPlace, array_spec, ocdbt_kvstore
from rayconv.errors import OutputError, one_line_reason
from rayconv.progress import LOG
from rayconv.storage import Location, output_errors

# Tree paths and Orbax's JSON depend on the MaxText layout: see rayconv.trees (OutputPlace.tree).
MARKER = "commit_success.txt"

#: The steps of a commit, in order ("intent" and "ledger" are the driver's). For tests,
#: ``RAYCONV_TEST_STOP_AFTER=<step>[:<kind>]`` ends the process (``os._exit``) right after a step —
#: a crash at that instant; ``RAYCONV_TEST_WAIT_AFTER`` pauses there until ``RAYCONV_TEST_WAIT_FILE``
#: exists. The driver also offers ``units:<n>`` (after the n-th receipt of this run is recorded).
STEPS = ("intent", "merge", "metadata", "item_marker", "step_marker", "rename", "ledger")
STOP_EXIT_CODE = 99


def _hook_matches(want: str, step: str, qualifier: str | None) -> bool:
    name, _, which = want.partition(":")
    return name == step and (not which or which == qualifier)


def stop_point(step: str, qualifier: str | None = None) -> None:
    """Test hook (no-op unless the RAYCONV_TEST_* variables are set)."""
    stop = os.environ.get("RAYCONV_TEST_STOP_AFTER")
    if stop and _hook_matches(stop, step, qualifier):
        os._exit(STOP_EXIT_CODE)
    wait = os.environ.get("RAYCONV_TEST_WAIT_AFTER")
    if wait and _hook_matches(wait, step, qualifier):
        release = os.environ["RAYCONV_TEST_WAIT_FILE"]
        with open(release + ".reached", "w"):
            pass
        while not os.path.exists(release):
            time.sleep(0.05)


def merge_databases(item: Location, arrays: list[ArraySpec], dbs: Iterable[str], *, with_step: bool,
                    compression: str | None) -> None:
    """Step 1: one atomic transaction on a fresh root database."""
    fresh_root(item)
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


def fresh_root(item: Location) -> None:
    """Remove the root database an interrupted merge may have left (its manifest and its own data
    files under ``d/``); the child databases under ``ocdbt.process_*/`` are left alone."""
    item.delete("manifest.ocdbt")
    item.join("d").delete_all()


def drop_unreferenced(item: Location, dbs: Iterable[str]) -> list[str]:
    """Delete the child databases no receipt names: attempts of a unit that was retried, or that was running
    when a run was killed. The root only references the named ones, so the rest is storage nobody reads (on
    GCS, where the output is built in place, it would stay in the final checkpoint). Runs after the merge and
    before the markers, so a complete output never holds any, and a rerun simply deletes what is left."""
    keep = {f"{DB_PREFIX}{db}" for db in dbs}
    stale = [name for name in item.list_folders() if name.startswith(DB_PREFIX) and name not in keep]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda name: item.join(name).delete_all(), stale))
    return stale


def missing_databases(item: Location, dbs: Iterable[str]) -> list[str]:
    """Child databases (named by receipts) whose manifest is not in ``item``."""
    dbs = list(dbs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        present = list(pool.map(lambda db: item.exists(f"{DB_PREFIX}{db}/manifest.ocdbt"), dbs))
    return [db for db, ok in zip(dbs, present) if not ok]


def marker_dir(place: OutputPlace, staging: bool) -> Location:
    """Where the *last* marker of an output goes: the step directory, or the item for a bare item."""
    # A step directory for bf16; for int8 the root *is* the item.
    return place.staging_root if staging else place.final_root


def is_complete(place: OutputPlace, staging: bool = False) -> bool:
    """The output carries its last ``commit_success.txt`` (what Orbax takes as finished)."""
    return marker_dir(place, staging).exists(MARKER)


def occupied(location: Location) -> bool:
    """Anything at all at ``location`` (locally also a plain file where a directory should be)."""
    if location.is_local:
        return os.path.lexists(location.path)
    return location.exists()


def check_committed(place: OutputPlace, arrays: list[ArraySpec]) -> Location:
    """A cheap check that a final output with its markers is the tree this conversion writes: the
    same ``_METADATA`` and a root database. (Its data is this conversion's when the ledger recorded
    ``committing`` for it: nothing else writes there while the lock is held.)"""
    item = place.item(staging=False)
    try:
        stored = jsonio.loads(item.read_bytes("_METADATA") or b"null")
    except jsonio.JSONError:
        stored = None
    expected = json.loads(json.dumps(place.tree.tree_metadata(place.kind, arrays)))
    if stored != expected:
        raise OutputError(f"{item.uri} carries {MARKER} but its _METADATA is not the tree this conversion writes "
                          "(another model or rayconv version?); rerun with --restart to replace it")
    if not item.exists("manifest.ocdbt"):
        raise OutputError(f"{item.uri} carries {MARKER} but has no manifest.ocdbt (damaged output); rerun with "
                          "--restart to rewrite it")
    return item


def _write_markers(place: OutputPlace, *, item_done: bool = False) -> None:
    item, final_item = place.item(staging=True), place.item(staging=False)
    if not item_done:
        item.write_bytes(MARKER, f"Checkpoint commit was successful to {final_item.uri}".encode())
        stop_point("item_marker", place.kind.name)
    if place.has_step:
        place.staging_root.write_bytes(MARKER, f"Checkpoint commit was successful to {place.final_root.uri}"
                                        .encode())
        stop_point("step_marker", place.kind.name)


def _build(place: OutputPlace, arrays: list[ArraySpec], dbs: list[str], *, compression: str | None,
           custom_metadata: dict[str, Any] | None, started_ns: int) -> None:
    """Steps 1-3 into the staging location (which is the final one on GCS)."""
    item = place.item(staging=True)
    kind = place.kind
    tree = place.tree
    with output_errors(item):
        missing = missing_databases(item, dbs)
        if missing:
            raise OutputError(f"{item.uri}/{DB_PREFIX}{missing[0]} is missing ({len(missing)} of the units' "
                              "databases are): rerun to redo those units")
        merge_databases(item, arrays, dbs, with_step=place.step_leaf, compression=compression)
        stale = drop_unreferenced(item, dbs)
        if stale:
            LOG.info("%s: removed %d database(s) of unit attempts no receipt names (retried or interrupted units)",
                     item.uri, len(stale))
    stop_point("merge", kind.name)
    item.write_bytes("_METADATA", json.dumps(tree.tree_metadata(kind, arrays)).encode())
    item.write_bytes("_sharding", json.dumps(tree.sharding_file(arrays)).encode())
    item.write_bytes("array_metadatas/process_0", json.dumps(tree.array_metadatas(arrays)).encode())
    if place.has_step:
        place.staging_root.write_bytes("_CHECKPOINT_METADATA", json.dumps(
            tree.checkpoint_metadata(kind, True, custom_metadata, started_ns)).encode())
    else:
        item.write_bytes("_CHECKPOINT_METADATA", json.dumps(
            tree.checkpoint_metadata(kind, False, custom_metadata, started_ns)).encode())
    stop_point("metadata", kind.name)
    _write_markers(place)


def commit_output(place: OutputPlace, arrays: list[ArraySpec], dbs: list[str], *, compression: str | None,
                  custom_metadata: dict[str, Any] | None, started_ns: int) -> Location:
    """Steps 1-4 for one output, resumed from whatever state storage shows; returns the final item
    location (what MaxText loads). Never deletes or rewrites an output that carries its last marker.

    ``custom_metadata`` None: what the tree layout's MaxText writer records (``place.tree``)."""
    if is_complete(place, staging=False):
        return check_committed(place, arrays)
    kwargs = {"compression": compression, "custom_metadata": custom_metadata, "started_ns": started_ns}
    if place.staging_root == place.final_root:  # GCS: built in place, the markers are the last writes
        if place.has_step and place.item(staging=True).exists(MARKER):
            check_committed(place, arrays)  # interrupted between the item marker and the step marker
            _write_markers(place, item_done=True)
        else:
            _build(place, arrays, dbs, **kwargs)
        return place.item(staging=False)
    # Local: built under the temporary name, then renamed into place (never over anything).
    if occupied(place.final_root):
        raise OutputError(f"{place.final_root.uri} exists but is not a checkpoint this conversion committed (no "
                          f"{MARKER}); move it away or rerun with --restart to replace it")
    if not is_complete(place, staging=True):
        _build(place, arrays, dbs, **kwargs)
    try:
        place.staging_root.rename(place.final_root)
    except OSError as exc:
        raise OutputError(f"cannot move {place.staging_root.uri} to {place.final_root.uri}: "
                          f"{one_line_reason(exc)}") from None
    stop_point("rename", place.kind.name)
    return place.item(staging=False)


def commit_or_error(*args: Any, **kwargs: Any) -> Location | OutputError:
    """:func:`commit_output`, with a user-facing failure returned instead of raised, so one output's
    failure (a full disk, an unwritable directory) does not hide that the others committed."""
    from rayconv.errors import ConversionError

    try:
        return commit_output(*args, **kwargs)
    except ConversionError as exc:
        return OutputError(str(exc))
