"""Output formats (*targets*) behind one small protocol, and their registry.

A target owns everything about the files rayconv writes: its *kinds* (the outputs it can write, objects with a
``name`` — the only thing JSON, the ledger, the fingerprint, the CLI and log lines carry), every output's
arrays and chunk grid, the values a piece gives them, the writer a unit writes with (whatever it returns goes
into the unit's receipt, unread by the driver and the ledger), and the commit with its completeness test.
The plan carries its target (``Plan.target``); nothing downstream tests kind names.

Adding a target is one module here (the MaxText one: :mod:`rayconv.targets.maxtext`) and one line in
:data:`TARGETS` (docs/architecture.md, "Adding a target").
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Protocol, Sequence, runtime_checkable

from rayconv.errors import SpecError
from rayconv.targets.maxtext import MAXTEXT


class Kind(Protocol):
    """One output of a target."""

    @property
    def name(self) -> str: ...


class Writer(Protocol):
    """Writes one unit's values; what :meth:`written` returns is the receipt's ``dbs`` (opaque but to its target)."""

    bytes_written: int

    def write(self, kind: Any, path: tuple[str, ...], region: tuple[slice, ...], array: Any) -> None: ...

    def piece_done(self) -> None: ...

    def flush(self) -> None: ...

    def written(self) -> dict[str, str]: ...


@runtime_checkable
class Target(Protocol):
    """What the planner, the workers, the driver, the ledger and ``rayconv verify`` ask of an output format.

    ``layout`` objects are the target's (where one output lives: ``final_root``, ``staging_root``,
    ``items_path``); ``written`` is what the units' writers returned, as recorded in their receipts."""

    name: str
    kinds: tuple[Any, ...]

    def kinds_for(self, quantize_type: str | None, skip_scanned: bool = False) -> tuple[Any, ...]: ...

    def kind(self, name: str) -> Any: ...

    def resolve(self, kinds: Iterable[Any]) -> tuple[Any, ...]: ...

    def check(self, kinds: Sequence[Any], quantize_type: str | None, tree: Any) -> None: ...

    def arrays(self, plan: Any, kind: Any) -> list[Any]: ...

    def piece_values(self, ctx: Any, rule: Any, piece: Any, block: Any) -> Iterator[tuple[Any, ...]]: ...

    def writer(self, ctx: Any, unit: Any) -> Writer: ...

    def places(self, out: Any, quantize_type: str | None = None, tree: Any = None) -> dict[Any, Any]: ...

    def staging_roots(self, out: Any) -> list[Any]: ...

    def present(self, out: Any) -> tuple[dict[Any, Any], str | None]: ...

    def is_complete(self, layout: Any) -> bool: ...

    def completion_mark(self, layout: Any) -> Any: ...

    def is_foreign(self, layout: Any) -> bool: ...

    def reset_staging(self, layout: Any) -> None: ...

    def lost_units(self, layout: Any, written: dict[str, dict[str, str]]) -> list[str]: ...

    def commit(self, layout: Any, arrays: list[Any], written: list[dict[str, str]] | None, *,
               compression: str | None, started_ns: int) -> Any: ...

    def completion_lines(self, plan: Any, outputs: dict[Any, str]) -> list[str]: ...


#: name → target. One line per target.
TARGETS: dict[str, Target] = {
    MAXTEXT.name: MAXTEXT,
}
DEFAULT_TARGET = MAXTEXT.name


def get(name: str | None = None) -> Target:
    """The target called ``name`` (None: MaxText); one line for a name no target has."""
    target = TARGETS.get(name or DEFAULT_TARGET)
    if target is None:
        raise SpecError(f"unknown output format {name!r} (choose from {', '.join(TARGETS)})")
    return target
