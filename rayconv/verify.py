"""``rayconv verify``: prove an output equals the mapping of its source, leaf by leaf.

Independent of how the output was produced (rayconv, a resumed rayconv run, or MaxText's own
scripts): it re-reads every source row block, recomputes what each output must hold with the same
values for a piece the converter writes (the target's ``piece_values``), and compares with the stored chunks. It
also checks that each tree holds exactly the expected arrays and that its commit markers exist.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tensorstore as ts

from rayconv import families, jsonio, trees
from rayconv.checksum import verify_crcs
from rayconv.errors import ConversionError
from rayconv.job import ConvertOptions, make_plan, open_checkpoint
from rayconv.leaves import ArraySpec
from rayconv.receipts import JobContext, Receipt
from rayconv.sink.places import ocdbt_kvstore
from rayconv.storage import Location
from rayconv.targets import Target, get as get_target
from rayconv.worker import Sources, read_block


class VerificationError(ConversionError):
    """The output differs from what the source maps to."""


@dataclasses.dataclass
class VerifyReport:
    outputs: dict[str, str]
    arrays: int
    regions: int
    bytes_compared: int


def _stored_tree(kind: Any, item: Location) -> dict:
    """``tree_metadata`` of ``item/_METADATA``; a damaged or foreign file is reported, not parsed blindly."""
    raw = item.read_bytes("_METADATA")
    if raw is None:
        raise VerificationError(f"{item.uri} has no _METADATA: the {kind.name} checkpoint is incomplete")
    try:
        tree = jsonio.loads_object(raw).get("tree_metadata")
    except jsonio.JSONError:
        tree = None
    if not isinstance(tree, dict):
        raise VerificationError(f"{item.uri}/_METADATA is damaged (not Orbax tree metadata JSON): the {kind.name} "
                                "checkpoint cannot be trusted")
    return tree


def _store_error(kind: Any, item: Location, path: tuple[str, ...], exc: Exception) -> VerificationError:
    """A tensorstore failure on a stored leaf (missing or truncated file, damaged manifest) as one line."""
    reason = str(exc).split("\n", 1)[0]
    reason = reason if len(reason) <= 300 else reason[:297] + "..."
    return VerificationError(f"{kind.name} leaf {'/'.join(path)} under {item.uri} cannot be read (the checkpoint is "
                             f"damaged): {reason}")


def _detect_layout(present: dict[Any, Location]) -> str:
    """The tree layout of existing outputs: NNX trees have no ``params`` root (unscanned, AQT); a scanned-only
    output tells by the Orbax handler its step records (MaxText 0.2.5 saves through Orbax's v1 API)."""
    for kind in present:
        if not kind.scanned:
            stored = _stored_tree(kind, present[kind])
            return trees.LINEN.name if any(key.startswith("('params',") for key in stored) else trees.NNX.name
    for kind in present:
        try:
            step = jsonio.loads(present[kind].parent.read_bytes("_CHECKPOINT_METADATA") or b"{}")
        except jsonio.JSONError:
            step = {}
        handlers = step.get("item_handlers") if isinstance(step, dict) else None
        if isinstance(handlers, dict) and handlers.get("items") == trees.V1_PYTREE_HANDLER:
            return trees.NNX.name
    return trees.DEFAULT_LAYOUT


def _check_tree(kind: Any, item: Location, arrays: list[ArraySpec], tree: trees.TreeLayout = trees.LINEN) -> None:
    if item.read_bytes("commit_success.txt") is None:
        raise VerificationError(f"{item.uri} has no commit_success.txt: the {kind.name} checkpoint is incomplete")
    stored = _stored_tree(kind, item)
    expected = tree.tree_metadata(kind, arrays)["tree_metadata"]
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        which = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise VerificationError(f"{kind.name} tree at {item.uri} differs from the mapping: {which}")


def _check_recorded_outputs(out: Location, present: dict[Any, Location]) -> None:
    """Every output the rayconv conversion recorded in ``.rayconv/plan.json`` must be there: checking only the
    ones found would call a directory whose int8 checkpoint is missing (moved, deleted, never committed)
    verified. Outputs written by MaxText's scripts have no ledger, and are checked as found."""
    from rayconv.engine.ledger import Ledger

    recorded = (Ledger(out).plan_record() or {}).get("outputs")
    if not isinstance(recorded, dict):
        return
    names = {kind.name for kind in present}
    missing = sorted(name for name in recorded if name not in names)
    if missing:
        raise VerificationError(f"{out.join(str(recorded[missing[0]])).uri}: the {missing[0]} checkpoint this output's "
                                f"conversion writes (.rayconv/plan.json) is missing or has no commit_success.txt")


def verify(options: ConvertOptions, output: str) -> VerifyReport:
    out = Location.parse(output)
    target: Target = get_target()
    present, quantize_type = target.present(out)
    if not present:
        raise VerificationError(f"no committed rayconv/MaxText checkpoint under {out.uri}")
    _check_recorded_outputs(out, present)
    checkpoint = open_checkpoint(options)
    kinds = tuple(present)  # in the target's order
    # --maxtext_layout given: the output must have that layout; not given: check the layout it has.
    layout = options.maxtext_layout or _detect_layout(present)
    plan = make_plan(checkpoint, dataclasses.replace(options, kinds=kinds, quantize_type=quantize_type,
                                                     maxtext_layout=layout))
    for kind in kinds:
        _check_tree(kind, present[kind], plan.arrays(kind), plan.tree)

    places = target.places(out, quantize_type, plan.tree)
    ctx = JobContext.create(plan, places, None)
    stores: dict[tuple[Any, tuple[str, ...]], ts.TensorStore] = {}
    arrays = {k: {a.path: a for a in plan.arrays(k)} for k in kinds}

    def stored(kind: Any, path: tuple[str, ...]) -> ts.TensorStore:
        if (kind, path) not in stores:
            spec = {"driver": "zarr3", "kvstore": dict(ocdbt_kvstore(present[kind]), path=arrays[kind][path].param_name + "/")}
            try:
                stores[(kind, path)] = ts.open(spec, open=True, read=True).result()
            except ValueError as exc:  # tensorstore reports storage and format errors as ValueError
                raise _store_error(kind, present[kind], path, exc) from None
        return stores[(kind, path)]

    sources = Sources(plan.tensor_files, plan.scale_files)
    rules = families.rules(plan.spec)
    crcs: list = []
    regions = compared = 0
    for unit in plan.units:
        for piece in unit.pieces:
            block = read_block(piece, sources, crcs)
            for kind, path, region, expected in target.piece_values(ctx, rules[piece.rule], piece, block):
                try:
                    got = stored(kind, path)[region].read().result()
                except ValueError as exc:
                    raise _store_error(kind, present[kind], path, exc) from None
                if got.shape != expected.shape or got.tobytes() != np.ascontiguousarray(expected).tobytes():
                    raise VerificationError(
                        f"{kind.name} leaf {'/'.join(path)} differs from the source at "
                        f"{[(s.start, s.stop) for s in region]} (first differing leaf)")
                regions += 1
                compared += expected.nbytes
    verify_crcs(checkpoint, [Receipt("verify", {}, 0, 0, 0.0, crcs)])
    return VerifyReport(outputs={k.name: v.uri for k, v in present.items()}, arrays=sum(len(a) for a in arrays.values()),
                        regions=regions, bytes_compared=compared)
