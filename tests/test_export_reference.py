"""What MaxText 0.2.5's ``to_huggingface.py`` writes for checkpoints rayconv wrote: the export's standard.

rayconv converts the synthetic Llama 3.1 (head_dim 32: sqrt is no power of two, so the query scaling rounds) in
both tree layouts and both forms; MaxText's exporter (tools/maxtext_ref/to_hf.py) turns each into HF safetensors.
The tests state, and check numerically against that output: the HF names, dtypes and shapes, the inverse transform
of every tensor (:func:`expected_export`, computed here in numpy from the stored MaxText leaves, equal bit for
bit), the round trip against the original HF weights (exact except the query kernel), the file split and index
(our safetensors target's plan and writer reproduce MaxText's files byte for byte) and config.json.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import MODELS, run_convert, synthetic_checkpoint
from hf_checkpoints import hf_state
from helpers import ITEMS
from reference import read_leaves
from rayconv.storage import Location
from rayconv.targets import safetensors_writer as writer
from rayconv.targets.safetensors_files import INDEX_FILE, SINGLE_FILE, plan_files

MODEL = MODELS["llama31-mp8"][0]
BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def rayconv_outputs(tmp_path_factory):
    """{layout: output directory} of rayconv's scanned + unscanned conversion (local executor, ~1 s each)."""
    outs = {}
    for layout in ("linen", "nnx"):
        out = tmp_path_factory.mktemp(f"export-{layout}")
        run_convert(synthetic_checkpoint(MODEL), out, model_name=MODEL.family, executor="local",
                    kinds=("scanned", "unscanned"), maxtext_layout=layout)
        outs[layout] = out
    return outs


def _leaf(leaves: dict[str, np.ndarray], *parts: str) -> np.ndarray:
    """A leaf by its MaxText path in either tree (``params/params/…`` or NNX ``…/value``)."""
    for key in ("params/params/" + "/".join(parts), "/".join(parts) + "/value"):
        if key in leaves:
            return leaves[key]
    raise KeyError("/".join(parts))


def rope_to_halves(kernel: np.ndarray) -> np.ndarray:
    """MaxText's interleaved rope pairs (Meta's order) → HF's half-split order, on the head_dim axis."""
    return np.concatenate([kernel[..., ::2], kernel[..., 1::2]], axis=-1)


def expected_export(leaves: dict[str, np.ndarray], n_layers: int, head_dim: int, scanned: bool) -> dict[str, np.ndarray]:
    """The inverse transform, per HF tensor, from the stored MaxText leaves (all bf16)."""
    def layer(i: int, *parts: str) -> np.ndarray:
        if scanned:
            return np.take(_leaf(leaves, "decoder", "layers", *parts), i, axis=1)  # param_scan_axis 1, norms too
        return _leaf(leaves, "decoder", f"layers_{i}", *parts)

    def kernel_2d(kernel: np.ndarray, in_features: int) -> np.ndarray:
        """``reshape_kernel``: MaxText [in, …] → HF [out, in] (reshape to [in, out], transpose)."""
        return np.ascontiguousarray(kernel.reshape(in_features, -1).T)

    emb = _leaf(leaves, "token_embedder", "embedding")
    dim = emb.shape[1]
    out = {"model.embed_tokens.weight": emb, "model.norm.weight": _leaf(leaves, "decoder", "decoder_norm", "scale"),
           "lm_head.weight": kernel_2d(_leaf(leaves, "decoder", "logits_dense", "kernel"), dim)}
    scale = np.float32(np.sqrt(head_dim))
    for i in range(n_layers):
        p = f"model.layers.{i}."
        query = layer(i, "self_attention", "query", "kernel")
        query = (query.astype(np.float32) * scale).astype(BF16)  # float32 multiply, then RNE to bf16
        out[p + "self_attn.q_proj.weight"] = kernel_2d(rope_to_halves(query), dim)
        out[p + "self_attn.k_proj.weight"] = kernel_2d(rope_to_halves(layer(i, "self_attention", "key", "kernel")), dim)
        out[p + "self_attn.v_proj.weight"] = kernel_2d(layer(i, "self_attention", "value", "kernel"), dim)
        attn_out = layer(i, "self_attention", "out", "kernel")  # [H, D, E]
        out[p + "self_attn.o_proj.weight"] = kernel_2d(attn_out, attn_out.shape[0] * attn_out.shape[1])
        out[p + "mlp.gate_proj.weight"] = kernel_2d(layer(i, "mlp", "wi_0", "kernel"), dim)
        out[p + "mlp.up_proj.weight"] = kernel_2d(layer(i, "mlp", "wi_1", "kernel"), dim)
        wo = layer(i, "mlp", "wo", "kernel")
        out[p + "mlp.down_proj.weight"] = kernel_2d(wo, wo.shape[0])
        out[p + "input_layernorm.weight"] = layer(i, "pre_self_attention_layer_norm", "scale")
        out[p + "post_attention_layernorm.weight"] = layer(i, "post_self_attention_layer_norm", "scale")
    return out


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint16)


