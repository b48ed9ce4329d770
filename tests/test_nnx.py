"""``--maxtext_layout nnx``: bit-equal to what MaxText 0.2.5 writes with default flags, and served by it.

For two shapes (the 405B MP16 layout and a one-shard llama-3) rayconv converts once with the nnx layout and every
output is compared with MaxText 0.2.5's own chain run on the same shards: ``llama_or_mistral_ckpt`` (scanned),
``generate_param_only_checkpoint`` (unscanned NNX decode tree) and ``maxtext.utils.layerwise_quantization`` (NNX
int8). Every leaf must be bit-equal, the tree and ``_METADATA`` equal (write_shape aside: it is the chunking, which
follows MaxText's simulated devices there and rayconv's pieces here), and ``_CHECKPOINT_METADATA`` equal but for
its two timestamps. Then 0.2.5's MaxEngine, default flags, serves rayconv's unscanned and int8 outputs with logits
array-equal to those of 0.2.5's own outputs. The rest checks the flags, the log line and ``rayconv verify`` without
MaxText. Nothing is skipped: a missing 0.2.5 overlay fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import MODELS, run_convert, synthetic_checkpoint
from helpers import assert_same_checkpoint, run_cli

SHAPES = ("llama31-405b-mp16", "llama3-mp1")
SERVED = "llama31-405b-mp16"
OUTPUTS = {"scanned": "bf16/scanned/0/items", "unscanned": "bf16/unscanned/checkpoints/0/items", "int8": "int8"}


@pytest.fixture(scope="session")
def converted_nnx(tmp_path_factory):
    """rayconv output per model with --maxtext_layout nnx: one local pass writing scanned, unscanned and int8
    (the layout is a matter of paths and JSON, not of Ray; the linen parity tests run through Ray)."""
    results = {}

    def get(name: str) -> Path:
        if name not in results:
            model, descriptor = MODELS[name]
            out = tmp_path_factory.mktemp(f"nnx-{name}")
            run_convert(synthetic_checkpoint(model), out, model_name=model.family, model_path=descriptor,
                        kinds=("scanned", "unscanned", "int8"), quantize_type="int8", executor="local",
                        maxtext_layout="nnx")
            results[name] = out
        return results[name]

    return get


@pytest.mark.parametrize("name", SHAPES)
def test_nnx_scanned_equals_maxtext_025_llama_or_mistral_ckpt(name, converted_nnx, reference_025):
    model, _ = MODELS[name]
    theirs = reference_025.scanned(model, synthetic_checkpoint(model))
    assert assert_same_checkpoint(converted_nnx(name) / OUTPUTS["scanned"], theirs, step_dir=True) == 13


@pytest.mark.parametrize("name", SHAPES)
def test_nnx_unscanned_equals_maxtext_025_generate_param_only_checkpoint(name, converted_nnx, reference_025):
    model, _ = MODELS[name]
    theirs = reference_025.unscanned(model, synthetic_checkpoint(model))
    ours = converted_nnx(name) / OUTPUTS["unscanned"]
    assert assert_same_checkpoint(ours, theirs, step_dir=True) == 3 + 9 * model.n_layers
    assert "decoder/layers_0/self_attention/value/kernel/value" in _leaf_names(ours)


@pytest.mark.parametrize("name", SHAPES)
def test_nnx_int8_equals_maxtext_025_layerwise_quantization(name, converted_nnx, reference_025):
    model, _ = MODELS[name]
    theirs = reference_025.quantized(model, synthetic_checkpoint(model), quant="int8")
    ours = converted_nnx(name) / OUTPUTS["int8"]
    assert assert_same_checkpoint(ours, theirs, step_dir=False) == 3 + (2 + 7 * 2) * model.n_layers
    assert "decoder/layers_0/mlp/wo/AqtDotGeneral_0/qrhs/frozen/value/scale/0" in _leaf_names(ours)


def _leaf_names(item: Path) -> set[str]:
    from reference import metadata_tree

    return set(metadata_tree(item))


@pytest.mark.parametrize("kind", ["scanned", "unscanned", "int8"])
def test_maxtext_025_serves_nnx_outputs_with_its_own_logits(kind, converted_nnx, reference_025):
    """MaxText 0.2.5's MaxEngine, default flags (plus scan_layers=false for the unscanned and int8 outputs, as for
    its own), serves rayconv's nnx checkpoint with exactly the logits of 0.2.5's own checkpoint."""
    model, _ = MODELS[SERVED]
    src = synthetic_checkpoint(model)
    theirs_path = {"scanned": reference_025.scanned, "unscanned": reference_025.unscanned,
                   "int8": reference_025.quantized}[kind](model, src)
    ours = reference_025.logits(model, converted_nnx(SERVED) / OUTPUTS[kind], kind)
    theirs = reference_025.logits(model, theirs_path, kind)
    assert ours.shape == (8, model.vocab_size) and np.isfinite(ours).all() and np.abs(ours).max() > 0
    np.testing.assert_array_equal(ours, theirs)


def test_maxtext_025_restores_every_int8_leaf_with_rayconvs_bytes(converted_nnx, reference_025):
    """0.2.5's MaxEngine (serve mode) takes every stored int8 array, and nothing of its model from elsewhere
    (load_check on 0.2.5's own output, cached; rayconv's is bit-equal to it, checked here leaf by leaf)."""
    from reference import leaves_summary

    model, _ = MODELS[SERVED]
    summary = reference_025.load_check(model, reference_025.quantized(model, synthetic_checkpoint(model)), "int8")
    ours = leaves_summary(converted_nnx(SERVED) / OUTPUTS["int8"], prefix=None)
    assert not summary["stored_only"] and sorted(summary["leaves"]) == sorted(ours)
    assert {k: v["sha256"] for k, v in summary["leaves"].items()} == {k: v["sha256"] for k, v in ours.items()}
    assert sum("/qrhs/frozen/value/" in k for k in ours) == 2 * 7 * model.n_layers


def test_maxtext_025_serves_the_linen_unscanned_output_too(tmp_path, reference_025):
    """The compatibility table's cross entry: 0.2.5 reads the classic unscanned tree (its from_pretrained tells
    ``params/params`` from NNX trees) with the logits of its own NNX checkpoint. (Its classic int8 tree it cannot
    read: that is why the nnx layout exists.)"""
    model, descriptor = MODELS[SERVED]
    src = synthetic_checkpoint(model)
    run_convert(src, tmp_path, model_path=descriptor, kinds=("unscanned",), executor="local")
    ours = reference_025.logits(model, tmp_path / OUTPUTS["unscanned"], "unscanned")
    np.testing.assert_array_equal(ours, reference_025.logits(model, reference_025.unscanned(model, src), "unscanned"))


# ---------------------------------------------------------------------------------------------------------------
# Without MaxText: flags, the log line, verify, resume safety


TINY = "llama3-mp1"


def test_inference_server_maxtext_selects_nnx_and_logs_which_maxtext_loads_it(tmp_path):
    model, _ = MODELS[TINY]
    src = str(synthetic_checkpoint(model))
    common = ("convert", "--no_progress", "--executor", "local", "--input_directory", src, "--model_name",
              model.family, "--quantize_type", "int8", "--quantize_weights", "True", "--skip_scanned")
    nnx = run_cli(*common, "--output_directory", str(tmp_path / "nnx"), "--inference_server", "maxtext")
    assert nnx.returncode == 0, nnx.stderr[-3000:]
    assert "MaxText >= 0.2.5 loads it" in nnx.stderr
    assert "('decoder', 'layers_0', 'mlp', 'wi_0', 'AqtDotGeneral_0', 'qrhs', 'frozen', 'value', 'qvalue')" in \
        json.loads((tmp_path / "nnx/int8/_METADATA").read_text())["tree_metadata"]

    linen = run_cli(*common, "--output_directory", str(tmp_path / "linen"))
    assert linen.returncode == 0, linen.stderr[-3000:]
    note = [line for line in linen.stderr.splitlines() if "classic (linen) AQT tree" in line]
    assert len(note) == 1 and "JetStream-MaxText" in note[0] and "--maxtext_layout nnx" in note[0], linen.stderr
    assert "('params', 'aqt', 'decoder', 'layers_0', 'mlp', 'wi_0', 'AqtDotGeneral_0', 'qrhs', 'frozen', 'qvalue')" \
        in json.loads((tmp_path / "linen/int8/_METADATA").read_text())["tree_metadata"]

    # --maxtext_layout wins over the server's default; an unknown server is one line, exit 1.
    forced = run_cli(*common, "--output_directory", str(tmp_path / "forced"), "--inference_server", "maxtext",
                  "--maxtext_layout", "linen")
    assert forced.returncode == 0 and "classic (linen) AQT tree" in forced.stderr, forced.stderr[-3000:]
    bad = run_cli(*common, "--output_directory", str(tmp_path / "bad"), "--inference_server", "vllm")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("rayconv: error: unsupported "
                                                                                 "--inference_server 'vllm'")

    # verify finds the layout each output has; asked for the other one, it names the first missing leaf.
    for layout in ("nnx", "linen"):
        ok = run_cli("verify", src, str(tmp_path / layout), "--model_name", model.family)
        assert ok.returncode == 0, ok.stderr[-3000:]
    wrong = run_cli("verify", src, str(tmp_path / "nnx"), "--model_name", model.family, "--maxtext_layout", "linen")
    assert wrong.returncode == 1 and "tree at" in wrong.stderr and "missing" in wrong.stderr, wrong.stderr[-2000:]


def test_layout_is_part_of_the_plan_fingerprint(tmp_path):
    """A linen run's receipts are never resumed into an nnx output (the units write other paths)."""
    from rayconv.job import ConvertOptions, make_plan, open_checkpoint
    from rayconv.source.checkpoint import list_input
    from rayconv.targets.maxtext_kinds import INT8, SCANNED, UNSCANNED

    model, _ = MODELS[TINY]
    src = str(synthetic_checkpoint(model))
    options = ConvertOptions(files=list_input(src), input_display=src, output=str(tmp_path), model_name=model.family,
                             kinds=("unscanned", "int8"), quantize_type="int8")
    checkpoint = open_checkpoint(options)
    linen = make_plan(checkpoint, options)
    nnx = make_plan(checkpoint, ConvertOptions(**{**options.__dict__, "maxtext_layout": "nnx"}))
    assert linen.fingerprint() != nnx.fingerprint()
    assert [a.shape for a in linen.arrays(INT8)] == [a.shape for a in nnx.arrays(INT8)]
    assert all(a.path[-1] == "value" for a in nnx.arrays(UNSCANNED))
    assert all(a.path[:2] == ("params", "params") for a in nnx.arrays(SCANNED))


