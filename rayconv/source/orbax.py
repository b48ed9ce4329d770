"""A MaxText Orbax checkpoint as a source: its tree from metadata alone, any region of any leaf on demand.

An *items* directory (``…/0/items``, what MaxText's ``load_parameters_path`` takes; local or gs://) holds Orbax's
``_METADATA`` (the tree: every leaf's key path and value type) and one OCDBT database of zarr arrays named by the
dotted key path. :func:`open_checkpoint` reads ``_METADATA`` (bounded, :mod:`rayconv.jsonio`) and each model
leaf's ``zarr.json`` inside the database — a few KB per leaf, no tensor bytes — and classifies the tree:

* **tree**: ``linen`` — ``params/params/decoder/…`` (MaxText's converters, 0.2.4, and 0.2.5's trainer, which saves
  in the Linen on-disk layout) — or ``nnx`` — ``decoder/…/kernel/value`` (0.2.5's param-only checkpoints);
* **scanned** — ``decoder/layers/…`` with the layer axis at position 1 (``param_scan_axis``) — or unscanned —
  ``decoder/layers_{i}/…``;
* **training** — a trainer's checkpoint also holds the optimizer state (``opt_state/…``, e.g. Adam's ``mu``/``nu``
  mirrors of the params) and ``step``: only the params are exported, the rest is listed in ``ignored``.

Leaves are keyed by their *model path*: the tree path without the ``params/params`` wrapper or the trailing NNX
``value`` (``decoder/layers_0/mlp/wi_0/kernel``), the same in both trees. :meth:`MaxTextCheckpoint.read` reads one
region of a leaf through tensorstore (OCDBT + zarr), i.e. only the chunks the region touches, every request bounded
by the storage timeout (:func:`rayconv.storage.bounded`). Anything that is not such a checkpoint — no
``_METADATA``, hostile JSON, a quantized (AQT) tree, a leaf the metadata promises but the database lacks, a
``zarr.json`` whose chunks exceed its array — is one :class:`~rayconv.errors.SourceError` line naming the directory;
so is a read that finds a chunk missing (where ``_METADATA`` says Orbax stored every chunk, its restore refuses
one missing too, rather than reading zeros) or not decoding as its ``zarr.json`` says, naming the chunk's key.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from typing import Any

import ml_dtypes
import numpy as np
import tensorstore as ts

from rayconv import jsonio
from rayconv.errors import ConversionError, SourceError
from rayconv.process_local import per_process
from rayconv.storage import Location, bounded, open_kvstore

#: Far above a 405B training checkpoint's ``_METADATA`` (~2 MB); a larger one is refused unread.
MAX_METADATA_BYTES = 64 << 20
MAX_ZARR_JSON_BYTES = 1 << 20
#: The OCDBT database's root (Orbax's single-file manifest): without it the database reads as empty.
MANIFEST = "manifest.ocdbt"
#: Tree roots that hold a trainer's state besides the params (measured on maxtext 0.2.5's train.py: ``step``, the
#: optimizer's ``opt_state/0/{mu,nu}/params/…`` and ``count``s, the NNX model's RNG state ``nnx_aux/…/rngs/…``): never
#: exported. Optimizer state is what makes a checkpoint a *training* one.
TRAINER_ROOTS = frozenset({"opt_state", "optimizer", "step", "nnx_aux"})
OPTIMIZER_ROOTS = frozenset({"opt_state", "optimizer"})
_ARRAY_TYPES = frozenset({"jax.Array", "np.ndarray"})
_LAYER = re.compile(r"layers_(\d+)")
_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32),
           "float16": np.dtype(np.float16), "float64": np.dtype(np.float64), "int8": np.dtype(np.int8),
           "int32": np.dtype(np.int32), "int64": np.dtype(np.int64)}

#: Per process: opened arrays, keyed by (database spec, param name); tensorstore handles do not survive a fork.
_arrays = per_process(lambda: ({}, threading.Lock()))
#: tensorstore's ``in OCDBT database at local file "/…/items/"``: the directory each message names already.
_DATABASE_AT = re.compile(r' in OCDBT database at [^"]*"[^"]*"')
#: tensorstore's ``[source locations='…']`` / ``[os_error_code=…]`` suffixes.
_STATUS_SUFFIX = re.compile(r" \[[a-z_ ]+=.*$")


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One stored array: its model path, the Orbax tree path and param name it is stored under, shape, dtype."""

    name: str  # model path, "decoder/layers_0/mlp/wi_0/kernel"
    tree_path: tuple[str, ...]
    param_name: str  # the OCDBT key prefix: the tree path joined with "."
    shape: tuple[int, ...]
    dtype: str  # numpy name: "bfloat16", "float32", …
    chunks: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class MaxTextCheckpoint:
    """A MaxText items directory, classified; picklable (no tensorstore handles), so workers can get it."""

    location: Location
    tree: str  # "linen" | "nnx"
    scanned: bool
    training: bool
    n_layers: int
    leaves: dict[str, Leaf]  # model path → leaf (params only)
    ignored: tuple[str, ...]  # arrays not exported (optimizer state), as "/"-joined tree paths
    #: ``_METADATA``'s ``store_array_data_equal_to_fill_value``: Orbax wrote every chunk, even all-zero ones, so a
    #: missing chunk is damage, not zeros (Orbax's restore raises on it then; else it reads the fill value).
    every_chunk_stored: bool = False

    def describe(self) -> str:
        """What the tree is, for the log: ``linen checkpoint, layers stacked (training: params only)``."""
        form = "layers stacked (scan_layers)" if self.scanned else "one subtree per layer"
        return f"{self.tree} checkpoint, {form}" + (" (training: params only)" if self.training else "")

    def _database(self) -> dict[str, Any]:
        return {"driver": "ocdbt", "base": self.location.kvstore_spec()}

    def _array(self, leaf: Leaf) -> ts.TensorStore:
        stores, lock = _arrays()
        key = (json.dumps(self._database(), sort_keys=True), leaf.param_name)
        with lock:
            store = stores.get(key)
        if store is None:
            database = open_kvstore(self._database(), SourceError)
            try:
                store = bounded(ts.open({"driver": "zarr3", "fill_missing_data_reads": not self.every_chunk_stored},
                                        kvstore=database / (leaf.param_name + "/"), open=True, read=True),
                                self.location.kvstore_spec(), SourceError)
            except ValueError as exc:
                raise SourceError(f"{self.location.uri}: cannot open {leaf.name}: {_read_error(exc)}") from None
            with lock:
                stores[key] = store
        return store

    def read(self, name: str, region: tuple[slice, ...] | None = None) -> np.ndarray:
        """Leaf ``name`` (a model path), or the ``region`` of it (one slice per axis, steps of 1): only the chunks
        the region touches are read."""
        leaf = self.leaves.get(name)
        if leaf is None:
            raise SourceError(f"{self.location.uri} has no leaf {name}")
        store = self._array(leaf)
        view = store if region is None else store[region]
        try:
            value = bounded(view.read(), self.location.kvstore_spec(), SourceError)
        except ValueError as exc:
            raise SourceError(f"{self.location.uri}: cannot read {name}: {_read_error(exc)}") from None
        return np.asarray(value)


