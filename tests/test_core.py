"""Fast unit tests of the pure core: the plan, the ledger, the tree metadata (no Ray, no subprocess, no torch).

The plan decides which piece writes which chunk; if two pieces shared a chunk, parallel writers would race, and
if a chunk had no writer, the output would silently hold fill values. These invariants are checked here on
synthetic specs (indexes laid out as torch.save lays them, like ``rayconv plan --simulate``) in milliseconds,
where the end-to-end tests need seconds to minutes per shape.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
from pathlib import Path

import pytest

from rayconv import mapping, trees
from rayconv.engine.ledger import COMMITTED, COMMITTING, Ledger, unit_sources
from rayconv.simulated import simulated_indexes
from rayconv.job import ConvertOptions, budgets, make_plan, piece_budget
from rayconv.families import resolve_spec
from rayconv.plan import Plan, build_plan
from rayconv.receipts import Receipt
from rayconv.source.checkpoint import MetaCheckpoint
from rayconv.storage import Location
from rayconv.targets.maxtext import MAXTEXT

GOLDEN = Path(__file__).parent / "golden"


def spec_of(family: str, *, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, vocab_size: int, n_shards: int,
            params_kv_heads: int | None = None, ffn_dim_multiplier: float | None = 1.3, multiple_of: int = 64):
    params = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": params_kv_heads or n_kv_heads,
              "vocab_size": vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": ffn_dim_multiplier,
              "norm_eps": 1e-5, "rope_theta": 500000.0}
    return resolve_spec(params, n_shards=n_shards, vocab_size=vocab_size, model_name=family, descriptor=None,
                        kv_heads_override=n_kv_heads if params_kv_heads else None)


#: name → spec: one shard; llama-2's dim-1 embedding split; 8 shards splitting every tensor; the 405B MP16
#: layout (8 real kv heads stored twice over 16 shards).
SPECS = {
    "llama3-mp1": spec_of("llama-3", dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512, n_shards=1),
    "llama2-mp2": spec_of("llama-2", dim=256, n_layers=2, n_heads=8, n_kv_heads=8, vocab_size=512, n_shards=2,
                          ffn_dim_multiplier=None),
    "llama31-mp8": spec_of("llama-3.1", dim=256, n_layers=3, n_heads=8, n_kv_heads=8, vocab_size=512, n_shards=8),
    "405b-mp16": spec_of("llama-3.1", dim=512, n_layers=2, n_heads=16, n_kv_heads=8, params_kv_heads=16,
                         vocab_size=1024, n_shards=16, ffn_dim_multiplier=1.2),
}
#: (piece budget, unit budget): whole tensors; pieces of a few rows; small units.
BUDGETS = [(1 << 30, 1 << 30), (16 << 10, 64 << 10), (8 << 10, 8 << 10)]


def checkpoint_of(spec) -> MetaCheckpoint:
    return MetaCheckpoint(spec=spec, tensor_files=[f"consolidated.{i:02d}.pth" for i in range(spec.n_shards)],
                          indexes=simulated_indexes(spec), files={})


def plan_of(spec, piece: int, unit: int, kinds=("scanned", "unscanned", "int8"), quantize_type="int8",
            layout="linen") -> Plan:
    return build_plan(spec, [f"consolidated.{i:02d}.pth" for i in range(spec.n_shards)], simulated_indexes(spec),
                      kinds=kinds, quantize_type=quantize_type, piece_budget=piece, unit_budget=unit, layout=layout,
                      target=MAXTEXT)


# ------------------------------------------------------------------------------------------------
# Plan invariants (that every chunk has exactly one writer, and the transforms as data: tests/test_mapping_data.py)


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: f"piece{b[0]}-unit{b[1]}")
@pytest.mark.parametrize("name", list(SPECS))
def test_units_and_pieces_respect_their_budgets(name, budget):
    spec = SPECS[name]
    piece_budget_, unit_budget = budget
    plan = plan_of(spec, piece_budget_, unit_budget)
    ids = [u.id for u in plan.units]
    assert len(set(ids)) == len(ids)
    for unit in plan.units:
        # A unit holds one piece at least, and only grows past one piece while under its budget.
        assert unit.pieces and (len(unit.pieces) == 1 or unit.nbytes <= unit_budget), unit.id
        for piece in unit.pieces:
            rule = plan.rules[piece.rule]
            # Pieces are whole rows of G; only a block that cannot be cut any finer (one row quantum) may exceed.
            quantum = mapping.row_quantum(rule, spec) if rule.split is not None else piece.row1 - piece.row0
            assert piece.nbytes <= piece_budget_ or piece.row1 - piece.row0 == quantum, (rule.name, piece.nbytes)
            assert sum(r.length for r in piece.reads) == piece.nbytes
    # No source byte is read twice (kv-head copies are compared, not converted: they are duplicates, not reads).
    ranges = sorted((r.file, r.offset, r.offset + r.length) for u in plan.units for p in u.pieces for r in p.reads)
    for (shard, _, end), (next_shard, start, _) in zip(ranges, ranges[1:]):
        assert shard != next_shard or start >= end, (shard, start, end)


def test_small_budget_cuts_more_pieces_and_units():
    spec = SPECS["405b-mp16"]
    big, small = plan_of(spec, *BUDGETS[0]), plan_of(spec, *BUDGETS[2])
    assert sum(len(u.pieces) for u in small.units) > sum(len(u.pieces) for u in big.units)
    assert len(small.units) > len(big.units)
    assert small.input_bytes == big.input_bytes  # the same bytes, cut differently


def test_fingerprint_is_stable_and_names_the_work():
    spec = SPECS["llama31-mp8"]
    base = plan_of(spec, 16 << 10, 64 << 10)
    assert base.fingerprint() == plan_of(spec, 16 << 10, 64 << 10).fingerprint()  # two builds, one fingerprint
    others = {
        "kinds": plan_of(spec, 16 << 10, 64 << 10, kinds=("scanned", "unscanned"), quantize_type=None),
        "quantize": plan_of(spec, 16 << 10, 64 << 10, quantize_type="int8w"),
        "layout": plan_of(spec, 16 << 10, 64 << 10, kinds=("scanned", "unscanned"), quantize_type=None,
                          layout="nnx"),
        "pieces": plan_of(spec, 4 << 10, 64 << 10),
        "spec": plan_of(dataclasses.replace(spec, rope_theta=10000.0), 16 << 10, 64 << 10),
    }
    prints = {name: plan.fingerprint() for name, plan in others.items()}
    assert base.fingerprint() not in prints.values(), prints
    assert prints["layout"] != plan_of(spec, 16 << 10, 64 << 10, kinds=("scanned", "unscanned"),
                                       quantize_type=None).fingerprint()


def test_job_budgets_follow_worker_memory():
    options = ConvertOptions(files={}, input_display="", output="", worker_memory_gb=4.0, unit_budget=1)
    piece, unit = budgets(options)
    assert piece == piece_budget(options) and unit == piece  # a unit holds at least one whole piece
    assert budgets(dataclasses.replace(options, worker_memory_gb=1.0))[0] < piece
    assert budgets(dataclasses.replace(options, piece_budget=12345))[0] == 12345
    plan = make_plan(checkpoint_of(SPECS["llama3-mp1"]), dataclasses.replace(options, kinds=("scanned",)))
    assert max(p.nbytes for u in plan.units for p in u.pieces) <= piece


# ------------------------------------------------------------------------------------------------
# CRC-32 of what the receipts say was read, against the zip directory


def test_crc_check_combines_receipts_and_names_the_damaged_tensor():
    import random
    import zlib

    from rayconv.checksum import crc_check, crc_error
    from rayconv.leaves import TensorInfo

    rng = random.Random(0)
    data = {name: rng.randbytes(4096) for name in ("a", "b")}
    index = {name: TensorInfo(name, "bfloat16", (16, 128), 1000 * i, 4096, zlib.crc32(raw))
             for i, (name, raw) in enumerate(data.items())}
    checkpoint = MetaCheckpoint(spec=SPECS["llama3-mp1"], tensor_files=["gs://b/consolidated.00.pth?sig=x"],
                                indexes=[index], files={})

    def receipt(unit: str, name: str, start: int, stop: int, flip: bool = False) -> Receipt:
        raw = bytearray(data[name][start:stop])
        raw[0] ^= 0xFF if flip else 0
        return Receipt(unit, {}, stop - start, 0, 0.0, [(0, name, index[name].offset + start, stop - start,
                                                         zlib.crc32(raw))])

    # Row ranges read by different units, in any order, rebuild each record's CRC.
    good = [receipt("u2", "a", 1024, 4096), receipt("u1", "a", 0, 1024), receipt("u3", "b", 0, 4096)]
    assert crc_check(checkpoint, good) == (2, [])
    # A record read only in part: the driver CRCs the rest itself (here from the same bytes, or damaged ones).
    def read(damaged: bool):
        def crc_of(uri: str, offset: int, length: int) -> int:
            name = next(n for n, i in index.items() if i.offset <= offset < i.offset + i.nbytes)
            raw = bytearray(data[name][offset - index[name].offset:][:length])
            raw[-1] ^= 0x01 if damaged else 0
            return zlib.crc32(raw)
        return crc_of
    assert crc_check(checkpoint, good[:1], read(False)) == (1, [])
    assert crc_check(checkpoint, good[:1], read(True)) == (0, [(0, "a")])
    # Two reads of the same range that disagree fail, whichever one the tiling would use.
    assert crc_check(checkpoint, [*good, receipt("u4", "a", 0, 1024, flip=True)]) == (1, [(0, "a")])
    bad = [receipt("u1", "a", 0, 1024), receipt("u2", "a", 1024, 4096, flip=True), good[2]]
    assert crc_check(checkpoint, bad) == (1, [(0, "a")])
    error = str(crc_error(checkpoint, [(0, "a")]))
    assert error == "gs://b/consolidated.00.pth: tensor a fails its CRC-32 check (corrupt shard; re-download it)"


# ------------------------------------------------------------------------------------------------
# Ledger resume on a local directory


def test_ledger_records_reloads_forgets_and_commits(tmp_path):
    plan = plan_of(SPECS["llama31-mp8"], 16 << 10, 64 << 10)
    out = Location.parse(str(tmp_path / "out"))
    ledger = Ledger(out)
    assert ledger.plan_record() is None and ledger.receipts() == {}
    record = ledger.start(plan.fingerprint(), {"units": len(plan.units)}, 123, source="abc", compression=None)
    assert Ledger(out).plan_record() == record  # a fresh Ledger (a rerun) sees it

    receipts = [Receipt(u.id, {"scanned": f"db-{u.id}"}, u.read_bytes, 7, 0.5,
                        [(r.file, r.tensor, r.offset, r.length, 99) for p in u.pieces for r in p.reads])
                for u in plan.units[:3]]
    for receipt in receipts:
        ledger.record(receipt, {k: f"id{k}" for k in unit_sources(plan.units[0])})
    loaded = Ledger(out).receipts()
    assert {u: r for u, (r, _) in loaded.items()} == {r.unit: r for r in receipts}  # crcs survive JSON as tuples
    assert loaded[receipts[0].unit][1] == {k: f"id{k}" for k in unit_sources(plan.units[0])}

    ledger.forget([receipts[1].unit])
    assert set(Ledger(out).receipts()) == {receipts[0].unit, receipts[2].unit}
    (tmp_path / "out/.rayconv/receipts" / f"{receipts[2].unit}.json").write_text("{not json")
    assert set(Ledger(out).receipts()) == {receipts[0].unit}  # a damaged receipt costs its unit a rerun

    assert ledger.commit_state("scanned") is None
    ledger.set_commit_state("scanned", COMMITTING, "final/scanned")
    assert Ledger(out).commit_state("scanned") == COMMITTING
    ledger.mark_committed("scanned", "final/scanned")
    assert Ledger(out).commit_state("scanned") == COMMITTED

    # Resuming the same work returns the stored record; other work is refused with the reason.
    assert Ledger(out).start(plan.fingerprint(), {}, 456, source="abc", compression=None)["started_ns"] == 123
    from rayconv.errors import OutputError

    with pytest.raises(OutputError, match="different conversion"):
        Ledger(out).start("0" * 16, {}, 456, source="abc", compression=None)
    with pytest.raises(OutputError, match="different source checkpoint"):
        Ledger(out).start(plan.fingerprint(), {}, 456, source="xyz", compression=None)

    ledger.clear()
    assert Ledger(out).plan_record() is None and Ledger(out).receipts() == {}
    assert Ledger(out).commit_state("scanned") is None


# ------------------------------------------------------------------------------------------------
# Tree metadata against MaxText's own _METADATA


def _without_write_shape(metadata: dict) -> dict:
    """Orbax records the write (chunk) shape it used; rayconv's chunks differ by design (one piece per chunk)."""
    tree = {key: {**entry, "value_metadata": {k: v for k, v in entry["value_metadata"].items() if k != "write_shape"}}
            for key, entry in metadata["tree_metadata"].items()}
    return {**metadata, "tree_metadata": tree}


