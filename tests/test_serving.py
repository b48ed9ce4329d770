"""What serving needs: the weight-only AQT variants, and MaxEngine logits from rayconv's checkpoints.

MaxEngine (JetStream's engine in MaxText) runs on CPU in the reference environment: it loads
rayconv's int8 checkpoint with ``quantization=int8 checkpoint_is_quantized=True`` and must produce
exactly the logits it produces from MaxText's own quantized checkpoint; the unscanned bf16
checkpoint must give the logits of the scanned one.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import MODELS, run_convert, synthetic_checkpoint
from helpers import assert_same_leaves, assert_same_tree_metadata

NAME = "llama31-405b-mp16"


@pytest.mark.parametrize("quant", ["int8w", "int4w"])
def test_weight_only_variants_bit_equal_to_maxtext_intmp(quant, tmp_path, reference, ray_session):
    model, descriptor = MODELS[NAME]
    src = synthetic_checkpoint(model)
    run_convert(src, tmp_path, model_path=descriptor, kinds=("int8",), quantize_type=quant)
    ours = tmp_path / quant
    theirs = reference.quantized(model, src, quant=quant)
    assert assert_same_leaves(ours, theirs) == 3 + (2 + 7 * 2) * model.n_layers
    assert_same_tree_metadata(ours, theirs)


def test_int8_logits_equal_maxtexts_quantized_checkpoint(converted, reference):
    model, _ = MODELS[NAME]
    ours = reference.logits(model, converted(NAME) / "int8", "int8")
    theirs = reference.logits(model, reference.quantized(model, synthetic_checkpoint(model), quant="int8"), "int8")
    assert ours.shape == (8, model.vocab_size) and np.isfinite(ours).all()
    np.testing.assert_array_equal(ours, theirs)
    # and int8 serving stays close to bf16 serving (a sanity bound, not parity)
    bf16 = reference.logits(model, converted(NAME) / "bf16/unscanned/checkpoints/0/items", "unscanned")
    assert np.corrcoef(ours.ravel(), bf16.ravel())[0, 1] > 0.99


def test_unscanned_logits_equal_scanned(converted, reference):
    """Each rayconv bf16 checkpoint serves exactly MaxText's logits for its own checkpoint; scanned and
    unscanned agree to bf16 rounding, exactly as far as MaxText's own two checkpoints agree."""
    model, _ = MODELS[NAME]
    src = synthetic_checkpoint(model)
    scanned = reference.logits(model, converted(NAME) / "bf16/scanned/0/items", "scanned")
    unscanned = reference.logits(model, converted(NAME) / "bf16/unscanned/checkpoints/0/items", "unscanned")
    np.testing.assert_array_equal(scanned, reference.logits(model, reference.scanned(model, src), "scanned"))
    np.testing.assert_array_equal(unscanned, reference.logits(model, reference.unscanned(model, src), "unscanned"))
    assert scanned.shape == (8, model.vocab_size) and np.abs(scanned).max() > 0
    # MaxEngine's scanned and unrolled graphs round bf16 activations differently: a few bf16 ulps.
    np.testing.assert_allclose(unscanned, scanned, rtol=0, atol=0.05)
    assert (unscanned.argmax(-1) == scanned.argmax(-1)).mean() >= 0.75


def test_serving_only_run_skips_scanned_and_logs_the_tutorial_lines(tmp_path, converted):
    from reference import read_leaves

    model, descriptor = MODELS[NAME]
    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu", RAY_USAGE_STATS_ENABLED="0")
    result = subprocess.run(
        [sys.executable, "-m", "rayconv.cli", "convert", "--no_progress", "--input_directory",
         str(synthetic_checkpoint(model)), "--output_directory", str(out), "--model_path", descriptor,
         "--quantize_type", "int8", "--quantize_weights", "True", "--skip_scanned"],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "bf16/scanned").exists()
    assert f"Completed unscanning checkpoint to {out}/bf16/unscanned/checkpoints/0/items" in result.stderr
    assert f"Completed quantizing model llama3.1-405b with int8 to {out}/int8" in result.stderr
    full = converted(NAME)
    for sub in ("bf16/unscanned/checkpoints/0/items", "int8"):
        a, b = read_leaves(out / sub), read_leaves(full / sub)
        assert {k: v.tobytes() for k, v in a.items()} == {k: v.tobytes() for k, v in b.items()}