def _read_error(exc: BaseException) -> str:
    """Why tensorstore could not read from the checkpoint, on one line, naming the key or file that failed.

    :func:`~rayconv.errors.one_line_reason` keeps the innermost cause, right for a full disk but, for a chunk that
    does not decode as its ``zarr.json`` says, a bare ``16384; at byte 16384``, and it cuts ``Byte range [0, 3512)
    of local file "…/d/…"`` at its bracket. Here the whole sentence is kept, less the database's location.
    """
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = _STATUS_SUFFIX.sub("", " ".join(lines[0].split())) if lines else type(exc).__name__
    status, _, rest = text.partition(": ")
    if status.isupper() and status.replace("_", "").isalpha() and rest:
        text = f"{_DATABASE_AT.sub('', rest)} ({status})"
    return text if len(text) <= 400 else text[:397] + "..."


def _tree_entries(metadata: dict[str, Any], where: str) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """[(tree path, value_metadata)] of ``_METADATA``, validated."""
    tree = metadata.get("tree_metadata")
    if not isinstance(tree, dict) or not tree:
        raise SourceError(f"{where}/_METADATA has no tree_metadata: not an Orbax PyTree checkpoint")
    entries = []
    for entry in tree.values():
        keys = entry.get("key_metadata") if isinstance(entry, dict) else None
        value = entry.get("value_metadata") if isinstance(entry, dict) else None
        if not (isinstance(keys, list) and keys and isinstance(value, dict)
                and all(isinstance(k, dict) and isinstance(k.get("key"), (str, int)) for k in keys)):
            raise SourceError(f"{where}/_METADATA has a malformed tree entry (key_metadata / value_metadata)")
        path = tuple(str(k["key"]) for k in keys)
        if any(not part or "." in part or "/" in part for part in path):
            raise SourceError(f"{where}/_METADATA has a tree key rayconv cannot address: {'/'.join(path)[:200]!r}")
        entries.append((path, value))
    return entries


