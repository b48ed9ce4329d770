"""The checkpoint *tree layouts*: which tree paths and which Orbax metadata each MaxText generation reads.

rayconv computes the same numbers for every layout; a layout only decides where a leaf sits in the
PyTree and what Orbax's JSON files around it say. Three layouts exist, one object each:

* ``linen`` (:data:`LINEN`) — MaxText 0.2.4 with its NNX switches off, the trees JetStream-MaxText and the GKE
  tutorial use: ``params/params/…`` plus ``step``/``opt_state`` (bf16), and the classic AQT tree
  ``params/aqt/…/AqtDotGeneral_0/qrhs/frozen/{qvalue,scale/0}`` with the quantized kernels left as ``{}``
  under ``params/params`` (int8); Orbax's legacy ``PyTreeCheckpointHandler`` everywhere.
* ``nnx`` (:data:`NNX`) — what MaxText 0.2.5 writes with default flags (it has no Linen path):
  ``llama_or_mistral_ckpt`` still writes the classic scanned tree, but through Orbax's v1 Checkpointer (its
  ``PyTreeHandler`` in ``_CHECKPOINT_METADATA``); ``generate_param_only_checkpoint`` writes an NNX decode tree —
  no ``params`` wrapper, no ``step``/``opt_state``, every leaf under a trailing ``value`` key
  (``decoder/layers_0/mlp/wi_0/kernel/value``); ``layerwise_quantization`` writes the NNX int8 tree
  ``decoder/layers_0/mlp/wi_0/AqtDotGeneral_0/qrhs/frozen/value/{qvalue,scale/0,…}`` with the quantized kernels
  dropped (legacy handler, bare directory). MaxText 0.2.5 records ``custom_metadata {}`` for all three, so
  serving the unscanned tree needs ``scan_layers=false`` on its command line (as for 0.2.5's own output).
* ``to_maxtext`` (:data:`TO_MAXTEXT`) — what MaxText 0.2.5's ``to_maxtext.py`` writes from Hugging Face files
  (the default for the families it converts, e.g. Qwen3): the classic ``params/params`` TrainState tree for both
  bf16 outputs, the v1 ``PyTreeHandler``, ``custom_metadata {"scan_layers": …}``.

Adding a layout is adding one :class:`TreeLayout` to :data:`LAYOUTS`. This module does no I/O: the plan asks
it for paths, the sink for the JSON it writes, ``rayconv verify`` for what a tree must hold.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from typing import TYPE_CHECKING, Any, Iterable, Protocol, Sequence

from rayconv.errors import SpecError

if TYPE_CHECKING:
    from rayconv.mapping import Rule
    from rayconv.leaves import ArraySpec

Path = tuple[str, ...]


class Kind(Protocol):
    """What a tree layout asks of an output kind (the MaxText target's kinds: rayconv.targets.maxtext_kinds)."""

    @property
    def name(self) -> str: ...

    @property
    def scanned(self) -> bool: ...

    @property
    def quantized(self) -> bool: ...

#: Orbax's legacy (v0) handler: MaxText 0.2.4's CheckpointManager and every PyTreeCheckpointer save.
LEGACY_PYTREE_HANDLER = "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler"
#: Orbax's v1 handler, as MaxText 0.2.5's ``ocp.training.Checkpointer`` records it (orbax-checkpoint 0.12.8).
V1_PYTREE_HANDLER = "orbax.checkpoint.experimental.v1._src.handlers.pytree_handler.PyTreeHandler"
_SINGLE_DEVICE = json.dumps({"sharding_type": "SingleDeviceSharding", "device_str": "cpu:0"})

#: The QTensor fields Orbax records besides the two arrays (aqtp 0.9.0): metadata-only, never restored.
_FROZEN_PLACEHOLDERS: tuple[tuple[str, str], ...] = (("sparsity_mask", "None"), ("scale_t", "None"), ("bias", "List"))


def _layer_target(rule: "Rule", layer: int | None, scanned: bool) -> Path:
    """The rule's MaxText path under the model root: ``layers`` (scanned) or ``layers_{i}``."""
    if layer is None or scanned:
        return rule.target
    return tuple(f"layers_{layer}" if part == "layers" else part for part in rule.target)


def _key_metadata(path: Path, sequence_keys: Iterable[int] = ()) -> list[dict[str, Any]]:
    sequence = set(sequence_keys)
    return [{"key": part, "key_type": 1 if i in sequence else 2} for i, part in enumerate(path)]


def _entry(path: Path, value: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    # Orbax keys tree_metadata by the repr of the key tuple; list indices ("scale", "0") are sequence keys.
    seq = [i for i, part in enumerate(path) if part.isdigit() and i > 0 and path[i - 1] == "scale"]
    return repr(path), {"key_metadata": _key_metadata(path, seq), "value_metadata": value}


def _array_value(array: "ArraySpec") -> dict[str, Any]:
    return {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": list(array.chunks)}


@dataclasses.dataclass(frozen=True)
class TreeLayout:
    """One MaxText tree layout: leaf paths and Orbax metadata for each output kind.

    ``bf16_handler`` / ``aqt_handler`` name the Orbax handler MaxText's writer records for the bf16 outputs and
    the AQT one. The scanned tree is always a TrainState (``step`` scalar, empty ``opt_state``), the AQT tree never;
    ``unscanned_train_state`` says whether the unscanned one is too (0.2.4's ``generate_param_only_checkpoint``)
    or a bare decode tree (0.2.5's NNX).
    """

    name: str
    bf16_handler: str
    aqt_handler: str
    unscanned_train_state: bool
    #: AQT types this generation of MaxText writes and loads (None: all of rayconv's), and why not the others.
    quantize_types: frozenset[str] | None = None
    unsupported_quantize_reason: str = ""

    def check_quantize_type(self, quantize_type: str | None) -> None:
        """Refuse, in one line, an AQT type this layout's MaxText has no checkpoint for."""
        if quantize_type and self.quantize_types is not None and quantize_type not in self.quantize_types:
            raise SpecError(f"--quantize_type {quantize_type} has no --maxtext_layout {self.name} form: "
                            f"{self.unsupported_quantize_reason}")

    # ------------------------------------------------------------------ paths
    def leaf_path(self, rule: "Rule", layer: int | None, kind: Kind) -> Path:
        """Tree path of a rule's (non-quantized) leaf in output ``kind``."""
        raise NotImplementedError

    def aqt_paths(self, rule: "Rule", layer: int) -> tuple[Path, Path]:
        """(qvalue path, scale path) of an AQT-frozen kernel."""
        raise NotImplementedError

    def frozen_of(self, qvalue_path: Path) -> Path:
        """The QTensor node a qvalue path belongs to (its placeholders sit beside the qvalue)."""
        return qvalue_path[:-1]

    def empty_kernel_paths(self, arrays: Sequence["ArraySpec"]) -> list[Path]:
        """Quantized kernels that stay in the int8 tree as empty ``{}`` nodes (none unless the layout keeps them)."""
        return []

    # ------------------------------------------------------------------ metadata
    def has_step_leaf(self, kind: Kind) -> bool:
        """Whether the tree holds the ``step`` scalar and ``opt_state`` (a TrainState)."""
        return not kind.quantized and (kind.scanned or self.unscanned_train_state)

    def handler(self, kind: Kind) -> str:
        return self.aqt_handler if kind.quantized else self.bf16_handler

    def tree_metadata(self, kind: Kind, arrays: Sequence["ArraySpec"]) -> dict[str, Any]:
        """``_METADATA`` as Orbax 0.12 writes it for this layout's tree."""
        entries: dict[str, Any] = {}
        if self.has_step_leaf(kind):
            entries.update([_entry(("step",), {"value_type": "scalar", "skip_deserialize": False})])
        for array in arrays:
            entries.update([_entry(array.path, _array_value(array))])
            if array.path[-1] == "qvalue":
                frozen = self.frozen_of(array.path)
                entries.update([_entry(frozen + (name,), {"value_type": vtype, "skip_deserialize": True})
                                for name, vtype in _FROZEN_PLACEHOLDERS])
        for path in self.empty_kernel_paths(arrays):
            entries.update([_entry(path, {"value_type": "Dict", "skip_deserialize": True})])
        if self.has_step_leaf(kind):
            entries.update([_entry(("opt_state",), {"value_type": "Dict", "skip_deserialize": True})])
        return {
            "tree_metadata": entries,
            "use_ocdbt": True,
            "use_zarr3": True,
            "store_array_data_equal_to_fill_value": True,
            "custom_metadata": None,
        }

    def sharding_file(self, arrays: Sequence["ArraySpec"]) -> dict[str, str]:
        """``_sharding``: one (single-device) sharding per array, keyed by its base64 param name."""
        return {base64.urlsafe_b64encode(a.param_name.encode()).decode(): _SINGLE_DEVICE for a in arrays}

    def array_metadatas(self, arrays: Sequence["ArraySpec"]) -> dict[str, Any]:
        return {"array_metadatas": [
            {"array_metadata": {"param_name": a.param_name, "write_shape": list(a.chunks),
                                "chunk_shape": list(a.chunks), "ext_metadata": None}} for a in arrays]}

    def custom_metadata(self, kind: Kind) -> dict[str, Any]:
        """``custom_metadata`` of the step's ``_CHECKPOINT_METADATA``."""
        return {}

    def checkpoint_metadata(self, kind: Kind, step_dir: bool, custom: dict[str, Any] | None,
                            started_ns: int) -> dict[str, Any]:
        """``_CHECKPOINT_METADATA``: in the step dir (``{"items": handler}``) or a bare item dir (the handler)."""
        handler = self.handler(kind)
        return {"item_handlers": {"items": handler} if step_dir else handler, "metrics": {},
                "performance_metrics": {}, "init_timestamp_nsecs": started_ns,
                "commit_timestamp_nsecs": time.time_ns(),
                "custom_metadata": self.custom_metadata(kind) if custom is None else custom}


class _Linen(TreeLayout):
    """MaxText 0.2.4 classic trees (JetStream-MaxText, the GKE tutorial)."""

    def leaf_path(self, rule: "Rule", layer: int | None, kind: Kind) -> Path:
        return ("params", "params") + _layer_target(rule, layer, kind.scanned)

    def aqt_paths(self, rule: "Rule", layer: int) -> tuple[Path, Path]:
        module = _layer_target(rule, layer, False)[:-1]
        frozen = ("params", "aqt") + module + ("AqtDotGeneral_0", "qrhs", "frozen")
        return frozen + ("qvalue",), frozen + ("scale", "0")

    def empty_kernel_paths(self, arrays: Sequence["ArraySpec"]) -> list[Path]:
        """int8: load_and_quantize_checkpoint replaces each quantized kernel under params/params by ``{}``."""
        paths = []
        for array in arrays:
            if array.path[:2] == ("params", "aqt") and array.path[-1] == "qvalue":
                module = array.path[2:-4]  # strip AqtDotGeneral_0/qrhs/frozen/qvalue
                paths.append(("params", "params") + module + ("kernel",))
        return paths

    def custom_metadata(self, kind: Kind) -> dict[str, Any]:
        # MaxText ≥ 0.2.4 reads scan_layers from here (verify_and_sync_scan_layers); the AQT dir has none.
        return {} if kind.quantized else {"scan_layers": kind.scanned, "converter": "rayconv"}


class _Nnx(TreeLayout):
    """MaxText 0.2.5 default trees: classic scanned, NNX decode unscanned, NNX int8."""

    def leaf_path(self, rule: "Rule", layer: int | None, kind: Kind) -> Path:
        if kind.scanned:  # llama_or_mistral_ckpt: the classic TrainState tree, unchanged in 0.2.5
            return ("params", "params") + _layer_target(rule, layer, True)
        return _layer_target(rule, layer, False) + ("value",)

    def aqt_paths(self, rule: "Rule", layer: int) -> tuple[Path, Path]:
        module = _layer_target(rule, layer, False)[:-1]
        frozen = module + ("AqtDotGeneral_0", "qrhs", "frozen", "value")
        return frozen + ("qvalue",), frozen + ("scale", "0")


LINEN = _Linen("linen", bf16_handler=LEGACY_PYTREE_HANDLER, aqt_handler=LEGACY_PYTREE_HANDLER,
               unscanned_train_state=True)
NNX = _Nnx("nnx", bf16_handler=V1_PYTREE_HANDLER, aqt_handler=LEGACY_PYTREE_HANDLER, unscanned_train_state=False,
           quantize_types=frozenset({"int8"}),
           # Measured: 0.2.5's layerwise_quantization with quantization=intmp fails building the model
           # (quantizations._get_mixed_precision_cfg reads Linen's module stack, None under NNX); MaxEngine builds
           # the same model to load, so there is neither a writer nor a loader to be compatible with.
           unsupported_quantize_reason="MaxText 0.2.5 can neither write nor load weight-only (intmp) AQT checkpoints "
                                       "(its mixed-precision config needs the Linen module stack); use int8, or "
                                       "--maxtext_layout linen for JetStream-MaxText / MaxText 0.2.4")

class _ToMaxText(_Linen):
    """What MaxText 0.2.5's ``checkpoint_conversion/to_maxtext.py`` writes (Qwen3's default, docs/qwen3.md): the
    classic TrainState tree for both outputs, through Orbax's v1 Checkpointer, ``custom_metadata
    {"scan_layers": …}`` (no ``converter`` key). Its 16-device ``NamedSharding`` and chunking are not copied:
    chunks stay rayconv's one-per-piece grid (the values and the tree are the compatibility standard)."""

    def custom_metadata(self, kind: Kind) -> dict[str, Any]:
        return {"scan_layers": kind.scanned}


TO_MAXTEXT = _ToMaxText("to_maxtext", bf16_handler=V1_PYTREE_HANDLER, aqt_handler=LEGACY_PYTREE_HANDLER,
                        unscanned_train_state=True, quantize_types=frozenset(),
                        unsupported_quantize_reason="to_maxtext.py writes bf16 checkpoints only")

LAYOUTS: dict[str, TreeLayout] = {layout.name: layout for layout in (LINEN, NNX, TO_MAXTEXT)}
DEFAULT_LAYOUT = "linen"


def get(name: str | None) -> TreeLayout:
    """The layout called ``name`` (None: the default, ``linen``)."""
    layout = LAYOUTS.get(name or DEFAULT_LAYOUT)
    if layout is None:
        raise SpecError(f"unknown --maxtext_layout {name!r} (choose from {', '.join(LAYOUTS)})")
    return layout
