"""Where an output lives (staging, final, items), and the tensorstore specs of its arrays.

Which output goes where is the MaxText target's (:mod:`rayconv.targets.maxtext`, from each kind's directory);
the three outputs use the directories MaxText and JetStream read:

* ``<out>/bf16/scanned/0/items`` and ``<out>/bf16/unscanned/checkpoints/0/items``: an Orbax
  CheckpointManager step (``_CHECKPOINT_METADATA`` + ``commit_success.txt`` in the step dir, the
  PyTree item in ``items/``);
* ``<out>/int8`` (or ``<out>/int8w``, ``<out>/int4w``): a bare PyTreeCheckpointer directory, as
  ``load_and_quantize_checkpoint`` saves it.

Each item is an OCDBT database of zarr3 arrays keyed by the dotted tree path (``params.params.decoder…/``
in the ``linen`` layout, ``decoder.layers_0….kernel.value/`` in ``nnx``; :mod:`rayconv.trees` decides). The
directory structure is the same in both tree layouts: MaxText 0.2.5 also saves bf16 outputs as CheckpointManager
steps and int8 as a bare PyTreeCheckpointer directory. Workers write
chunks into their own child databases (``items/ocdbt.process_<db>/``); the committer merges them
into the root database, as Orbax's own multi-host finalize does.

On a local filesystem an unfinished output lives under Orbax's temporary name
(``0.orbax-checkpoint-tmp-rayconv``) and is renamed into place when complete, so a crashed run never
leaves a directory that CheckpointManager would list as a step. GCS has no rename: there the item
is written in place and ``commit_success.txt`` (which Orbax requires on GCS) is written last.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import tensorstore as ts

from rayconv import trees
from rayconv.leaves import ArraySpec
from rayconv.storage import Location

#: Directory prefix of a unit's child database under an item (Orbax names its per-process ones the same way).
DB_PREFIX = "ocdbt.process_"

TMP_SUFFIX = ".orbax-checkpoint-tmp-rayconv"

#: Orbax's OCDBT settings (``tensorstore_utils.add_ocdbt_write_options``); children and root share them.
OCDBT_CONFIG: dict[str, Any] = {
    "max_inline_value_bytes": 1024,
    "max_decoded_node_bytes": 100_000_000,
    "manifest_kind": "single",
}


@dataclasses.dataclass(frozen=True)
class OutputPlace:
    """Final and staging locations of one output (``kind``: an output kind of the MaxText target)."""

    kind: trees.Kind
    final_root: Location  # the directory MaxText users point at, minus "/items"
    has_step: bool  # CheckpointManager step dir (bf16) or bare item dir (AQT): the kind's
    tree: trees.TreeLayout = trees.LINEN  # paths and Orbax metadata of the tree inside

    @property
    def step_leaf(self) -> bool:
        """Whether the tree holds the ``step`` scalar (a TrainState), not whether there is a step directory."""
        return self.tree.has_step_leaf(self.kind)

    @property
    def staging_root(self) -> Location:
        if not self.final_root.is_local:
            return self.final_root
        return self.final_root.parent.join(self.final_root.name + TMP_SUFFIX)

    @property
    def step_dir(self) -> Location:
        """The directory that appears atomically (local) or gets the last marker (GCS)."""
        return self.final_root

    def item(self, staging: bool = True) -> Location:
        root = self.staging_root if staging else self.final_root
        return root.join("items") if self.has_step else root

    @property
    def items_path(self) -> Location:
        """What users pass as ``load_parameters_path``."""
        return self.item(staging=False)


def ocdbt_kvstore(item: Location, db: str | None = None) -> dict[str, Any]:
    base = item.join(f"{DB_PREFIX}{db}") if db else item
    return {"driver": "ocdbt", "base": base.kvstore_spec(), "config": OCDBT_CONFIG}


_ZARR_DTYPES = {"bfloat16": "bfloat16", "int8": "int8", "int4": "int4", "int64": "int64"}


def zarr3_metadata(array: ArraySpec, compression: str | None = None) -> dict[str, Any]:
    codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compression == "zstd":
        codecs.append({"name": "zstd", "configuration": {"level": 1, "checksum": False}})
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(array.shape),
        "data_type": _ZARR_DTYPES[array.dtype],
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(array.chunks)}},
        "chunk_key_encoding": {"name": "default"},
        "fill_value": 0,
        "codecs": codecs,
    }


def array_spec(item: Location, array: ArraySpec, db: str | None, compression: str | None) -> dict[str, Any]:
    kvstore = dict(ocdbt_kvstore(item, db), path=array.param_name + "/")
    return dict(_zarr3_spec(array, compression), kvstore=kvstore)


def _zarr3_spec(array: ArraySpec, compression: str | None) -> dict[str, Any]:
    # Orbax stores chunks equal to the fill value (its _METADATA says so) and restores with no fill for
    # missing chunks: an all-zero chunk (or the step scalar 0) must still be written.
    return {"driver": "zarr3", "metadata": zarr3_metadata(array, compression), "store_data_equal_to_fill_value": True}


@functools.lru_cache(maxsize=8192)
def array_schema(array: ArraySpec, compression: str | None) -> ts.Spec:
    """:func:`array_spec` without its kvstore, parsed once per array and process.

    A worker opens every array it writes once per unit (each unit writes its own child databases), thousands
    of times in a job; parsing the JSON spec each time cost most of that. Opened with ``kvstore=`` the unit's
    database (:func:`array_kvstore`) it is the same store as :func:`array_spec` describes.
    """
    return ts.Spec(_zarr3_spec(array, compression))


def array_kvstore(database: ts.KvStore, array: ArraySpec) -> ts.KvStore:
    """The array's prefix in an opened OCDBT database (the kvstore of :func:`array_spec`)."""
    return database / (array.param_name + "/")