def test_nnx_resume_after_a_crash_gives_the_same_checkpoint(tmp_path):
    """Rerunning an nnx conversion over a finished one (resume path) keeps the tree and every byte."""
    from reference import read_leaves

    model, _ = MODELS[TINY]
    src = synthetic_checkpoint(model)
    kwargs = dict(model_name=model.family, kinds=("unscanned", "int8"), quantize_type="int8", executor="local",
                  maxtext_layout="nnx")
    run_convert(src, tmp_path, **kwargs)
    before = {k: v.tobytes() for k, v in read_leaves(tmp_path / OUTPUTS["int8"]).items()}
    result = run_convert(src, tmp_path, **kwargs)
    assert result.units_run == 0
    assert {k: v.tobytes() for k, v in read_leaves(tmp_path / OUTPUTS["int8"]).items()} == before


@pytest.mark.parametrize("quant", ["int8w", "int4w"])
def test_weight_only_types_are_refused_for_nnx_in_one_line(quant, tmp_path):
    """MaxText 0.2.5 has no NNX writer or loader for intmp (measured: layerwise_quantization quantization=intmp
    fails in quantizations._get_mixed_precision_cfg, which reads Linen's module stack); rayconv refuses up front."""
    model, _ = MODELS[TINY]
    out = tmp_path / "out"
    result = run_cli("convert", "--no_progress", "--executor", "local", "--input_directory",
                  str(synthetic_checkpoint(model)), "--model_name", model.family, "--output_directory", str(out),
                  "--quantize_type", quant, "--quantize_weights", "True", "--maxtext_layout", "nnx")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"rayconv: error: --quantize_type {quant} has no --maxtext_layout nnx form: "
                                "MaxText 0.2.5 can neither write nor load"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not out.exists()


