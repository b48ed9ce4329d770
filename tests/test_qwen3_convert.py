"""``rayconv convert`` of Qwen3 (dense and MoE) against MaxText 0.2.5's own to_maxtext.py, end to end.

The inputs are the transformers-written fixtures (tests/qwen3_checkpoints.py: dense with head_dim ≠ hidden/heads and
tied embeddings; MoE with 8 experts, untied), converted through the CLI with default flags (``--executor local``).
The reference is to_maxtext.py's scanned and unscanned output for the same files (tools/maxtext_ref, cached).

What is compared (helpers.assert_same_checkpoint), for both outputs of both fixtures:
* every leaf, ``step`` included: the same tree paths, dtype, shape and bytes;
* the item's ``_METADATA``: equal except each array's ``write_shape`` (the chunking: to_maxtext's follows its 16
  simulated devices, rayconv's its pieces);
* the step's ``_CHECKPOINT_METADATA``: equal except its two timestamps (handler, ``custom_metadata``, metrics).
Not compared: ``_sharding`` (to_maxtext records a 16-device NamedSharding, rayconv a single device; neither is read
back by MaxText's restore, which takes the shardings of its own mesh), ``array_metadatas``, the OCDBT files, and the
directory the output sits in (``<out>/0/items`` there, rayconv's ``bf16/scanned/0/items``, ``bf16/unscanned/…``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import qwen3_checkpoint, qwen3_spec
from helpers import ITEMS, assert_one_line, assert_same_checkpoint, output_leaves, run_convert_cli
from qwen3_checkpoints import FIXTURES
from rayconv import mapping
from rayconv.families import qwen3

KINDS = {True: "scanned", False: "unscanned"}


checkpoint, spec_of = qwen3_checkpoint, qwen3_spec  # conftest: the fixtures both Qwen3 test files use


@pytest.fixture
def converted(qwen3_converted):
    return qwen3_converted  # conftest: each fixture converted once per run


@pytest.mark.parametrize("scanned", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("name", list(FIXTURES))
def test_convert_writes_what_to_maxtext_writes(name, scanned, converted, reference_025):
    spec = spec_of(name)
    theirs = reference_025.to_maxtext(checkpoint(name), spec.maxtext_name, scanned=scanned)
    ours = converted(name) / ITEMS[KINDS[scanned]]
    n = assert_same_checkpoint(ours, theirs, step_dir=True)
    per_layer = sum(r.per_layer for r in qwen3.rules(spec))
    assert n == 1 + len(qwen3.rules(spec)) + (0 if scanned else (spec.n_layers - 1) * per_layer)  # step + leaves


@pytest.mark.parametrize("name,mlp", [("qwen3-dense", "ffn 96,"), ("qwen3-moe", "8 experts of 32, 2 per token,")])
def test_the_model_line_names_the_feed_forward_the_model_has(name, mlp, converted):
    """An MoE model's log line gives its experts, not config.json's dense intermediate_size (96, unused)."""
    log = (converted(name).parent / "convert.log").read_text()
    line = next(ln for ln in log.splitlines() if f"Model {spec_of(name).maxtext_name}:" in ln)
    assert mlp in line, line


@pytest.mark.parametrize("name", ["qwen3-moe"])
def test_maxtext_serves_rayconvs_unscanned_output_as_its_own(name, converted, reference_025):
    """MaxText 0.2.5's MaxEngine loads rayconv's unscanned output; its logits equal those of to_maxtext's output.
    The MoE fixture only (two MaxEngine runs, ~65 s): the dense outputs' leaves and tree are bit-equal to
    to_maxtext's above, and the MoE model exercises every rule the dense one has plus the experts and router."""
    spec = spec_of(name)
    theirs = reference_025.to_maxtext(checkpoint(name), spec.maxtext_name, scanned=False)
    ours = converted(name) / ITEMS["unscanned"]
    a = reference_025.logits_hf(checkpoint(name), spec.maxtext_name, ours, "unscanned")
    b = reference_025.logits_hf(checkpoint(name), spec.maxtext_name, theirs, "unscanned")
    assert a.shape == (len(a), spec.vocab_size) and np.isfinite(a).all()
    assert np.array_equal(a, b)


