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

from conftest import MODELS, run_convert, synthetic_checkpoint
from helpers import assert_same_leaves, assert_same_tree_metadata

from rayconv.synthetic import SyntheticModel

#: Two shards (so wo/w2, split on their input axis, have their zero channel in every shard) and llama-3's rope
#: permutation of the query/key rows; one all-zero output channel in every quantized kernel (issue 21 #12).
ZERO_CHANNEL = SyntheticModel(family="llama-3", dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512,
                              multiple_of=64, n_shards=2, seed=6, zero_channel=True)


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


def _orbax_restore(path):
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer().restore(str(path))


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, prefix + (str(key),))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from _flatten(value, prefix + (str(index),))
    elif tree is not None:
        yield "/".join(prefix), tree


@pytest.mark.parametrize("subdir", ["bf16/scanned/0/items", "bf16/unscanned/checkpoints/0/items", "int8"])
def test_plain_orbax_restores_the_whole_tree(subdir, converted):
    """No abstract tree, no shardings: Orbax alone restores every leaf, step included."""
    from reference import read_leaves

    path = converted("llama31-405b-mp16") / subdir
    restored = {k: np.asarray(v) for k, v in _flatten(_orbax_restore(path))}
    stored = read_leaves(path)
    assert sorted(restored) == sorted(stored)
    for key, value in stored.items():
        assert restored[key].dtype == value.dtype and restored[key].tobytes() == value.tobytes(), key
    if subdir != "int8":
        assert int(restored["step"]) == 0


def test_all_zero_chunks_are_stored(tmp_path, ray_session):
    """Orbax restores without filling missing chunks, so chunks equal to the fill value must exist."""
    import shutil

    import torch

    model, descriptor = MODELS["llama31-mp8"]
    src = tmp_path / "src"
    shutil.copytree(synthetic_checkpoint(model), src)
    for shard in range(model.n_shards):
        path = src / f"consolidated.{shard:02d}.pth"
        state = torch.load(path, weights_only=True)
        state["layers.1.attention.wq.weight"].zero_()
        torch.save(state, path)
    run_convert(src, tmp_path / "out", model_name=model.family, kinds=("scanned", "unscanned", "int8"),
                quantize_type="int8")
    tree = _orbax_restore(tmp_path / "out/bf16/unscanned/checkpoints/0/items")
    assert not np.asarray(tree["params"]["params"]["decoder"]["layers_1"]["self_attention"]["query"]["kernel"]).any()
    q = _orbax_restore(tmp_path / "out/int8")["params"]["aqt"]["decoder"]["layers_1"]["self_attention"]["query"]
    assert not np.asarray(q["AqtDotGeneral_0"]["qrhs"]["frozen"]["qvalue"]).any()
    # every channel is all-zero: AQT takes absmax 0 as 1, so each scale is bf16(1 / 127.5)
    scale = np.asarray(q["AqtDotGeneral_0"]["qrhs"]["frozen"]["scale"][0])
    assert scale.shape == (1, model.n_heads, model.head_dim)
    assert (scale == np.float32(1 / 127.5).astype(scale.dtype)).all()


def test_int8_all_zero_channel_scales_equal_maxtexts(tmp_path, reference):
    """AQT's scale for an all-zero channel (absmax 0 taken as 1) and its qvalues, bit-equal to MaxText 0.2.4's
    load_and_quantize_checkpoint on a checkpoint where every quantized kernel has such a channel."""
    from reference import read_leaves

    model = ZERO_CHANNEL
    src = synthetic_checkpoint(model)
    theirs = reference.quantized(model, src, quant="int8")
    run_convert(src, tmp_path / "out", model_name=model.family, kinds=("int8",), quantize_type="int8",
                executor="local")
    # MaxText's own output has what this test is about: a channel whose qvalues are all zero in every kernel
    # (a channel with any nonzero weight has a qvalue of +-127). Scales keep the kernel's rank with the
    # contraction axes at 1, which names those axes.
    leaves = read_leaves(theirs)
    qvalues = [key for key in leaves if key.endswith("/qvalue")]
    assert len(qvalues) == 7 * model.n_layers
    for key in qvalues:
        q, scale = leaves[key], leaves[key.removesuffix("qvalue") + "scale/0"]
        contraction = tuple(axis for axis, n in enumerate(scale.shape) if n == 1 and q.shape[axis] > 1)
        assert contraction and not np.any(q, axis=contraction).all(), key
    assert assert_same_leaves(tmp_path / "out/int8", theirs) == 3 + (2 + 7 * 2) * model.n_layers