@pytest.mark.parametrize("kind", ["scanned", "int8"])
def test_linen_tree_metadata_equals_maxtexts(kind):
    """tests/golden/*._METADATA: written by MaxText 0.2.4's llama_or_mistral_ckpt / load_and_quantize_checkpoint
    for the llama3-mp1 synthetic model (tools/maxtext_ref), copied from the reference cache."""
    golden = json.loads((GOLDEN / f"linen-llama3-mp1-{kind}._METADATA").read_text())
    plan = plan_of(SPECS["llama3-mp1"], 1 << 30, 1 << 30)
    ours = trees.LINEN.tree_metadata(plan.kind(kind), plan.arrays(plan.kind(kind)))
    assert _without_write_shape(ours) == _without_write_shape(golden)


# ------------------------------------------------------------------------------------------------
# The package's shape (issues 15, 20): small modules, and no import cycle of any kind


PACKAGE = Path(__file__).resolve().parents[1] / "rayconv"
MAX_MODULE_LINES = 400


def _imported(node, name: str, is_package: bool, modules) -> set[str]:
    """The rayconv modules one import statement names (``from a import b`` names a.b when that is a module)."""
    import ast

    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    if node.level:  # relative: resolved against the importing module's package
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    return {f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names}


def _module_imports() -> dict[str, set[str]]:
    """{module: rayconv modules it imports}: every import statement anywhere in it, at module level, inside
    functions (deferred, still a dependency) and under ``if TYPE_CHECKING`` (a type-only edge is still an edge)."""
    import ast

    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found |= _imported(node, name, path.name == "__init__.py", modules)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_the_cycle_guard_sees_function_level_and_type_checking_imports():
    graph = _module_imports()
    assert "rayconv.fp8" in graph["rayconv.plan"]  # build_plan's deferred import of fp8
    assert "rayconv.mapping" in graph["rayconv.trees"]  # trees' TYPE_CHECKING import of Rule
    assert "rayconv.quantize" in graph["rayconv.mapping"]  # scale_query's deferred import