def _convert_in_process(src: Path, out: Path, budget: int):
    from rayconv.engine.driver import convert
    from rayconv.job import ConvertOptions, make_plan, open_checkpoint
    from rayconv.source.checkpoint import list_input

    options = ConvertOptions(files=list_input(str(src)), input_display=str(src), input_directory=str(src),
                             output=str(out), executor="local", progress=False, piece_budget=budget,
                             unit_budget=4 * budget)
    convert(options)
    return make_plan(open_checkpoint(options), options)


@pytest.mark.parametrize("budget,experts_per_piece,row_blocks", [(8192, 2, False), (2048, 1, True)])
def test_expert_pieces_hold_at_most_the_budget_and_give_the_same_bytes(budget, experts_per_piece, row_blocks,
                                                                        tmp_path, converted):
    """A small piece budget cuts the expert tensors into (expert range × row block) pieces of one layer — two
    experts' whole tensors (4 KiB each) at 8 KiB, half an expert at 2 KiB — and the outputs are the same bytes."""
    src = checkpoint("qwen3-moe")
    spec = spec_of("qwen3-moe")
    plan = _convert_in_process(src, tmp_path / "out", budget)
    expert_rules = {i for i, r in enumerate(plan.rules) if mapping.per_expert(r)}
    assert len(expert_rules) == 3
    pieces = [p for u in plan.units for p in u.pieces]
    assert all(p.experts is None for p in pieces if p.rule not in expert_rules)
    for ri in expert_rules:
        g_rows = mapping.global_shape(plan.rules[ri], spec)[0]
        mine = [p for p in pieces if p.rule == ri]
        assert {p.experts[1] - p.experts[0] for p in mine} == {experts_per_piece}
        assert all(len(p.reads) == experts_per_piece and p.nbytes <= budget for p in mine)
        assert any(p.row1 - p.row0 < g_rows for p in mine) == row_blocks
        # every row of every expert of every layer exactly once
        covered = sorted((p.layer, e, r) for p in mine for e in range(*p.experts) for r in range(p.row0, p.row1))
        assert covered == [(layer, e, r) for layer in range(spec.n_layers) for e in range(spec.n_experts)
                           for r in range(g_rows)]
    assert output_leaves(tmp_path / "out", ("scanned", "unscanned")) == output_leaves(converted("qwen3-moe"),
                                                                                     ("scanned", "unscanned"))


