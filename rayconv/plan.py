"""The conversion plan: every output array, and the work units that fill them.

A plan is pure data, built from the model spec and the shard indexes before anything runs, so
``rayconv plan`` prints exactly what ``rayconv convert`` executes. A *piece* is one row block of one
source tensor's global matrix (see :mod:`rayconv.mapping`): its byte ranges, and the chunk-aligned
region it fills in each output array. A *unit* is a run of pieces executed by one task that writes
one OCDBT database per output; units are idempotent (re-running one rewrites the same chunks with
the same bytes) and their receipts are what the ledger records.

Chunking is chosen so that every chunk is written by exactly one piece: the chunk extent along the
row axis equals the piece height, and all other axes are whole (the layer axis of scanned arrays
has extent 1). No chunk is ever read-modified-written, so writers never coordinate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, Iterable, Sequence


from rayconv import families, mapping, trees
from rayconv.errors import SpecError
from rayconv.leaves import ArraySpec, Read, TensorInfo
from rayconv.mapping import Rule
from rayconv.models import ModelSpec

def block_region(rule: Rule, spec: ModelSpec, row0: int, row1: int,
                 experts: tuple[int, int] | None = None) -> tuple[tuple[int, int], ...]:
    """Region (start, stop per axis) of the per-layer array filled by rows [row0, row1) of G (of each of the
    ``experts`` range, for an ``{expert}`` rule: placed on ``mapping.EXPERT_AXIS``)."""
    transform = rule.transform
    region = [(0, n) for n in transform.layer_shape(spec)]
    if transform.row_axis is not None:
        div = mapping.row_quantum(rule, spec)
        region[transform.row_axis] = (row0 // div, row1 // div)
    if experts is not None:
        region[mapping.EXPERT_AXIS] = experts
    return tuple(region)


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows [row0, row1) of one source tensor's global matrix G, for one layer."""

    rule: int  # index into the family's rules(spec)
    layer: int | None
    row0: int
    row1: int
    reads: tuple[Read, ...]  # concatenated along axis 1 (dim-1 split), one per expert, or a single read
    duplicates: tuple[Read, ...] = ()  # repeated kv heads that must equal reads[0]
    #: An ``{expert}`` rule's piece: experts [start, stop) of the layer, one read each (the same rows of each),
    #: stacked [experts, rows, cols]. None for every other rule (so their plans and fingerprints are unchanged).
    experts: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        return sum(r.length for r in self.reads)


@dataclasses.dataclass(frozen=True)
class Unit:
    id: str
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)

    @property
    def read_bytes(self) -> int:
        scales = sum(r.scale.length for p in self.pieces for r in p.reads if r.scale is not None)
        return self.nbytes + sum(r.length for p in self.pieces for r in p.duplicates) + scales