def _classify(paths: list[tuple[str, ...]], where: str) -> tuple[str, dict[str, tuple[str, ...]], list[str]]:
    """(tree, {model path: tree path}, ignored) for the array paths of a checkpoint."""
    model: dict[str, tuple[str, ...]] = {}
    ignored: list[str] = []
    linen = any(p[:2] == ("params", "params") for p in paths)
    if any(p[:2] == ("params", "aqt") or "AqtDotGeneral_0" in p for p in paths):
        raise SourceError(f"{where} is a quantized (AQT) checkpoint; export reads bf16 or float32 params")
    for path in paths:
        if path[0] in TRAINER_ROOTS:
            ignored.append("/".join(path))
        elif linen and path[:2] == ("params", "params"):
            model["/".join(path[2:])] = path
        elif not linen and path[-1] == "value":
            model["/".join(path[:-1])] = path
        else:
            raise SourceError(f"{where}: leaf {'/'.join(path)} belongs to no MaxText tree rayconv knows "
                              "(params/params/… or …/value)")
    if not any(name.startswith(("decoder/", "token_embedder/")) for name in model):
        raise SourceError(f"{where} holds no MaxText decoder or token embedding: not a MaxText model checkpoint")
    return ("linen" if linen else "nnx"), model, ignored


def _layers(leaves: dict[str, Leaf], where: str) -> tuple[bool, int]:
    """(scanned, number of layers), checked: one form only, layers_0…n−1 complete, one layer axis size."""
    stacked = [leaf for name, leaf in leaves.items() if name.startswith("decoder/layers/")]
    numbered = set()
    for name in leaves:
        parts = name.split("/")
        match = _LAYER.fullmatch(parts[1]) if len(parts) > 2 and parts[0] == "decoder" else None
        if match:
            numbered.add(int(match.group(1)))
    if stacked and numbered:
        raise SourceError(f"{where} holds both decoder/layers (scanned) and decoder/layers_{{i}} (unscanned) leaves")
    if stacked:
        sizes = {leaf.shape[1] if len(leaf.shape) > 1 else None for leaf in stacked}
        if len(sizes) != 1 or None in sizes:
            raise SourceError(f"{where}: scanned leaves disagree on the layer axis (axis 1): sizes {sorted(map(str, sizes))}")
        return True, sizes.pop()
    if numbered and numbered != set(range(len(numbered))):
        raise SourceError(f"{where}: decoder layers {sorted(numbered)[:8]} are not layers_0…layers_{len(numbered) - 1}")
    return False, len(numbered)


