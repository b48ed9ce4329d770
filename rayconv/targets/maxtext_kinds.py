"""The MaxText target's output kinds, as objects: what each output is, where it lives, what it stores.

A kind's ``name`` is the string the outside world sees — JSON (``plan.json``'s ``outputs``, receipts), the
ledger's ``commits/<name>.json``, the plan fingerprint, the CLI and log lines — and it never changes, so ledgers
of earlier runs stay valid. Code asks the object (``kind.scanned``, ``kind.quantized``, ``kind.directory(…)``)
instead of comparing names.

The AQT output keeps its historical name ``int8`` whatever its type: its directory and stored dtype come from
the quantize type (``<out>/int4w``, int4 qvalues, for ``--quantize_type int4w``), never from its name.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from rayconv import quantize
from rayconv.errors import SpecError


@dataclasses.dataclass(frozen=True)
class OutputKind:
    """One output of the MaxText target."""

    name: str  # the JSON / ledger / fingerprint / CLI name (see the module docstring)
    scanned: bool  # layers stacked on axis 1 (training, ``scan_layers=true``), else ``layers_{i}``
    quantized: bool  # the AQT tree (qvalue + scale per quantized kernel), from the plan's quantize type
    has_step: bool  # an Orbax CheckpointManager step directory (bf16), or a bare item directory (AQT)
    bf16_directory: tuple[str, ...] = ()  # under the output directory, for the bf16 kinds

    def __str__(self) -> str:
        return self.name

    def directory(self, quantize_type: str | None) -> tuple[str, ...]:
        """Where this output lives under the output directory: the AQT output is named after its type, as
        ``load_and_quantize_checkpoint`` names it (None: the default type's directory)."""
        if self.quantized:
            return (quantize_type or quantize.DEFAULT_TYPE,)
        return self.bf16_directory

    def qvalue_dtype(self, quantize_type: str | None) -> str:
        """The stored dtype of a quantized kernel's qvalue for this quantize type (int8, or int4 for int4w)."""
        return quantize.QUANT_TYPES[quantize_type or quantize.DEFAULT_TYPE][1].name


SCANNED = OutputKind("scanned", scanned=True, quantized=False, has_step=True, bf16_directory=("bf16", "scanned", "0"))
UNSCANNED = OutputKind("unscanned", scanned=False, quantized=False, has_step=True,
                       bf16_directory=("bf16", "unscanned", "checkpoints", "0"))
INT8 = OutputKind("int8", scanned=False, quantized=True, has_step=False)

#: Every kind, in the order outputs are planned, committed and reported.
KINDS: tuple[OutputKind, ...] = (SCANNED, UNSCANNED, INT8)
#: What ``rayconv convert`` writes with no output flag.
DEFAULT_KINDS: tuple[OutputKind, ...] = (SCANNED, UNSCANNED)


def by_name(name: str) -> OutputKind:
    """The kind a JSON record or a caller names; one line for a name no kind has."""
    for kind in KINDS:
        if kind.name == name:
            return kind
    raise SpecError(f"unknown MaxText output {name!r} (choose from {', '.join(k.name for k in KINDS)})")


def resolve(kinds: Iterable[OutputKind | str]) -> tuple[OutputKind, ...]:
    """Kinds given as objects or by name (the JSON/CLI boundary), as objects."""
    return tuple(k if isinstance(k, OutputKind) else by_name(k) for k in kinds)


def kinds_for(quantize_type: str | None, skip_scanned: bool) -> tuple[OutputKind, ...]:
    """The outputs the tutorial's flags ask for: bf16 scanned (unless ``--skip_scanned``) and unscanned, and the
    AQT output when a quantize type is given."""
    chosen = DEFAULT_KINDS if not skip_scanned else tuple(k for k in DEFAULT_KINDS if not k.scanned)
    return chosen + ((INT8,) if quantize_type else ())