#: The forms whose MaxText export tests/test_export.py needs too (the reference runs are shared through the cache;
#: linen unscanned is compared there, split into files).
CASES = [("linen", "scanned"), ("nnx", "unscanned"), ("nnx", "scanned")]


@pytest.mark.parametrize("layout,kind", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_reference_export_is_the_inverse_transform(reference_025, rayconv_outputs, layout, kind):
    items = rayconv_outputs[layout] / ITEMS[kind]
    out = reference_025.to_huggingface(MODEL, items, scanned=kind == "scanned")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", SINGLE_FILE]  # no tokenizer, no generation config
    theirs = load_file(str(out / SINGLE_FILE))
    ours = expected_export(read_leaves(items), MODEL.n_layers, MODEL.head_dim, kind == "scanned")
    assert sorted(theirs) == sorted(ours) and len(ours) == 9 * MODEL.n_layers + 3
    for name, value in theirs.items():
        assert value.dtype == BF16 and value.shape == ours[name].shape, name
        assert np.array_equal(_bits(value), _bits(ours[name])), name
    # The round trip to the original HF weights: exact but for the query kernel (bf16 rounding on both ways).
    original = hf_state(MODEL)
    for name, value in theirs.items():
        same = np.array_equal(_bits(value), _bits(original[name]))
        assert same != name.endswith("q_proj.weight"), name
        if not same:
            ulps = np.abs(_bits(value).astype(np.int32) - _bits(original[name]).astype(np.int32))
            assert ulps.max() == 1 and 0.05 < (ulps > 0).mean() < 0.3, (name, ulps.max(), (ulps > 0).mean())


def test_reference_config_json(reference_025, rayconv_outputs):
    out = reference_025.to_huggingface(MODEL, rayconv_outputs["linen"] / ITEMS["scanned"], scanned=True)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert {k: config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                   "num_hidden_layers", "head_dim", "vocab_size")} == {
        "hidden_size": MODEL.dim, "intermediate_size": MODEL.ffn_dim, "num_attention_heads": MODEL.n_heads,
        "num_key_value_heads": MODEL.n_kv_heads, "num_hidden_layers": MODEL.n_layers, "head_dim": MODEL.head_dim,
        "vocab_size": MODEL.vocab_size}
    # Not from the checkpoint: llama3.1-8b's HF config (rope, eps, token ids, context length), and no dtype field.
    assert config["rope_parameters"] == {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                         "original_max_position_embeddings": 8192, "rope_theta": 500000.0,
                                         "rope_type": "llama3"}
    assert (config["rms_norm_eps"], config["max_position_embeddings"], config["bos_token_id"],
            config["eos_token_id"], config["tie_word_embeddings"]) == (1e-05, 131072, 128000, 128001, False)
    assert "dtype" not in config and "torch_dtype" not in config


