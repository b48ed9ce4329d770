"""Qwen3 as data (rayconv/families/qwen3.py) against MaxText 0.2.5's own to_maxtext.py, leaf by leaf, bit for bit.

The inputs are transformers-written checkpoints (tests/qwen3_checkpoints.py: a dense one with head_dim ≠ hidden/heads
and tied embeddings, an MoE one with 8 experts); the references are to_maxtext.py's scanned and unscanned outputs
for them (tools/maxtext_ref/to_maxtext_hf.py, cached). Each rule's transform applied to the HF tensors must give
every reference leaf exactly, no leaf more or less; every row block of a tensor (a range of experts for the expert
tensors) must land exactly on its region of the leaf; and ``invert`` must give the HF tensor back.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conftest import qwen3_checkpoint as checkpoint
from qwen3_checkpoints import FIXTURES, hf_tensors
from rayconv import mapping
from rayconv.errors import SpecError
from rayconv.families import qwen3
from reference import metadata_tree, read_leaves

V1_HANDLER = "orbax.checkpoint.experimental.v1._src.handlers.pytree_handler.PyTreeHandler"


def config(name: str) -> dict:
    return json.loads((checkpoint(name) / "config.json").read_text())


@pytest.fixture(scope="module")
def case(reference_025):
    """name → (spec, HF tensors, {scanned: reference items path})."""
    done = {}

    def get(name: str):
        if name not in done:
            spec = qwen3.spec_from_config(config(name))
            refs = {scanned: reference_025.to_maxtext(checkpoint(name), spec.maxtext_name, scanned=scanned)
                    for scanned in (True, False)}
            done[name] = spec, hf_tensors(checkpoint(name)), refs
        return done[name]

    return get


def source_of(rule: qwen3.Rule, spec: qwen3.Qwen3Spec, tensors: dict, layer: int | None) -> np.ndarray:
    """The rule's HF tensor for one layer; for an expert rule every expert's, stacked ``[experts, rows, cols]``."""
    if qwen3.per_expert(rule):
        return np.stack([tensors[rule.source_key("hf", layer, expert=e)] for e in range(spec.n_experts)])
    return tensors[rule.source_key("hf", layer)]


def per_layer_leaf(rule: qwen3.Rule, spec: qwen3.Qwen3Spec, tensors: dict, layer: int | None) -> np.ndarray:
    """The whole per-layer leaf from the HF tensors, through the rule's transform."""
    return rule.transform.apply(source_of(rule, spec, tensors, layer), spec)


def expected_leaves(spec: qwen3.Qwen3Spec, tensors: dict, scanned: bool) -> dict[str, np.ndarray]:
    out = {}
    for rule in qwen3.rules(spec):
        if not rule.per_layer:
            out["/".join(("params", "params") + rule.target)] = per_layer_leaf(rule, spec, tensors, None)
        elif scanned:
            out["/".join(("params", "params") + rule.target)] = np.stack(
                [per_layer_leaf(rule, spec, tensors, i) for i in range(spec.n_layers)], axis=1)
        else:
            for i in range(spec.n_layers):
                path = tuple(f"layers_{i}" if p == "layers" else p for p in rule.target)
                out["/".join(("params", "params") + path)] = per_layer_leaf(rule, spec, tensors, i)
    return out


def test_the_fixtures_are_transformers_multi_file_checkpoints():
    for name, fixture in FIXTURES.items():
        path = checkpoint(name)
        shards = sorted(p.name for p in path.glob("*.safetensors"))
        assert len(shards) >= 3 and (path / "model.safetensors.index.json").exists(), shards
        spec = qwen3.spec_from_config(config(name))
        tensors = hf_tensors(path)
        assert {k: v.shape for k, v in tensors.items()} == qwen3.source_tensors(spec)
        assert {str(v.dtype) for v in tensors.values()} == {"bfloat16"}
        assert (spec.dim, spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.vocab_size,
                spec.tie_embeddings, spec.n_experts, spec.experts_per_token, spec.moe_ffn_dim) == (
            fixture.hidden, fixture.layers, fixture.heads, fixture.kv_heads, fixture.head_dim, fixture.vocab,
            fixture.tie, fixture.experts, fixture.top_k, fixture.moe_intermediate)


