"""The Target seam (issue 20 item 3): the MaxText target's kinds as objects, its registry, where outputs live.

Pure and fast: no conversion runs here (test_engine, test_commit_protocol and the parity tests convert through
the target); these pin what the objects decide — which outputs the flags choose, the AQT output's directory and
dtype from its quantize type, names at the JSON boundary — and that nothing outside rayconv/targets/ tests a
kind's name.
"""

from __future__ import annotations

import ast
import dataclasses
import pickle
from pathlib import Path

import pytest

from rayconv import targets, trees
from rayconv.errors import SpecError
from rayconv.job import ConvertOptions, make_plan
from rayconv.receipts import JobContext
from rayconv.simulated import simulated_checkpoint
from rayconv.storage import Location
from rayconv.targets.maxtext import MAXTEXT
from rayconv.targets.maxtext_kinds import INT8, SCANNED, UNSCANNED

PACKAGE = Path(__file__).resolve().parents[1] / "rayconv"
MODEL_PATH = "Llama3.1-8B-Instruct"


def plan_for(kinds, quantize_type, layout="linen"):
    options = ConvertOptions(files={}, input_display="", output="/tmp/unused", model_path=MODEL_PATH, kinds=kinds,
                             quantize_type=quantize_type, maxtext_layout=layout, worker_memory_gb=4.0)
    return make_plan(simulated_checkpoint(None, MODEL_PATH), options)


def test_registry_gives_the_maxtext_target_and_refuses_unknown_names_in_one_line():
    assert targets.get() is MAXTEXT and targets.get("maxtext") is MAXTEXT
    with pytest.raises(SpecError, match="unknown output format 'safetensors'") as error:
        targets.get("safetensors")
    assert "\n" not in str(error.value)
    assert isinstance(MAXTEXT, targets.Target)  # the protocol's methods are all there (runtime_checkable below)


@pytest.mark.parametrize("quantize_type, skip_scanned, expected", [
    (None, False, (SCANNED, UNSCANNED)),
    (None, True, (UNSCANNED,)),
    ("int8", False, (SCANNED, UNSCANNED, INT8)),
    ("int4w", True, (UNSCANNED, INT8)),
    ("int8w", False, (SCANNED, UNSCANNED, INT8)),
])
def test_flags_choose_kinds(quantize_type, skip_scanned, expected):
    assert MAXTEXT.kinds_for(quantize_type, skip_scanned) == expected


def test_cli_flags_choose_the_targets_kinds():
    from rayconv.cli.options import output_kinds

    assert output_kinds("int4w", True, True) == ((UNSCANNED, INT8), "int4w")
    assert output_kinds(None, None, False) == ((SCANNED, UNSCANNED), None)


def test_names_are_the_boundary_and_resolve_to_the_same_objects():
    assert [k.name for k in MAXTEXT.kinds] == ["scanned", "unscanned", "int8"]
    assert MAXTEXT.resolve(["unscanned", INT8]) == (UNSCANNED, INT8)
    assert all(MAXTEXT.kind(k.name) is k for k in MAXTEXT.kinds)
    with pytest.raises(SpecError, match="unknown MaxText output 'int4w'"):
        MAXTEXT.kind("int4w")  # a quantize type is not a kind: int4w is the int8 kind's type


@pytest.mark.parametrize("quantize_type, directory, qvalue", [("int8", "int8", "int8"), ("int8w", "int8w", "int8"),
                                                             ("int4w", "int4w", "int4")])
def test_aqt_output_directory_and_dtype_come_from_the_quantize_type(tmp_path, quantize_type, directory, qvalue):
    out = Location.parse(str(tmp_path))
    places = MAXTEXT.places(out, quantize_type)
    assert places[INT8].final_root == out.join(directory) and places[INT8].items_path == out.join(directory)
    assert places[SCANNED].items_path == out.join("bf16", "scanned", "0", "items")
    assert places[UNSCANNED].items_path == out.join("bf16", "unscanned", "checkpoints", "0", "items")
    plan = plan_for((INT8,), quantize_type)
    stored = {a.dtype for a in plan.arrays(INT8) if a.path[-1] == "qvalue"}
    assert stored == {qvalue}
    assert {a.dtype for a in plan.arrays(INT8) if a.path[-1] != "qvalue"} == {"bfloat16"}