def _variant(tmp_path: Path, name: str, **changes) -> Path:
    """A copy of fixture ``name`` whose config.json has ``changes`` (None: the key removed)."""
    src, dst = checkpoint(name), tmp_path / f"{name}-variant"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("name,changes,needle", [
    ("qwen3-dense", {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
     "model_type 'qwen2' is not a model rayconv converts"),
    ("qwen3-moe", {"norm_topk_prob": False}, "norm_topk_prob is False"),
    ("qwen3-moe", {"mlp_only_layers": [1]}, "mlp_only_layers [1]"),
    ("qwen3-dense", {"use_sliding_window": True}, "use_sliding_window is set"),
])
def test_unknown_families_and_unsupported_variants_are_one_line(name, changes, needle, tmp_path):
    out = tmp_path / "out"
    result = run_convert_cli("--input_directory", str(_variant(tmp_path, name, **changes)), "--output_directory",
                             str(out))
    assert_one_line(result, needle, out)


EXPERT = "model.layers.0.mlp.experts.3.gate_proj.weight"


def _damage_expert(src: Path, case: str) -> None:
    """Rewrite the file holding :data:`EXPERT` (and the index) with that expert gone, doubled or reshaped."""
    from safetensors.numpy import load_file, save_file

    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    path = src / index["weight_map"][EXPERT]
    tensors = load_file(str(path))
    if case == "missing":
        del tensors[EXPERT], index["weight_map"][EXPERT]
    elif case == "beyond num_experts":  # an expert 8 of 8 (0…7), in the file and the index
        tensors[EXPERT.replace(".3.", ".8.")] = tensors[EXPERT]
        index["weight_map"][EXPERT.replace(".3.", ".8.")] = path.name
    else:
        tensors[EXPERT] = tensors[EXPERT][:16]
    save_file(tensors, str(path), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("case,needle", [
    ("missing", f"has no tensor {EXPERT}"),
    ("beyond num_experts", "holds unexpected tensor model.layers.0.mlp.experts.8.gate_proj.weight"),
    ("wrong shape", f"{EXPERT} has shape [16, 64], but config.json implies [32, 64]"),
])
def test_one_experts_tensor_gone_extra_or_misshapen_is_one_line(case, needle, tmp_path):
    """Every expert of every layer is checked against config.json, as the dense tensors are, before anything is
    written."""
    src = _variant(tmp_path, "qwen3-moe")
    _damage_expert(src, case)
    out = tmp_path / "out"
    result = run_convert_cli("--input_directory", str(src), "--output_directory", str(out))
    assert_one_line(result, needle, out)
    assert not out.exists() or not any(out.iterdir())


def test_quantized_output_is_refused_for_qwen3_in_one_line(tmp_path):
    out = tmp_path / "out"
    result = run_convert_cli("--input_directory", str(checkpoint("qwen3-moe")), "--output_directory", str(out),
                             "--quantize_type", "int8", "--quantize_weights", "True")
    assert_one_line(result, "MaxText 0.2.5 writes no quantized Qwen3 checkpoint", out)


def test_spec_json_round_trips_as_its_familys_class():
    """plan.json's spec reads back as the family's spec class; a Llama spec's JSON is unchanged (fingerprints)."""
    from rayconv import families
    from rayconv.models import ModelSpec

    spec = spec_of("qwen3-moe")
    assert families.spec_from_json(json.loads(json.dumps(spec.to_json()))) == spec
    llama = ModelSpec("llama-3.1", "llama3.1-8b", 4096, 32, 32, 8, 8, 128256, 14336, 1e-5, 5e5, True, 1)
    assert set(llama.to_json()) == {f.name for f in dataclasses.fields(ModelSpec)}
    assert families.spec_from_json(llama.to_json()) == llama and type(families.spec_from_json(llama.to_json())) is \
        ModelSpec


def _params(dim, layers, heads, kv, experts, width, vocab=151936, head_dim=128) -> int:
    """Qwen3 MoE parameter count from its dims (untied): embedding + logits + final norm + per layer attention,
    QK-norms, two norms, router and experts."""
    attention = dim * head_dim * (2 * heads + 2 * kv) + 2 * head_dim + 2 * dim
    return 2 * vocab * dim + dim + layers * (attention + experts * dim + experts * 3 * dim * width)


@pytest.mark.parametrize("model_path,dims", [
    ("qwen3-235b-a22b", (4096, 94, 64, 4, 128, 1536)),
    ("Qwen/Qwen3-Coder-480B-A35B-Instruct", (6144, 62, 96, 8, 160, 2560)),
])
def test_plan_simulate_prints_pieces_memory_and_time_for_the_large_moe_models(model_path, dims):
    from helpers import run_cli

    result = run_cli("plan", "--simulate", "--json", "--model_path", model_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    plan = report["plan"]
    assert plan["maxtext_layout"] == "to_maxtext" and plan["outputs"] == ["scanned", "unscanned"]
    assert plan["input_bytes"] == 2 * _params(*dims)  # every tensor of the published model, read once
    assert plan["largest_piece_bytes"] <= report["piece_budget_bytes"]  # 4.8-13 GB of experts per layer, cut
    assert report["peak_memory_per_worker_bytes"] <= report["worker_memory_budget_gb"] * (1 << 30)
    assert plan["pieces"] > dims[1] * 3 * dims[4] // 4 and all(e["estimated_seconds"] > 0 for e in report["estimates"])
    table = run_cli("plan", "--simulate", "--model_path", model_path)
    assert table.returncode == 0 and "units / pieces" in table.stdout and "memory per worker" in table.stdout
    assert "estimated wall time" in table.stdout


def test_qwen3_from_gs_input(tmp_path, fake_gcs, gcs_prefix, converted):
    """The MoE fixture in a (fake) bucket converts to the same bytes as from a directory."""
    src = checkpoint("qwen3-moe")
    bucket_src = gcs_prefix.join("Qwen3-MoE-tiny")
    for f in sorted(src.iterdir()):
        bucket_src.write_bytes(f.name, f.read_bytes())
    out = tmp_path / "out"
    result = run_convert_cli("--input_directory", bucket_src.uri, "--output_directory", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    kinds = ("scanned", "unscanned")
    assert output_leaves(out, kinds) == output_leaves(converted("qwen3-moe"), kinds)


@pytest.mark.parametrize("name", list(FIXTURES))
def test_rayconv_verify_checks_a_qwen3_output_against_its_source(name, converted):
    from helpers import run_cli

    result = run_cli("verify", str(checkpoint(name)), str(converted(name)))
    assert result.returncode == 0 and "identical to the mapping" in result.stdout, result.stderr[-2000:]