def _zarr_leaf(database: ts.KvStore, location: Location, name: str, path: tuple[str, ...]) -> Leaf:
    where, param = location.uri, ".".join(path)
    try:
        result = bounded(database.read(f"{param}/zarr.json"), location.kvstore_spec(), SourceError)
    except ValueError as exc:  # a damaged database (manifest, b-tree node)
        raise SourceError(f"{where}: cannot read {param}/zarr.json: {_read_error(exc)}") from None
    if result.state != "value":
        if location.size(MANIFEST) is None:  # an empty database, not one missing array: say which file is gone
            raise SourceError(f"{where} has no {MANIFEST}: the OCDBT database holding its arrays is missing (an "
                              "incomplete copy?)")
        raise SourceError(f"{where}: leaf {name} is in _METADATA but its array {param} is missing")
    if len(result.value) > MAX_ZARR_JSON_BYTES:
        raise SourceError(f"{where}: {param}/zarr.json is {len(result.value)} bytes (not an array's metadata)")
    try:
        meta = jsonio.loads_object(bytes(result.value))
    except jsonio.JSONError as exc:
        raise SourceError(f"{where}: {param}/zarr.json: {exc}") from None
    shape, dtype = meta.get("shape"), meta.get("data_type")
    grid = meta.get("chunk_grid", {}).get("configuration", {}) if isinstance(meta.get("chunk_grid"), dict) else {}
    chunks = grid.get("chunk_shape") if isinstance(grid, dict) else None
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape) and dtype in _DTYPES
            and isinstance(chunks, list) and len(chunks) == len(shape) and all(type(n) is int and n > 0 for n in chunks)):
        raise SourceError(f"{where}: {param}/zarr.json is not a zarr3 array rayconv reads (shape {shape!r}, "
                          f"data_type {dtype!r})")
    if any(c > max(n, 1) for c, n in zip(chunks, shape)):
        # Orbax's chunks are at most the array (its write_shape); a larger one is decoded whole, and a chunk of
        # 2**40 rows aborts the process in tensorstore's allocation instead of failing.
        raise SourceError(f"{where}: {param}/zarr.json: chunk_shape {chunks} exceeds the array's shape {shape} "
                          "(not a chunking Orbax writes: a damaged zarr.json)")
    return Leaf(name, path, param, tuple(shape), dtype, tuple(chunks))


def open_checkpoint(uri: str | Location) -> MaxTextCheckpoint:
    """Open and classify a MaxText items directory (or the step directory holding ``items/``)."""
    try:
        location = uri if isinstance(uri, Location) else Location.parse(str(uri))
    except ConversionError as exc:
        raise SourceError(str(exc)) from None
    if location.size("_METADATA") is None and location.join("items").size("_METADATA") is not None:
        location = location.join("items")
    where = location.uri
    size = location.size("_METADATA")
    if size is None:
        raise SourceError(f"{where} has no _METADATA: not an Orbax checkpoint (pass MaxText's …/items directory)")
    if size > MAX_METADATA_BYTES:
        raise SourceError(f"{where}/_METADATA is {size} bytes (at most {MAX_METADATA_BYTES}): not a MaxText tree")
    try:
        metadata = jsonio.loads_object(location.read_bytes("_METADATA") or b"", max_bytes=MAX_METADATA_BYTES)
    except jsonio.JSONError as exc:
        raise SourceError(f"{where}/_METADATA: {exc}") from None
    if metadata.get("use_ocdbt") is not True or metadata.get("use_zarr3") is not True:
        raise SourceError(f"{where}/_METADATA does not say use_ocdbt and use_zarr3 (MaxText's format); rayconv reads "
                          "only OCDBT + zarr3 checkpoints")
    arrays = [path for path, value in _tree_entries(metadata, where)
              if value.get("value_type") in _ARRAY_TYPES and not value.get("skip_deserialize")]
    tree, model, ignored = _classify(arrays, where)
    try:
        database = open_kvstore({"driver": "ocdbt", "base": location.kvstore_spec()}, SourceError)
    except ValueError as exc:
        raise SourceError(f"{where}: cannot open its OCDBT database: {_read_error(exc)}") from None
    leaves = {name: _zarr_leaf(database, location, name, path) for name, path in sorted(model.items())}
    scanned, n_layers = _layers(leaves, where)
    training = any(path.split("/")[0] in OPTIMIZER_ROOTS for path in ignored)
    return MaxTextCheckpoint(location, tree, scanned, training, n_layers, leaves, tuple(sorted(ignored)),
                             metadata.get("store_array_data_equal_to_fill_value") is True)