@pytest.mark.parametrize("kind,max_shard_size", [("scanned", None), ("unscanned", 150_000)])
def test_our_files_equal_maxtexts(reference_025, rayconv_outputs, tmp_path, kind, max_shard_size):
    """The safetensors target's plan (style maxtext) and writer give MaxText's files and index, byte for byte
    (the two MaxText runs tests/test_export.py also compares with)."""
    out = reference_025.to_huggingface(MODEL, rayconv_outputs["linen"] / ITEMS[kind], scanned=kind == "scanned",
                                       max_shard_size=max_shard_size)
    files = sorted(out.glob("*.safetensors"))
    tensors = {k: v for f in files for k, v in load_file(str(f)).items()}
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    plan = plan_files([(n, v.dtype, v.shape) for n, v in tensors.items()], **kwargs)
    assert [f.name for f in plan.files] == [f.name for f in files]
    if max_shard_size is None:
        assert plan.index is None and not (out / INDEX_FILE).exists()
    else:
        assert len(files) > 2 and plan.index == (out / INDEX_FILE).read_bytes()
    directory = Location.parse(str(tmp_path))
    for file in plan.files:
        writer.create(directory, file)
        w = writer.open_writer(directory, file)
        regions = []
        for name in file.tensors:
            planned = plan.tensors[name]
            w.write(planned.start, tensors[name])
            regions.append((planned.start, planned.start + planned.nbytes))
        w.close()
        writer.finish(directory, file, regions)
        assert (tmp_path / file.name).read_bytes() == (out / file.name).read_bytes(), file.name


def test_reference_export_of_a_training_checkpoint(reference_025):
    """A float32 training checkpoint (params + optimizer state, maxtext 0.2.5's trainer) with weight_dtype=bfloat16:
    the params are restored as bf16 first (round to nearest even), then transformed as above; the optimizer state
    is not exported."""
    items = reference_025.train(MODEL, steps=2)
    out = reference_025.to_huggingface(MODEL, items, scanned=True)
    theirs = load_file(str(out / SINGLE_FILE))
    params = {k: v.astype(BF16) for k, v in read_leaves(items, prefix="params/params/").items()}
    assert params and all(v.dtype == np.float32 for v in read_leaves(items, prefix="params/params/").values())
    ours = expected_export(params, MODEL.n_layers, MODEL.head_dim, scanned=True)
    assert sorted(theirs) == sorted(ours)
    for name, value in theirs.items():
        assert value.dtype == BF16 and np.array_equal(_bits(value), _bits(ours[name])), name


@pytest.mark.parametrize("layout,kind", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_family_inverse_equals_maxtexts_export(reference_025, rayconv_outputs, layout, kind):
    """Every rule's ``Transform.invert`` (rayconv.families) with an HF-format spec gives MaxText's exported tensor."""
    import dataclasses

    from rayconv import families, mapping
    from rayconv.source.hf import HFModelSpec

    spec = families.resolve_spec(MODEL.params_json(), n_shards=1, vocab_size=MODEL.vocab_size,
                                 model_name=MODEL.family, descriptor=None)
    spec = HFModelSpec(**dict(dataclasses.asdict(spec), n_shards=1))
    items = rayconv_outputs[layout] / ITEMS[kind]
    theirs = load_file(str(reference_025.to_huggingface(MODEL, items, scanned=kind == "scanned") / SINGLE_FILE))
    leaves = read_leaves(items)
    checked = set()
    for rule in families.rules(spec):
        for layer in (range(MODEL.n_layers) if rule.per_layer else (None,)):
            parts = rule.target
            if layer is not None and kind == "unscanned":
                parts = tuple(f"layers_{layer}" if p == "layers" else p for p in parts)
            value = _leaf(leaves, *parts)
            if layer is not None and kind == "scanned":
                value = np.take(value, layer, axis=1)
            name = rule.source_key("hf", layer)
            ours = mapping.from_layer_block(rule, np.ascontiguousarray(value), spec)
            assert ours.dtype == BF16 and np.array_equal(_bits(ours), _bits(theirs[name])), name
            checked.add(name)
    assert checked == set(theirs)