def test_present_finds_an_aqt_output_by_its_types_directory(tmp_path):
    out = Location.parse(str(tmp_path))
    (tmp_path / "int4w").mkdir()
    (tmp_path / "int4w" / "commit_success.txt").write_text("done")
    found, quantize_type = MAXTEXT.present(out)
    assert found == {INT8: out.join("int4w")} and quantize_type == "int4w"


def test_plan_holds_kind_objects_but_its_fingerprint_and_summary_carry_the_names():
    by_name = plan_for(("scanned", "unscanned", "int8"), "int8")
    by_object = plan_for((SCANNED, UNSCANNED, INT8), "int8")
    assert by_name.kinds == (SCANNED, UNSCANNED, INT8) and by_name.target is MAXTEXT
    assert by_name.fingerprint() == by_object.fingerprint()
    from rayconv.plan import describe

    assert describe(by_object)["outputs"] == ["scanned", "unscanned", "int8"]


def test_fingerprint_of_a_fixed_plan_is_the_one_earlier_ledgers_recorded():
    """Ledgers of earlier runs store this fingerprint (plan.json): computed before kinds became objects, it must
    never change, or every interrupted conversion would be refused as a different one."""
    checkpoint = simulated_checkpoint(None, "Llama3.1-405B-Instruct:bf16-mp16")
    options = ConvertOptions(files={}, input_display="", output="/tmp/x", model_path="Llama3.1-405B-Instruct:bf16-mp16",
                             worker_memory_gb=4.0)
    assert make_plan(checkpoint, options).fingerprint() == "de1dc91d69993548"
    all_kinds = dataclasses.replace(options, kinds=MAXTEXT.kinds_for("int8"), quantize_type="int8")
    assert make_plan(checkpoint, all_kinds).fingerprint() == "926ad9d7ea8e44f0"


def test_nnx_refuses_weight_only_aqt_through_the_target():
    with pytest.raises(SpecError, match="int4w has no --maxtext_layout nnx form"):
        plan_for((UNSCANNED, INT8), "int4w", layout="nnx")
    plan_for((UNSCANNED,), "int4w", layout="nnx")  # no AQT output asked: nothing to refuse


def test_layouts_decide_train_state_and_handler_from_the_kind():
    assert [trees.LINEN.has_step_leaf(k) for k in MAXTEXT.kinds] == [True, True, False]
    assert [trees.NNX.has_step_leaf(k) for k in MAXTEXT.kinds] == [True, False, False]
    assert trees.NNX.handler(INT8) == trees.LEGACY_PYTREE_HANDLER != trees.NNX.handler(UNSCANNED)
    assert trees.LINEN.custom_metadata(INT8) == {} and trees.LINEN.custom_metadata(SCANNED)["scan_layers"] is True


def test_target_and_kinds_survive_the_trip_to_a_worker():
    plan = plan_for((SCANNED, INT8), "int8")
    places = MAXTEXT.places(Location.parse("/tmp/unused"), plan.quantize_type, plan.tree)
    ctx = pickle.loads(pickle.dumps(JobContext.create(plan, places, None)))
    assert ctx.target is MAXTEXT  # the worker's own module instance
    assert set(ctx.arrays) == {SCANNED, INT8} and set(ctx.items) == {SCANNED, INT8}


def _kind_name_literals(path: Path) -> list[int]:
    """Lines of ``path`` with a "scanned"/"unscanned" string constant (docstrings aside)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and node.value in ("scanned", "unscanned") and id(node) not in docstrings]


def test_only_the_target_names_its_kinds():
    """The seam: outside rayconv/targets/ code asks kind objects (kind.scanned, kind.quantized) or the target."""
    found = {str(p.relative_to(PACKAGE)): lines for p in PACKAGE.rglob("*.py")
             if "targets" not in p.relative_to(PACKAGE).parts and (lines := _kind_name_literals(p))}
    assert found == {}
