"""Bit-equality with MaxText's own converters, and MaxText loading what rayconv writes.

For each synthetic shape, rayconv converts once (all outputs in one pass, through Ray) and every
leaf is compared byte for byte with the output of MaxText 0.2.4's scripts run on the same shards:
``llama_or_mistral_ckpt`` (scanned), ``generate_param_only_checkpoint`` (unscanned, classic layout)
and ``load_and_quantize_checkpoint`` (AQT int8). The tree metadata (paths, value types) must match
too. No test here is ever skipped: a missing reference environment fails.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import MODELS, synthetic_checkpoint

def assert_same_leaves(ours, theirs):
    from reference import read_leaves

    a, b = read_leaves(ours), read_leaves(theirs)
    assert sorted(a) == sorted(b), f"tree differs: only rayconv {sorted(set(a) - set(b))[:3]}, " \
                                   f"only MaxText {sorted(set(b) - set(a))[:3]}"
    for key in b:
        x, y = a[key], b[key]
        assert (x.dtype, x.shape) == (y.dtype, y.shape), key
        assert x.tobytes() == y.tobytes(), f"{key}: {np.mean(x.view(np.uint8) != y.view(np.uint8)):.4%} bytes differ"
    return len(b)


def assert_same_tree_metadata(ours, theirs):
    from reference import metadata_tree

    a, b = metadata_tree(ours), metadata_tree(theirs)
    assert sorted(a) == sorted(b)
    for key in b:
        assert a[key]["value_type"] == b[key]["value_type"], key
        assert a[key].get("skip_deserialize") == b[key].get("skip_deserialize"), key


@pytest.mark.parametrize("name", list(MODELS))
def test_scanned_bit_equal_to_llama_or_mistral_ckpt(name, converted, reference):
    model, _ = MODELS[name]
    theirs = reference.scanned(model, synthetic_checkpoint(model))
    ours = converted(name) / "bf16/scanned/0/items"
    assert assert_same_leaves(ours, theirs) == 13  # 12 params + step
    assert_same_tree_metadata(ours, theirs)
    assert (ours / "commit_success.txt").exists() and (ours.parent / "commit_success.txt").exists()


@pytest.mark.parametrize("name", ("llama3-mp1", "llama31-405b-mp16"))
def test_unscanned_bit_equal_to_generate_param_only_checkpoint(name, converted, reference):
    model, _ = MODELS[name]
    theirs = reference.unscanned(model, synthetic_checkpoint(model))
    ours = converted(name) / "bf16/unscanned/checkpoints/0/items"
    assert assert_same_leaves(ours, theirs) == 4 + 9 * model.n_layers
    assert_same_tree_metadata(ours, theirs)


@pytest.mark.parametrize("name", ("llama3-mp1", "llama31-405b-mp16"))
def test_int8_bit_equal_to_load_and_quantize_checkpoint(name, converted, reference):
    model, _ = MODELS[name]
    theirs = reference.quantized(model, synthetic_checkpoint(model), quant="int8")
    ours = converted(name) / "int8"
    assert assert_same_leaves(ours, theirs) == 3 + (2 + 7 * 2) * model.n_layers
    assert_same_tree_metadata(ours, theirs)


@pytest.mark.parametrize("kind,subdir", [("scanned", "bf16/scanned/0/items"),
                                         ("unscanned", "bf16/unscanned/checkpoints/0/items"),
                                         ("int8", "int8")])
def test_maxtext_loads_rayconv_output(kind, subdir, converted, reference):
    from reference import leaves_summary

    model, _ = MODELS["llama31-405b-mp16"]
    path = converted("llama31-405b-mp16") / subdir
    summary = reference.load_check(model, path, kind)
    ours = leaves_summary(path)
    # MaxText restored every stored leaf, with the values rayconv wrote.
    restored = {k: v for k, v in summary["leaves"].items()}
    assert restored, summary
    for key, leaf in restored.items():
        assert key in ours, key
        assert leaf["sha256"] == ours[key]["sha256"], key