def test_reference_harness_keeps_versions_apart_and_fails_without_025(tmp_path, monkeypatch):
    """0.2.4 and 0.2.5 reference outputs never share a cache entry, and a missing 0.2.5 overlay is an error (the
    ``reference_025`` fixture turns it into a test failure, never a skip)."""
    from reference import MaxTextReference, ReferenceEnvMissing, child_env

    ref = MaxTextReference(tmp_path / "cache")
    ref025 = ref.with_maxtext("0.2.5")
    assert ref025.runs is ref.runs and ref025.cache_dir == ref.cache_dir
    key = {"model": {"dim": 1}, "scripts": "x"}
    assert ref._entry("unscanned", key) != ref025._entry("unscanned", key)
    assert ref025._entry("unscanned", key).name.startswith("unscanned-0.2.5-")
    assert child_env("0.2.5")["RAYCONV_MAXTEXT_LAYOUT"] == "nnx" and child_env()["RAYCONV_MAXTEXT_LAYOUT"] == "linen"
    ref025.check_available()  # the suite's own environment has it
    monkeypatch.setenv("RAYCONV_MAXTEXT_025_PATH", str(tmp_path / "missing"))
    with pytest.raises(ReferenceEnvMissing, match="maxtext 0.2.5 not found .*RAYCONV_MAXTEXT_025_PATH"):
        ref025.check_available()
