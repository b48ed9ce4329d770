"""The export plan at real widths, without a file: Llama 3.1 405B (``--model_name llama3.1-405b``) scanned and
unscanned, as leaf lists a MaxText checkpoint of it would have; and ``--dtype float32``.

The planner is pure (the checkpoint's leaf list in, pieces out), so a 405B checkpoint's description is enough to
prove the bounds: every piece fits a 1 GiB worker (the 4.2 GB embedding in row blocks), the pieces tile every
tensor's byte range exactly once, every gs:// file stays under GCS's compose limit, and the files are MaxText's.
"""

from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import ITEMS
from rayconv import families
from rayconv.errors import SpecError
from rayconv.exporting import model as models
from rayconv.exporting.plan import build_plan, piece_budget
from rayconv.source.orbax import Leaf, MaxTextCheckpoint
from rayconv.storage import Location
from rayconv.targets.safetensors_writer import MAX_PARTS


def described(model: models.ExportModel, scanned: bool, dtype: str = "bfloat16") -> MaxTextCheckpoint:
    """A checkpoint's description with the model's leaves (chunked in 8 along axis 0 of each, as Orbax may)."""
    leaves = {name: Leaf(name, ("params", "params", *name.split("/")), "params.params." + name.replace("/", "."),
                         shape, dtype, (max(1, shape[0] // 8),) + shape[1:])
              for name, shape in models.expected_leaves(model.spec, scanned).items()}
    return MaxTextCheckpoint(Location.parse("/nonexistent/items"), "linen", scanned, False, model.spec.n_layers,
                             leaves, ())


@pytest.mark.parametrize("scanned", [True, False], ids=["scanned", "unscanned"])
def test_405b_plan_fits_1gib_workers_and_tiles_every_tensor(scanned):
    model = models.from_model_name("llama3.1-405b")
    checkpoint = described(model, scanned)
    models.check_checkpoint(checkpoint, model)
    budget = piece_budget(1.0)
    plan = build_plan(checkpoint, model.spec, budget=budget, gcs=True)
    pieces = [p for u in plan.units for p in u.pieces]
    assert max(p.nbytes for p in pieces) <= budget
    embedding = [p for p in pieces if p.tensor == "model.embed_tokens.weight"]
    assert sum(p.nbytes for p in embedding) == 128256 * 16384 * 2 and len(embedding) >= 4.2e9 / budget
    spans: dict[str, list[tuple[int, int]]] = {}
    for piece in pieces:
        spans.setdefault(piece.file, []).append(piece.span)
    for file in plan.files.files:  # the pieces tile each file's data section, once
        ordered = sorted(spans[file.name])
        assert ordered[0][0] == len(file.header) and ordered[-1][1] == file.size
        assert all(a[1] == b[0] for a, b in zip(ordered, ordered[1:]))
        assert len(ordered) < MAX_PARTS - 1
    # 810 GB in MaxText's files of at most 3 GiB of data (or one larger tensor); 126 layers × 9 tensors + 3.
    assert len(plan.files.tensors) == 126 * 9 + 3 and math.isclose(plan.files.total_size, 810e9, rel_tol=0.01)
    assert all(f.size - len(f.header) <= 3 << 30 or len(f.tensors) == 1 for f in plan.files.files)
    # Regions: one layer of a scanned leaf (axis 1), whole heads of q/k/v.
    query = next(p for p in pieces if p.tensor == "model.layers.7.self_attn.q_proj.weight")
    assert query.leaf == ("decoder/layers/self_attention/query/kernel" if scanned
                          else "decoder/layers_7/self_attention/query/kernel")
    region = query.region[:1] + query.region[2:] if scanned else query.region
    assert (query.region[1] == (7, 8)) == scanned and region[0] == (0, 16384) and region[2] == (0, 128)
    assert (query.rows[1] - query.rows[0]) % 128 == 0 and query.rows[0] == region[1][0] * 128


def test_405b_model_name_is_maxtexts_config_with_llama31_rope():
    model = models.from_model_name("llama3.1-405b")
    config = json.loads(models.config_json(model, "bfloat16"))
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) == (
        16384, 126, 128, 8, 53248, 128256)
    assert config["rope_parameters"]["rope_type"] == "llama3" and config["architectures"] == ["LlamaForCausalLM"]
    for family in families.FAMILIES.values():  # every table entry is a model the family's reader accepts
        for name in family.hf_configs:
            assert models.from_model_name(name).spec.maxtext_name == name


def test_scanned_and_unscanned_told_apart_by_the_tree():
    """An unscanned description checked as it is, scanned leaves cannot pass for it: the tree decides, no flag."""
    model = models.from_model_name("llama3.1-8b")
    scanned = described(model, True)
    unscanned = described(model, False)
    models.check_checkpoint(scanned, model)
    models.check_checkpoint(unscanned, model)
    mixed = MaxTextCheckpoint(scanned.location, "linen", False, False, 32, scanned.leaves, ())
    with pytest.raises(SpecError, match="lacks decoder/layers_0/"):
        models.check_checkpoint(mixed, model)


def test_float32_export(tmp_path):
    """``--dtype float32``: MaxText's weight_dtype=float32 — leaves restored as float32 (exact from bf16), the
    query scaled in float32 and not rounded; the other tensors are the bf16 export's values, widened."""
    from conftest import MODELS, run_convert, synthetic_checkpoint
    from hf_checkpoints import hf_config
    from rayconv.exporting.driver import ExportOptions, export

    model = MODELS["llama31-mp8"][0]
    run_convert(synthetic_checkpoint(model), tmp_path / "mt", model_name=model.family, executor="local",
                kinds=("unscanned",), verify=False)
    hf_config(model).to_json_file(str(tmp_path / "config.json"))
    items = str(tmp_path / "mt" / ITEMS["unscanned"])
    for dtype in ("bfloat16", "float32"):
        export(ExportOptions(input=items, output=str(tmp_path / dtype), config=str(tmp_path / "config.json"),
                             dtype=dtype, executor="local", progress=False))
    bf16 = load_file(str(tmp_path / "bfloat16" / "model.safetensors"))
    f32 = load_file(str(tmp_path / "float32" / "model.safetensors"))
    assert json.loads((tmp_path / "float32" / "config.json").read_text())["dtype"] == "float32"
    for name, value in bf16.items():
        assert f32[name].dtype == np.float32 and f32[name].shape == value.shape, name
        if name.endswith("q_proj.weight"):
            assert np.array_equal(f32[name].astype(ml_dtypes.bfloat16).astype(np.float32), value.astype(np.float32))
            assert not np.array_equal(f32[name], value.astype(np.float32))  # not rounded to bf16
        else:
            assert np.array_equal(f32[name], value.astype(np.float32)), name


def test_max_shard_size_spellings():
    import click

    from rayconv.cli.flags import _size

    assert [_size(None, None, v) for v in ("3GiB", "500MB", "200KB", "1000000", "1.5 GiB")] == [
        3 << 30, 500 * 10 ** 6, 200 * 10 ** 3, 10 ** 6, 3 << 29]
    for bad in ("0", "-5MB", "3 parsecs", ""):
        with pytest.raises(click.BadParameter):
            _size(None, None, bad)