@dataclasses.dataclass(frozen=True)
class Plan:
    spec: ModelSpec
    tensor_files: tuple[str, ...]  # source uri per file index (Read.file)
    kinds: tuple[Any, ...]  # the target's output kinds (objects with a .name: rayconv.targets)
    quantize_type: str | None
    piece_rows: dict[int, int]  # rule index → rows per piece
    units: tuple[Unit, ...]
    scale_files: tuple[str, ...] = ()  # FP8 SKU: fp8_scales_{r}.pt uri per shard
    layout: str = trees.DEFAULT_LAYOUT  # MaxText tree layout (rayconv.trees.LAYOUTS)
    target: Any = None  # the output format (rayconv.targets): its arrays, values, writer and commit
    piece_experts: dict[int, int] = dataclasses.field(default_factory=dict)  # {expert} rule index → experts/piece

    @property
    def tree(self) -> trees.TreeLayout:
        return trees.get(self.layout)

    @property
    def rules(self) -> tuple[Rule, ...]:
        return families.rules(self.spec)

    @property
    def input_bytes(self) -> int:
        return sum(u.read_bytes for u in self.units)

    def arrays(self, kind: Any) -> list[ArraySpec]:
        """Every array of output ``kind`` with its chunk grid (the target decides)."""
        return self.target.arrays(self, kind)

    def kind(self, name: str) -> Any:
        """The output of this plan called ``name`` (a JSON or ledger name)."""
        for kind in self.kinds:
            if kind.name == name:
                return kind
        raise KeyError(name)

    def fingerprint(self) -> str:
        """Identifies the work: same fingerprint ⇒ a ledger's receipts are valid for this plan."""
        work = {"spec": self.spec.to_json(), "kinds": [k.name for k in self.kinds], "q": self.quantize_type,
                "rows": sorted(self.piece_rows.items()), "units": [(u.id, len(u.pieces)) for u in self.units]}
        if self.scale_files:
            work["fp8"] = True  # the same model from an FP8 source converts to different bytes
        if self.piece_experts:
            work["experts"] = sorted(self.piece_experts.items())  # only MoE plans have it: others' stay
        if self.layout != trees.DEFAULT_LAYOUT:
            work["layout"] = self.layout  # only non-default layouts, so linen fingerprints (and ledgers) stay
        payload = json.dumps(work, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _divisor_rows(total: int, quantum: int, row_bytes: int, budget: int) -> int:
    """Largest block height that divides ``total``, is a multiple of ``quantum`` and fits the budget."""
    best = quantum
    for rows in range(quantum, total + 1, quantum):
        if total % rows == 0 and rows * row_bytes <= budget:
            best = rows
    return best


def piece_rows(rule: Rule, spec: ModelSpec, budget: int) -> int:
    shape = mapping.global_shape(rule, spec)
    if rule.split is None:
        return shape[0]
    quantum = mapping.row_quantum(rule, spec)
    width = shape[1] * 2  # bf16 bytes per row of G
    per_shard = shape[0] // mapping.source_shards(rule, spec) if rule.split == 0 else shape[0]
    return _divisor_rows(per_shard, quantum, width, budget)


#: Where logical shard ``s``'s copy of a tensor (named as its source format names it, ``Rule.source_key``) lives:
#: (file index, TensorInfo). Reads point at files. For Meta checkpoints shard s *is* file s (``shard_locator``); a
#: Hugging Face checkpoint is one logical shard spread over many files (``HFCheckpoint.locate``).
Locate = Callable[[int, str], tuple[int, TensorInfo]]


def shard_locator(indexes: Sequence[dict[str, TensorInfo]]) -> Locate:
    """Meta layout: tensor ``key`` of shard s is in file s."""
    return lambda shard, key: (shard, indexes[shard][key])


def _layers(rule: Rule, spec: ModelSpec) -> Sequence[int | None]:
    return range(spec.n_layers) if rule.per_layer else (None,)


def piece_experts(rule: Rule, spec: ModelSpec, rows: int, budget: int) -> int:
    """Experts per piece of an ``{expert}`` rule: as many whole experts as divide the count and fit the budget when
    one expert's tensor fits whole (``rows`` all of G), else one (its row blocks)."""
    g_rows, width = mapping.global_shape(rule, spec)
    if rows < g_rows:
        return 1
    return _divisor_rows(spec.n_experts, 1, g_rows * width * 2, budget)


def _expert_pieces(rule: Rule, ri: int, spec: ModelSpec, locate: Locate, layer: int | None, rows: int,
                   per_piece: int) -> Iterable[Piece]:
    """(expert range × row block) pieces of one layer: one read per expert, each the same rows."""
    g_rows = mapping.global_shape(rule, spec)[0]
    source = mapping.source_format(spec)
    for e0 in range(0, spec.n_experts, per_piece):
        for row0 in range(0, g_rows, rows):
            reads = tuple(_read(*locate(0, rule.source_key(source, layer, expert=e)), row0, row0 + rows)
                          for e in range(e0, e0 + per_piece))
            yield Piece(ri, layer, row0, row0 + rows, reads, experts=(e0, e0 + per_piece))


def build_pieces(spec: ModelSpec, indexes: Sequence[dict[str, TensorInfo]], budget: int,
                 locate: Locate | None = None) -> tuple[dict[int, int], list[Piece]]:
    """Cut every tensor of every layer into budget-sized row blocks of G (an ``{expert}`` rule's: expert range ×
    row block, within the budget whatever the expert count)."""
    rows_by_rule, pieces, _ = _cut(spec, indexes, budget, locate)
    return rows_by_rule, pieces


def _cut(spec: ModelSpec, indexes: Sequence[dict[str, TensorInfo]], budget: int,
         locate: Locate | None = None) -> tuple[dict[int, int], list[Piece], dict[int, int]]:
    locate = locate or shard_locator(indexes)
    rows_by_rule: dict[int, int] = {}
    experts_by_rule: dict[int, int] = {}
    pieces: list[Piece] = []
    source = mapping.source_format(spec)
    for ri, rule in enumerate(families.rules(spec)):
        rows = piece_rows(rule, spec, budget)
        rows_by_rule[ri] = rows
        g_rows = mapping.global_shape(rule, spec)[0]
        if mapping.per_expert(rule):
            experts_by_rule[ri] = piece_experts(rule, spec, rows, budget)
            for layer in _layers(rule, spec):
                pieces.extend(_expert_pieces(rule, ri, spec, locate, layer, rows, experts_by_rule[ri]))
            continue
        for layer in _layers(rule, spec):
            key = rule.source_key(source, layer)
            if rule.split is None:  # replicated: shard 0's copy (MaxText ignores the others)
                file, info = locate(0, key)
                pieces.append(Piece(ri, layer, 0, g_rows, (_read(file, info, 0, info.shape[0]),)))
                continue
            for row0 in range(0, g_rows, rows):
                pieces.append(_piece(rule, ri, spec, locate, layer, key, row0, row0 + rows))
    return rows_by_rule, pieces, experts_by_rule


def _read(file: int, info: TensorInfo, r0: int, r1: int) -> Read:
    offset, length = info.row_range(r0, r1)
    return Read(file, info.name, offset, length, (r0, r1), (r1 - r0,) + tuple(info.shape[1:]))


def _piece(rule: Rule, ri: int, spec: ModelSpec, locate: Locate, layer, key: str, row0: int, row1: int) -> Piece:
    if rule.split == 1:
        reads = tuple(_read(*locate(s, key), row0, row1) for s in range(spec.n_shards))
        return Piece(ri, layer, row0, row1, reads)
    per_shard = mapping.global_shape(rule, spec)[0] // mapping.source_shards(rule, spec)
    source, local0 = divmod(row0, per_shard)
    step = spec.kv_step if mapping.repeats_kv(rule) else 1
    shard = source * step
    read = _read(*locate(shard, key), local0, local0 + row1 - row0)
    dups = tuple(_read(*locate(s, key), local0, local0 + row1 - row0) for s in range(shard + 1, shard + step))
    return Piece(ri, layer, row0, row1, (read,), dups)


def group_units(pieces: Iterable[Piece], unit_budget: int) -> tuple[Unit, ...]:
    """Pack pieces into units, keeping each unit's reads sequential within a shard where possible.

    Single-shard pieces are ordered by (shard, file offset) so a worker streams through a shard;
    cross-shard pieces (wo/w2 blocks) are ordered by layer.
    """
    def order(p: Piece) -> tuple:
        if len(p.reads) == 1:
            return (0, p.reads[0].file, p.reads[0].offset)
        return (1, p.layer if p.layer is not None else -1, p.rule, p.experts or (0, 0), p.row0)

    units: list[Unit] = []
    current: list[Piece] = []
    size = 0
    group = None
    for piece in sorted(pieces, key=order):
        key = order(piece)[:2]
        if current and (size + piece.nbytes > unit_budget or key != group):
            units.append(Unit(f"u{len(units):05d}", tuple(current)))
            current, size = [], 0
        current.append(piece)
        size += piece.nbytes
        group = key
    if current:
        units.append(Unit(f"u{len(units):05d}", tuple(current)))
    return tuple(units)


def build_plan(spec: ModelSpec, shards: Sequence[str], indexes: Sequence[dict[str, TensorInfo]], *,
               kinds: Sequence[Any], quantize_type: str | None, piece_budget: int,
               unit_budget: int, target: Any, scales: Any = None, layout: str | None = trees.DEFAULT_LAYOUT,
               locate: Locate | None = None) -> Plan:
    """``kinds``: outputs of ``target`` (rayconv.targets), as objects or by name. ``scales`` (a rayconv.fp8.Scales)
    makes the float8 reads carry their row scales (FP8 SKU); ``locate`` says which file holds each shard's tensor
    when that is not file = shard (a Hugging Face checkpoint). ``layout`` None: the family's default (what the
    MaxText tool that converts it writes)."""
    family = families.family_of(spec)
    tree = trees.get(layout or family.default_layout)
    kinds = target.resolve(kinds)
    if family.no_quantized_output and any(kind.quantized for kind in kinds):
        raise SpecError(f"--quantize_type {quantize_type}: {family.no_quantized_output}")
    target.check(kinds, quantize_type, tree)
    rows, pieces, experts = _cut(spec, indexes, piece_budget, locate)
    if scales is not None:
        from rayconv import fp8

        pieces = fp8.attach_scales(pieces, scales)
    return Plan(spec=spec, tensor_files=tuple(shards), kinds=tuple(kinds), quantize_type=quantize_type,
                piece_rows=rows, units=group_units(pieces, unit_budget),
                scale_files=tuple(scales.files) if scales is not None else (), layout=tree.name, target=target,
                piece_experts=experts)


def describe(plan: Plan) -> dict[str, Any]:
    """A JSON-able summary for ``rayconv plan`` and the logs."""
    largest = max((p.nbytes for u in plan.units for p in u.pieces), default=0)
    return {
        "model": plan.spec.maxtext_name,
        "shards": len(plan.tensor_files),
        "outputs": [k.name for k in plan.kinds],
        "maxtext_layout": plan.layout,
        "units": len(plan.units),
        "pieces": sum(len(u.pieces) for u in plan.units),
        "input_bytes": plan.input_bytes,
        "largest_piece_bytes": largest,
        "largest_unit_bytes": max((u.nbytes for u in plan.units), default=0),
        "fingerprint": plan.fingerprint(),
    }
