"""The MaxText Orbax target: bf16 scanned, bf16 unscanned and AQT checkpoints, in the linen or nnx tree layout.

Everything the rest of rayconv asks of an output format, for MaxText: its kinds (:mod:`.maxtext_kinds`), the
arrays and chunk grid of each and the values a piece gives them (:mod:`.maxtext_arrays`), where each output
lives (:class:`rayconv.sink.places.OutputPlace`), the writer a unit writes with (OCDBT child databases,
:mod:`rayconv.sink.ocdbt_writer`), and the commit protocol with its markers (:mod:`rayconv.sink.commit`). The
driver, the ledger and ``rayconv verify`` reach Orbax only through this object.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np

from rayconv import mapping, quantize, trees
from rayconv.errors import OutputError
from rayconv.mapping import Rule
from rayconv.leaves import ArraySpec
from rayconv.plan import Piece, Plan, Unit
from rayconv.receipts import JobContext
from rayconv.sink import commit as orbax_commit
from rayconv.sink.places import OutputPlace
from rayconv.sink.ocdbt_writer import OcdbtWriter
from rayconv.storage import Location
from rayconv.targets import maxtext_arrays, maxtext_kinds
from rayconv.targets.maxtext_kinds import OutputKind


class MaxTextTarget:
    """The MaxText Orbax target (one instance, :data:`MAXTEXT`; pickled by reference to it)."""

    name = "maxtext"
    #: Every output kind, in the order outputs are planned, committed and reported.
    kinds: tuple[OutputKind, ...] = maxtext_kinds.KINDS

    def __reduce__(self) -> str:
        return "MAXTEXT"  # Ray ships the job context to workers: they use their own module's instance

    # ------------------------------------------------------------------ kinds
    def kinds_for(self, quantize_type: str | None, skip_scanned: bool = False) -> tuple[OutputKind, ...]:
        """The outputs the tutorial's flags choose (``--skip_scanned``, ``--quantize_type``)."""
        return maxtext_kinds.kinds_for(quantize_type, skip_scanned)

    def kind(self, name: str) -> OutputKind:
        return maxtext_kinds.by_name(name)

    def resolve(self, kinds: Iterable[OutputKind | str]) -> tuple[OutputKind, ...]:
        return maxtext_kinds.resolve(kinds)

    def check(self, kinds: Sequence[OutputKind], quantize_type: str | None, tree: trees.TreeLayout) -> None:
        """Refuse, in one line, an AQT output the layout's MaxText has no checkpoint for."""
        if any(kind.quantized for kind in kinds):
            tree.check_quantize_type(quantize_type)

    # ------------------------------------------------------------------ arrays and values
    def arrays(self, plan: Plan, kind: OutputKind) -> list[ArraySpec]:
        return maxtext_arrays.output_arrays(plan, kind)

    def piece_values(self, ctx: JobContext, rule: Rule, piece: Piece, block: mapping.Block) -> Iterator[
            tuple[OutputKind, tuple[str, ...], tuple[slice, ...], np.ndarray]]:
        return maxtext_arrays.piece_outputs(ctx, rule, piece, block)

    def writer(self, ctx: JobContext, unit: Unit) -> OcdbtWriter:
        """A unit's writer: its own child OCDBT database per output; ``written()`` goes into the receipt."""
        return OcdbtWriter(ctx, unit, batch_bytes=ctx.batch_bytes)

    # ------------------------------------------------------------------ where outputs live
    def place(self, out: Location, kind: OutputKind, quantize_type: str | None = None,
               tree: trees.TreeLayout = trees.LINEN) -> OutputPlace:
        return OutputPlace(kind, out.join(*kind.directory(quantize_type)), kind.has_step, tree)

    def places(self, out: Location, quantize_type: str | None = None,
                tree: trees.TreeLayout = trees.LINEN) -> dict[OutputKind, OutputPlace]:
        """Every kind's locations; the AQT checkpoint's directory is named after its type (``<out>/int4w``)."""
        return {kind: self.place(out, kind, quantize_type, tree) for kind in self.kinds}

    def every_place(self, out: Location) -> Iterator[tuple[str | None, OutputPlace]]:
        """(quantize type, place) of every output any conversion could write under ``out`` (each AQT type)."""
        for kind in self.kinds:
            for qtype in (tuple(quantize.QUANT_TYPES) if kind.quantized else (None,)):
                yield qtype, self.place(out, kind, qtype)

    def staging_roots(self, out: Location) -> list[Location]:
        """rayconv's staging directories of every output that could be under ``out`` (``--restart`` removes them)."""
        return [place.staging_root for _, place in self.every_place(out) if place.staging_root != place.final_root]

    def present(self, out: Location) -> tuple[dict[OutputKind, Location], str | None]:
        """Committed (or, locally, fully written) outputs under ``out`` (items), and the AQT type if any."""
        found: dict[OutputKind, Location] = {}
        quantize_type = None
        for qtype, place in self.every_place(out):
            item = place.item(staging=False)
            if place.kind in found:
                continue
            if item.read_bytes(orbax_commit.MARKER) is not None or (item.is_local and item.exists("_METADATA")):
                found[place.kind] = item
                quantize_type = qtype if place.kind.quantized else quantize_type
        return {k: found[k] for k in self.kinds if k in found}, quantize_type

    # ------------------------------------------------------------------ commit
    def is_complete(self, place: OutputPlace) -> bool:
        """The output carries its last marker in its final location (what Orbax and MaxText take as finished)."""
        return orbax_commit.is_complete(place)

    def completion_mark(self, place: OutputPlace) -> Location:
        """Where that last marker is (named when a committed output has lost it)."""
        return place.final_root.join(orbax_commit.MARKER)

    def is_foreign(self, place: OutputPlace) -> bool:
        """Something this conversion did not commit (no ledger record) is where the output goes."""
        if place.final_root != place.staging_root:
            return orbax_commit.occupied(place.final_root)
        return orbax_commit.is_complete(place) or place.item().exists(orbax_commit.MARKER)

    def reset_staging(self, place: OutputPlace) -> None:
        """Drop the staging markers, so a staging area built from other bytes is rebuilt, never renamed into place
        (locally) or completed with its step marker (GCS, where a to-build bf16 output has none: not visible)."""
        place.staging_root.delete(orbax_commit.MARKER)
        place.item(staging=True).delete(orbax_commit.MARKER)

    def lost_units(self, place: OutputPlace, written: dict[str, dict[str, str]]) -> list[str]:
        """Units (of ``written``: unit → what its writer returned) whose part of this output is not in storage."""
        name = place.kind.name
        by_db = {dbs[name]: unit for unit, dbs in written.items() if name in dbs}
        lost = orbax_commit.missing_databases(place.item(staging=True), by_db)
        return [by_db[db] for db in lost] + [unit for unit, dbs in written.items() if name not in dbs]

    def commit(self, place: OutputPlace, arrays: list[ArraySpec], written: list[dict[str, str]] | None, *,
               compression: str | None, started_ns: int) -> Location | OutputError:
        """Commit one output from what the units' writers returned (None: only check and keep an output an
        interrupted run committed); returns the final item, or a user-facing failure (the other outputs go on)."""
        dbs = [w[place.kind.name] for w in written] if written is not None else []
        return orbax_commit.commit_or_error(place, arrays, dbs, compression=compression, started_ns=started_ns,
                                            custom_metadata=place.tree.custom_metadata(place.kind))

    # ------------------------------------------------------------------ the closing lines
    def completion_lines(self, plan: Plan, outputs: dict[OutputKind, str]) -> list[str]:
        """The tutorial's closing lines (its scripts print them), and which MaxText loads the AQT output."""
        lines = []
        for kind, uri in outputs.items():
            if kind.scanned:
                lines.append(f"Completed conversion of {plan.spec.maxtext_name} to {uri}")
            elif not kind.quantized:
                lines.append(f"Completed unscanning checkpoint to {uri}")
            else:
                lines += [f"Completed quantizing model {plan.spec.maxtext_name} with {plan.quantize_type} to {uri}",
                          compatibility_note(plan)]
        return lines


def compatibility_note(plan: Plan) -> str:
    """Which MaxText versions load this run's AQT checkpoint, and how to get the other tree layout."""
    if plan.tree is trees.LINEN:
        return (f"The {plan.quantize_type} checkpoint has the classic (linen) AQT tree: JetStream-MaxText and MaxText "
                "<= 0.2.4 (with pure_nnx=false enable_nnx=false pure_nnx_decoder=false) load it; MaxText >= 0.2.5 "
                "does not: convert again with --maxtext_layout nnx (or --inference_server maxtext) for it")
    return (f"The {plan.quantize_type} checkpoint has MaxText 0.2.5's NNX AQT tree: MaxText >= 0.2.5 loads it "
            "(quantization=... checkpoint_is_quantized=true scan_layers=false); JetStream-MaxText and MaxText <= 0.2.4 "
            "do not: convert again with --maxtext_layout linen for them")


MAXTEXT = MaxTextTarget()