@pytest.mark.parametrize("scanned", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("name", list(FIXTURES))
def test_rules_give_to_maxtext_leaves_bit_for_bit(name, scanned, case):
    spec, tensors, refs = case(name)
    theirs = read_leaves(refs[scanned], prefix="params/")
    ours = expected_leaves(spec, tensors, scanned)
    assert sorted(ours) == sorted(theirs)
    for path, leaf in theirs.items():
        assert ours[path].dtype == leaf.dtype and ours[path].shape == leaf.shape, path
        assert np.array_equal(ours[path].view(np.uint16), leaf.view(np.uint16)), path
    # every source tensor used once: nothing of the checkpoint is left out of the tree
    assert len(theirs) == len(qwen3.rules(spec)) + (0 if scanned else (spec.n_layers - 1) * sum(
        r.per_layer for r in qwen3.rules(spec)))


@pytest.mark.parametrize("scanned", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("name", list(FIXTURES))
def test_what_to_maxtext_writes_around_the_leaves(name, scanned, case):
    """The TrainState tree (step, empty opt_state), v1 handler, custom_metadata, chunks from 16 simulated devices."""
    _, _, refs = case(name)
    items = refs[scanned]
    step = json.loads((items.parent / "_CHECKPOINT_METADATA").read_text())
    assert step["item_handlers"] == {"items": V1_HANDLER}
    assert step["custom_metadata"] == {"scan_layers": scanned}
    meta = json.loads((items / "_METADATA").read_text())
    assert {k: v for k, v in meta.items() if k != "tree_metadata"} == {
        "use_ocdbt": True, "use_zarr3": True, "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
    tree = metadata_tree(items)
    assert tree["step"] == {"value_type": "scalar", "skip_deserialize": False}
    assert tree["opt_state"] == {"value_type": "Dict", "skip_deserialize": True}
    assert read_leaves(items, prefix="step")["step"] == 0
    # Chunks: shard_jax_weights splits axis 0 across the 16 devices if it divides, else axis 1; Orbax writes a
    # replicated array replica-parallel, split on its first axis that divides. Together: the first axis that does.
    for path, leaf in read_leaves(items, prefix="params/").items():
        chunk = list(leaf.shape)
        axis = next((i for i, n in enumerate(chunk) if n % 16 == 0), None)
        if axis is not None:
            chunk[axis] //= 16
        assert tree[path]["write_shape"] == chunk, path


@pytest.mark.parametrize("name", list(FIXTURES))
def test_row_blocks_land_on_their_region_and_invert(name, case):
    """A piece (rows of one tensor; for experts the same rows of a range of experts) fills exactly its region of
    the per-layer leaf, and invert gives the source rows back, bit for bit."""
    spec, tensors, _ = case(name)
    layer = spec.n_layers - 1
    for rule in qwen3.rules(spec):
        transform = rule.transform
        at = layer if rule.per_layer else None
        whole, source = per_layer_leaf(rule, spec, tensors, at), source_of(rule, spec, tensors, at)
        experts = [slice(1, 4), slice(6, 8)] if qwen3.per_expert(rule) else [slice(None)]
        rows = source.shape[-2] if source.ndim > 1 else source.shape[0]
        quantum = spec.head_dim if transform.per_head else 1
        cut = (rows // quantum // 2) * quantum or rows
        for e in experts:
            for r in (slice(0, cut), slice(cut, rows)) if transform.row_axis is not None else (slice(None),):
                block = source[e][..., r, :] if qwen3.per_expert(rule) else source[r]
                region = [slice(None)] * whole.ndim
                if qwen3.per_expert(rule):
                    region[qwen3.EXPERT_AXIS] = e
                if transform.row_axis is not None:
                    region[transform.row_axis] = slice(r.start // quantum, r.stop // quantum)
                got = transform.apply(block, spec)
                assert np.array_equal(got.view(np.uint16), whole[tuple(region)].view(np.uint16)), (rule.target, e, r)
                back = transform.invert(got, spec)
                assert back.shape == block.shape and np.array_equal(back.view(np.uint16), block.view(np.uint16))


def test_scanned_shape_puts_layers_second_for_every_leaf():
    assert mapping.scanned_shape((8, 64, 32), 3) == (8, 3, 64, 32)  # experts, layers, emb, moe_mlp
    assert mapping.scanned_shape((64,), 3) == (64, 3)


@pytest.mark.parametrize("change, needle", [
    ({"model_type": "llama"}, "model_type 'llama' is not a Qwen3 model"),
    ({"model_type": "qwen3_next"}, "is not a Qwen3 model"),
    ({"architectures": ["Qwen3ForSequenceClassification"]}, "architectures"),
    ({"decoder_sparse_step": 2}, "decoder_sparse_step 2"),
    ({"mlp_only_layers": [0]}, "mlp_only_layers [0]"),
    ({"norm_topk_prob": False}, "norm_topk_prob is False"),
    ({"num_local_experts": 1}, "num_local_experts 1 is out of range"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok 9 is out of range"),
    ({"moe_intermediate_size": None}, "moe_intermediate_size is null"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings with qwen3_moe"),
    ({"attention_bias": True}, "attention_bias is set"),
    ({"use_sliding_window": True}, "use_sliding_window is set"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ({"head_dim": 1.5}, "head_dim must be an integer"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config 'fp8'"),
])
def test_config_fields_maxtext_cannot_hold_are_refused_in_one_line(change, needle):
    bad = {**config("qwen3-moe"), **change}
    with pytest.raises(SpecError) as error:
        qwen3.spec_from_config(bad)
    message = str(error.value)
    assert needle in message and "\n" not in message, message


def test_num_experts_as_the_hub_spells_it_and_head_dim_default():
    hub = dict(config("qwen3-moe"))
    hub["num_experts"] = hub.pop("num_local_experts")
    assert qwen3.spec_from_config(hub) == qwen3.spec_from_config(config("qwen3-moe"))
    dense = {k: v for k, v in config("qwen3-dense").items() if k != "head_dim"}
    assert qwen3.spec_from_config(dense).head_dim == 64 // 4


#: MaxText 0.2.5's own HF configs (checkpoint_conversion/utils/hf_model_configs.py) of three of its Qwen3 models.
REAL = {
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
                       tie_word_embeddings=True, rope_theta=1e6),
    "qwen3-30b-a3b-base": dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48,
                               num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                               vocab_size=151936, tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8,
                               moe_intermediate_size=768, norm_topk_prob=True, decoder_sparse_step=1,
                               mlp_only_layers=[], rope_theta=1e6),
    "qwen3-235b-a22b": dict(model_type="qwen3_moe", hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
                            num_key_value_heads=4, head_dim=128, intermediate_size=12288, vocab_size=151936,
                            tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8,
                            moe_intermediate_size=1536, norm_topk_prob=True, rope_theta=5e6),
}


@pytest.mark.parametrize("name", list(REAL))
def test_published_sizes_get_their_maxtext_name(name):
    spec = qwen3.spec_from_config(REAL[name])
    assert spec.maxtext_name == name
    other_theta = dataclasses.replace(spec, rope_theta=123.0)
    assert qwen3.known_size(other_theta) is None


def test_fixture_dims_get_the_name_whose_settings_apply():
    assert qwen3.spec_from_config(config("qwen3-dense")).maxtext_name == "qwen3-0.6b"  # tied logits
    assert qwen3.spec_from_config({**config("qwen3-dense"), "tie_word_embeddings": False}).maxtext_name == "qwen3-8b"
    assert qwen3.spec_from_config(config("qwen3-moe")).maxtext_name == "qwen3-30b-a3b"


#: yml key → the spec field it must equal (MaxText's configs/models/<name>.yml against its HF config).
YML_FIELDS = {"base_emb_dim": "dim", "base_num_decoder_layers": "n_layers", "base_num_query_heads": "n_heads",
              "base_num_kv_heads": "n_kv_heads", "head_dim": "head_dim", "vocab_size": "vocab_size",
              "rope_max_timescale": "rope_theta", "normalization_layer_epsilon": "norm_eps"}


def test_sizes_are_maxtexts_own(reference_025):
    """Every MaxText 0.2.5 Qwen3 text model's own HF config reads to a spec with its yml's dims, named by a model
    whose yml is the same; every KnownSize is one of them; to_maxtext.py converts only those in HF_IDS too."""
    configs = {name: c for name, c in reference_025.model_configs("qwen3-").items()
               if c["hf"] and c["hf"].get("model_type") in qwen3.MODEL_TYPES}
    assert {k.name for k in qwen3.SIZES} <= set(configs) and len(configs) == 15
    # MaxText's own HF config of qwen3-4b-thinking-2507 is a copy of qwen3-4b's (rope_theta 1e6); its yml and the
    # Hub's config.json say 5e6. The yml is what MaxText runs, so the name follows the yml's theta.
    stale = {n for n, c in configs.items() if qwen3.spec_from_config(c["hf"]).rope_theta
             != c["yml"]["rope_max_timescale"]}
    assert stale == {"qwen3-4b-thinking-2507"}
    for name, c in configs.items():
        yml = c["yml"]
        spec = qwen3.spec_from_config({**c["hf"], "rope_theta": yml["rope_max_timescale"], "rope_parameters": None})
        assert {key: yml[key] for key in YML_FIELDS} == {key: getattr(spec, f) for key, f in YML_FIELDS.items()}, name
        assert spec.tie_embeddings == yml.get("logits_via_embedding", False), name
        mlp = spec.moe_ffn_dim if spec.moe else spec.ffn_dim
        assert (yml["base_mlp_dim"] if not spec.moe else yml["base_moe_mlp_dim"]) == mlp, name
        assert (yml.get("num_experts", 0), yml.get("num_experts_per_tok", 0)) == (spec.n_experts,
                                                                                 spec.experts_per_token), name
        assert yml["decoder_block"] == ("qwen3_moe" if spec.moe else "qwen3"), name
        assert configs[spec.maxtext_name]["yml"] == yml, (name, spec.maxtext_name)
    converts = {n for n, c in configs.items() if c["hf_ids"] and c["param_mapping"]}
    assert set(configs) - converts == {"qwen3-1.7b", "qwen3-1.7b-base", "qwen3-4b-base", "qwen3-8b-base",
                                       "qwen3-14b-base", "qwen3-480b-a35b"}


def test_the_family_seams_flags_are_checked_against_config_json():
    moe = config("qwen3-moe")
    assert qwen3.spec_from_config(moe, model_name="qwen3", kv_heads=2) == qwen3.spec_from_config(moe)
    for kwargs, needle in (({"model_name": "llama-3.1"}, "--model_name llama-3.1 disagrees with config.json"),
                           ({"kv_heads": 4}, "--num_kv_heads 4 disagrees with config.json (num_key_value_heads 2)")):
        with pytest.raises(SpecError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            qwen3.spec_from_config(moe, **kwargs)
    with pytest.raises(SpecError, match="not params.json"):
        qwen3.spec_from_params({"dim": 64})


@pytest.mark.parametrize("name", list(FIXTURES))
def test_the_planners_row_blocks_of_ordinary_rules_tile_their_leaf(name, case):
    """The generic planner helpers (plan.piece_rows, plan.block_region) on Qwen3's non-expert rules, router and
    QK-norm scales included: at a budget of 2 KiB every cuttable tensor is cut, and the pieces tile the leaf."""
    from rayconv import plan

    spec, tensors, _ = case(name)
    for rule in (r for r in qwen3.rules(spec) if not qwen3.per_expert(r)):
        at = spec.n_layers - 1 if rule.per_layer else None
        source, whole = source_of(rule, spec, tensors, at), per_layer_leaf(rule, spec, tensors, at)
        rows = plan.piece_rows(rule, spec, 2048)
        assert rows * source[0].nbytes <= 2048 or rows == mapping.row_quantum(rule, spec) or source.ndim == 1
        assert (rows < source.shape[0]) == (rule.transform.row_axis is not None and source.nbytes > 2048), rule.name
        filled = np.zeros(whole.shape, dtype=bool)
        for row0 in range(0, source.shape[0], rows):
            region = tuple(slice(a, b) for a, b in plan.block_region(rule, spec, row0, row0 + rows))
            got = mapping.to_layer_block(rule, source[row0:row0 + rows], spec)
            assert np.array_equal(got.view(np.uint16), whole[region].view(np.uint16)), (rule.name, row0)
            assert not filled[region].any()
            filled[region] = True
        assert filled.all(), rule.name