def test_readers_do_not_know_the_maxtext_mapping():
    """The readers give their index; the family says which tensors, of which shapes, a spec needs (issue 20)."""
    graph = _module_imports()
    for reader in ("rayconv.source.hf", "rayconv.source.checkpoint", "rayconv.source.pth",
                   "rayconv.source.safetensors"):
        assert not graph[reader] & {"rayconv.mapping", "rayconv.families.llama", "rayconv.plan"}, reader


def test_every_reader_offers_the_checkpoint_protocol():
    """The Source seam (issue 20): each format's reader has every member of ``source.protocol.Checkpoint``, and
    the driver and the job reach the input only through it (no test of which format it is)."""
    from rayconv.source import protocol
    from rayconv.source.checkpoint import MetaCheckpoint
    from rayconv.source.hf import HFCheckpoint

    members = set(protocol.Checkpoint.__annotations__) | {
        name for name in vars(protocol.Checkpoint) if not name.startswith("_")}
    assert {"spec", "tensor_files", "locate", "describe_files", "checklist_note"} <= members
    for reader in (MetaCheckpoint, HFCheckpoint):
        fields = {f.name for f in dataclasses.fields(reader)}
        assert not {m for m in members if m not in fields and not hasattr(reader, m)}, reader
    for module in ("rayconv/engine/driver.py", "rayconv/job.py"):
        text = (PACKAGE / module.removeprefix("rayconv/")).read_text()
        assert "source_format(" not in text and '== "hf"' not in text, module


def test_modules_stay_small_and_import_without_cycles():
    sizes = {p.relative_to(PACKAGE.parent).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert len(sizes) > 30 and max(sizes.values()) > 100  # the walk found the package
    assert not {k: v for k, v in sizes.items() if v > MAX_MODULE_LINES}
    graph = _module_imports()
    assert graph["rayconv.engine.driver"] and "rayconv.job" in graph["rayconv.forecast"]  # the walk sees imports
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_a_closed_local_file_never_closes_a_reused_descriptor(tmp_path):
    """close() then __del__ must not close the descriptor number again: by then it may be another file's."""
    from rayconv.source.bytesource import LocalFile

    path = tmp_path / "f"
    path.write_bytes(b"x" * 16)
    source = LocalFile(str(path))
    source.close()
    other = os.open(path, os.O_RDONLY)  # the lowest free number: the one just closed
    try:
        del source
        gc.collect()
        os.fstat(other)  # raises EBADF if __del__ closed it
    finally:
        os.close(other)
