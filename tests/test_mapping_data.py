"""The mapping tested as data, as MaxText's ``param_mapping_test`` tests its tables: no I/O, in seconds.

For every rule of every registered family (:mod:`rayconv.families`):

* G's shape and the per-layer shape, and ``apply`` against a numpy reference written here, independently of
  rayconv's kernels (plain transpose / reshape / rope permutation / float32 division), bit for bit on random bf16
  blocks, for the whole of G and for a row block (which must equal its ``block_region`` of the whole);
* ``invert(apply(x)) == x`` bit for bit (the query's scaling is exact where sqrt(head_dim) is a power of two;
  at head_dim 128 the measured bound is asserted);
* every chunk of every output array is written by exactly one piece of the plan (``plan.build_plan`` on simulated
  indexes), for small specs at several budgets and for the published 405B MP16 and Llama 2 7B at real widths.

The MaxText parity tests (tests/test_parity.py, tests/test_nnx.py) stay the end-to-end tier.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import zlib
from collections import Counter

import ml_dtypes
import numpy as np
import pytest

from rayconv import families, mapping
from rayconv.plan import Plan, block_region, build_plan
from rayconv.families import qwen3
from rayconv.simulated import simulated_checkpoint, simulated_hf_checkpoint
from rayconv.source.hf import HFModelSpec
from rayconv.targets.maxtext import MAXTEXT
from rayconv.targets.maxtext_kinds import OutputKind
from test_core import BUDGETS, SPECS, plan_of, spec_of

BF16 = np.dtype(ml_dtypes.bfloat16)


def hf(spec):
    """The same model read from a Hugging Face checkpoint: one shard, q/k rows half-split."""
    return HFModelSpec(**dict(dataclasses.asdict(spec), n_shards=1))


#: name → spec: head_dim 64 (llama-2 MHA, 7B-like), 16 (GQA) and 128 (405B-like), from Meta and HF files, each
#: rope order MaxText wants (half-split for llama-2/3, interleaved for 3.1/3.3).
DATA_SPECS = {
    "llama2-7b-like": spec_of("llama-2", dim=256, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=96, n_shards=2,
                              ffn_dim_multiplier=None),
    "llama3-gqa-hf": hf(spec_of("llama-3", dim=128, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=80, n_shards=1)),
    "llama31-gqa": spec_of("llama-3.1", dim=128, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=80, n_shards=2),
    "llama31-gqa-hf": hf(spec_of("llama-3.1", dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=80,
                                 n_shards=1)),
    "llama31-hd128": spec_of("llama-3.1", dim=256, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, n_shards=1),
    "llama3-hd128-hf": hf(spec_of("llama-3", dim=256, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=64,
                                  n_shards=1)),
    # Qwen3: head_dim ≠ dim/heads, tied (no logits kernel); MoE: 4 experts, untied.
    "qwen3-dense": qwen3.Qwen3Spec(maxtext_name="qwen3-0.6b", dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                   head_dim=32, ffn_dim=96, vocab_size=80, tie_embeddings=True, norm_eps=1e-6,
                                   rope_theta=1e6),
    "qwen3-moe": qwen3.Qwen3Spec(maxtext_name="qwen3-30b-a3b", dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                 head_dim=16, ffn_dim=0, vocab_size=80, tie_embeddings=False, norm_eps=1e-6,
                                 rope_theta=1e6, n_experts=4, experts_per_token=2, moe_ffn_dim=48),
}


# ------------------------------------------------------------------------------------------------
# The reference: what each transform does, in plain numpy


def maxtext_rope(spec) -> str:
    """MaxText's q/k rope layout per model: half-split for llama-2/3, Meta's interleaved pairs for llama-3.1/3.3."""
    return "half" if spec.family in ("llama-2", "llama-3") else "interleaved"


def stored_rope(spec) -> str:
    """Meta's .pth stores interleaved pairs; transformers' conversion half-split every head."""
    return "half" if isinstance(spec, HFModelSpec) else "interleaved"


def to_half(k):
    return np.concatenate([k[..., 0::2], k[..., 1::2]], axis=-1)


def to_interleaved(k):
    out = np.empty_like(k)
    half = k.shape[-1] // 2
    out[..., 0::2], out[..., 1::2] = k[..., :half], k[..., half:]
    return out


def ref_heads(g, spec, *, rope: bool):
    k = np.ascontiguousarray(g.T).reshape(g.shape[1], g.shape[0] // spec.head_dim, spec.head_dim)
    if rope and stored_rope(spec) != maxtext_rope(spec):
        k = to_half(k) if maxtext_rope(spec) == "half" else to_interleaved(k)
    return k


def ref_query(g, spec):
    root = np.float32(np.asarray(math.sqrt(spec.head_dim), dtype=BF16))  # llama_or_mistral_ckpt's bf16 sqrt
    return (ref_heads(g, spec, rope=True).astype(np.float32) / root).astype(BF16)


def ref_out(g, spec):
    return np.ascontiguousarray(g.T).reshape(spec.n_heads, spec.head_dim, g.shape[0])


#: Llama's transform name → (G's shape, the per-layer MaxText shape, the reference).
LLAMA_REFERENCE = {
    "embedding": (lambda s: (s.vocab_size, s.dim), lambda s: (s.vocab_size, s.dim), lambda g, s: g),
    "logits": (lambda s: (s.vocab_size, s.dim), lambda s: (s.dim, s.vocab_size), lambda g, s: g.T),
    "query": (lambda s: (s.n_heads * s.head_dim, s.dim), lambda s: (s.dim, s.n_heads, s.head_dim), ref_query),
    "key": (lambda s: (s.n_kv_heads * s.head_dim, s.dim), lambda s: (s.dim, s.n_kv_heads, s.head_dim),
            lambda g, s: ref_heads(g, s, rope=True)),
    "value": (lambda s: (s.n_kv_heads * s.head_dim, s.dim), lambda s: (s.dim, s.n_kv_heads, s.head_dim),
              lambda g, s: ref_heads(g, s, rope=False)),
    "out": (lambda s: (s.dim, s.n_heads * s.head_dim), lambda s: (s.n_heads, s.head_dim, s.dim), ref_out),
    "wi": (lambda s: (s.ffn_dim, s.dim), lambda s: (s.dim, s.ffn_dim), lambda g, s: g.T),
    "wo": (lambda s: (s.dim, s.ffn_dim), lambda s: (s.ffn_dim, s.dim), lambda g, s: g.T),
    "norm": (lambda s: (s.dim,), lambda s: (s.dim,), lambda g, s: g),
}


def ref_experts_t(g, spec):
    """[experts, rows, cols] → each expert's matrix transposed in its slot (param_mapping's reshape_expert_kernel)."""
    return np.ascontiguousarray(g.transpose(0, 2, 1))


def ref_qwen3_heads(g, spec):
    return np.ascontiguousarray(g.T).reshape(g.shape[1], g.shape[0] // spec.head_dim, spec.head_dim)


#: Qwen3's (param_mapping.py's reshape_kernel = x.T.reshape, no rope permutation, no query scaling). For an
#: ``{expert}`` rule G's shape is one expert's; the reference takes every expert's, stacked.
QWEN3_REFERENCE = {
    "embedding": LLAMA_REFERENCE["embedding"],
    "logits": LLAMA_REFERENCE["logits"],
    "query": (lambda s: (s.n_heads * s.head_dim, s.dim), lambda s: (s.dim, s.n_heads, s.head_dim), ref_qwen3_heads),
    "kv": (lambda s: (s.n_kv_heads * s.head_dim, s.dim), lambda s: (s.dim, s.n_kv_heads, s.head_dim),
           ref_qwen3_heads),
    "out": (lambda s: (s.dim, s.n_heads * s.head_dim), lambda s: (s.n_heads, s.head_dim, s.dim), ref_out),
    "wi": LLAMA_REFERENCE["wi"],
    "wo": LLAMA_REFERENCE["wo"],
    "norm": LLAMA_REFERENCE["norm"],
    "qk_norm": (lambda s: (s.head_dim,), lambda s: (s.head_dim,), lambda g, s: g),
    "router": (lambda s: (s.n_experts, s.dim), lambda s: (s.dim, s.n_experts), lambda g, s: g.T),
    "expert_wi": (lambda s: (s.moe_ffn_dim, s.dim), lambda s: (s.n_experts, s.dim, s.moe_ffn_dim), ref_experts_t),
    "expert_wo": (lambda s: (s.dim, s.moe_ffn_dim), lambda s: (s.n_experts, s.moe_ffn_dim, s.dim), ref_experts_t),
}
#: family → its transforms' references (the same transform name may mean different things in two families).
REFERENCES = {"llama": LLAMA_REFERENCE, "qwen3": QWEN3_REFERENCE}


def reference_of(spec, rule):
    return REFERENCES[families.family_of(spec).name][rule.transform.name]


def source_shape(spec, rule) -> tuple[int, ...]:
    """What ``apply`` takes for a whole layer: G, or for an ``{expert}`` rule every expert's G stacked."""
    g = mapping.global_shape(rule, spec)
    return ((spec.n_experts,) + g) if mapping.per_expert(rule) else g


def weights(rng, shape):
    """Trained-weight-like bf16 values (the query's scaling is only invertible away from over/underflow)."""
    return (rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(BF16)


def any_bits(rng, shape):
    """Any bf16 bit pattern, NaN and inf included: a permutation must move every one unchanged."""
    return rng.integers(0, 1 << 16, size=shape, dtype=np.uint16).view(BF16)


def bits(array) -> bytes:
    return np.ascontiguousarray(array).view(np.uint16).tobytes()


def all_rules():
    for name, spec in DATA_SPECS.items():
        for rule in families.rules(spec):
            yield pytest.param(spec, rule, id=f"{name}-{rule.name}")


def test_every_registered_family_is_tested():
    tested = {families.family_of(spec).name for spec in DATA_SPECS.values()}
    assert tested == set(families.FAMILIES) == set(REFERENCES)
    for family in families.FAMILIES.values():  # and every transform a family uses has a reference here
        names = {rule.transform.name for spec in DATA_SPECS.values() if families.family_of(spec) is family
                 for rule in family.rules(spec)}
        assert names <= set(REFERENCES[family.name]), names - set(REFERENCES[family.name])


@pytest.mark.parametrize("spec,rule", list(all_rules()))
def test_shapes_and_apply_equal_the_reference(spec, rule):
    g_shape, layer_shape, reference = reference_of(spec, rule)
    assert mapping.global_shape(rule, spec) == g_shape(spec)
    assert mapping.layer_shape(rule, spec) == layer_shape(spec)
    rng = np.random.default_rng(zlib.crc32(rule.name.encode()))
    shape = source_shape(spec, rule)
    g = weights(rng, shape) if rule.transform.name == "query" else any_bits(rng, shape)
    whole = mapping.to_layer_block(rule, g, spec)
    assert whole.dtype == BF16 and whole.shape == layer_shape(spec)
    assert bits(whole) == bits(reference(g, spec))
    if rule.transform.row_axis is None:
        return
    q = mapping.row_quantum(rule, spec)
    rows = g.shape[-2]
    row0, row1 = q, 3 * q if rows >= 3 * q else 2 * q
    if mapping.per_expert(rule):  # the same rows of experts [1, 3): a piece of an expert rule
        region = block_region(rule, spec, row0, row1, (1, 3))
        part = mapping.to_layer_block(rule, g[1:3, row0:row1], spec)
    else:
        region = block_region(rule, spec, row0, row1)
        part = mapping.to_layer_block(rule, g[row0:row1], spec)
    # Every transform is elementwise or a permutation (the query's division too), so a block equals its region.
    assert bits(part) == bits(whole[tuple(slice(a, b) for a, b in region)])


@pytest.mark.parametrize("spec,rule", list(all_rules()))
def test_invert_undoes_apply_bit_for_bit(spec, rule):
    rng = np.random.default_rng(zlib.crc32(rule.name.encode()) + 1)
    g_shape = source_shape(spec, rule)
    query = rule.transform.name == "query"
    g = weights(rng, g_shape) if query else any_bits(rng, g_shape)
    back = mapping.from_layer_block(rule, mapping.to_layer_block(rule, g, spec), spec)
    assert back.dtype == BF16 and back.shape == g.shape
    if query and spec.head_dim == 128:
        return  # sqrt(128) is no power of two: bounded below
    assert bits(back) == bits(g)
    if rule.transform.row_axis is not None:  # a row block of whole heads/rows comes back as itself too
        rows = slice(0, mapping.row_quantum(rule, spec))
        block = g[:, rows] if mapping.per_expert(rule) else g[rows]
        assert bits(mapping.from_layer_block(rule, mapping.to_layer_block(rule, block, spec), spec)) == bits(block)


def test_query_inverse_at_head_dim_128_is_within_one_ulp():
    """The forward divides by bf16(sqrt(128)) = 11.3125 (llama_or_mistral_ckpt), MaxText's to-HF hook multiplies
    by float32(sqrt(128)) = 11.3137...; the round trip moves a share of values by one bf16 step, never more."""
    spec = DATA_SPECS["llama31-hd128"]
    rule = next(r for r in families.rules(spec) if r.transform.name == "query")
    g = weights(np.random.default_rng(128), (spec.n_heads * spec.head_dim, spec.dim))
    back = mapping.from_layer_block(rule, mapping.to_layer_block(rule, g, spec), spec)
    ulps = np.abs(back.view(np.uint16).astype(np.int32) - g.view(np.uint16).astype(np.int32))
    assert ulps.max() == 1
    assert 0.10 < np.mean(ulps > 0) < 0.20  # measured: 14.7% of 1M normal weights


def test_query_inverse_is_maxtexts_to_hf_scaling():
    """invert's scaling is LLAMA31_MAXTEXT_TO_HF_PARAM_HOOK_FN's scale_query_layer(saving_to_hf=True)."""
    kernel = weights(np.random.default_rng(9), (64, 2, 128))
    want = (kernel.astype(np.float32) * np.dtype("float32").type(np.sqrt(128))).astype(kernel.dtype)
    assert bits(mapping.unscale_query(kernel, 128)) == bits(want)


# ------------------------------------------------------------------------------------------------
# Every chunk written exactly once


def chunk_writers(plan: Plan, kind: OutputKind) -> dict[tuple[str, ...], Counter]:
    """For every output array of ``kind``: how many pieces write each chunk (by chunk grid index)."""
    spec, rules = plan.spec, plan.rules
    arrays = {a.path: a for a in plan.arrays(kind)}
    writers: dict[tuple[str, ...], Counter] = {path: Counter() for path in arrays}
    for unit in plan.units:
        for piece in unit.pieces:
            rule = rules[piece.rule]
            region = block_region(rule, spec, piece.row0, piece.row1, piece.experts)
            if kind.scanned and rule.per_layer:
                # the layer axis is axis 1 of a scanned array (mapping.scanned_shape)
                targets = [(plan.tree.leaf_path(rule, 0, kind), region[:1] + ((piece.layer, piece.layer + 1),) + region[1:])]
            elif kind.quantized and rule.quantized:
                qpath, spath = plan.tree.aqt_paths(rule, piece.layer)
                scale = tuple((0, 1) if axis in rule.contraction else r for axis, r in enumerate(region))
                targets = [(qpath, region), (spath, scale)]
            else:
                targets = [(plan.tree.leaf_path(rule, piece.layer, kind), region)]
            for path, box in targets:
                array = arrays[path]
                for (start, stop), chunk, size in zip(box, array.chunks, array.shape):
                    # A piece's region must be exactly one chunk: aligned, one chunk long (or up to the end).
                    assert start % chunk == 0 and stop - start == min(chunk, size - start), (path, box, array)
                writers[path][tuple(start // chunk for (start, _), chunk in zip(box, array.chunks))] += 1
    return writers


def assert_tiled_once(plan: Plan) -> None:
    for kind in plan.kinds:
        writers = chunk_writers(plan, kind)
        for array in plan.arrays(kind):
            count = writers[array.path]
            grid = [range(math.ceil(n / c)) for n, c in zip(array.shape, array.chunks)]
            assert set(count) == set(itertools.product(*grid)), f"{kind} {array.path}: chunks without a writer"
            assert set(count.values()) == {1}, f"{kind} {array.path}: a chunk has several writers"


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: f"piece{b[0]}-unit{b[1]}")
@pytest.mark.parametrize("name", list(SPECS))
def test_pieces_tile_every_output_array_once(name, budget):
    assert_tiled_once(plan_of(SPECS[name], *budget))


@pytest.mark.parametrize("model_path", ["Llama3.1-405B-Instruct:bf16-mp16", "Llama-2-7b"])
@pytest.mark.parametrize("layout", ["linen", "nnx"])
def test_pieces_tile_every_output_array_once_at_real_widths(model_path, layout):
    """The published dimensions (405B MP16: 126 layers, 8 kv heads stored twice over 16 shards), 1 GiB pieces."""
    checkpoint = simulated_checkpoint(None, model_path)
    plan = build_plan(checkpoint.spec, checkpoint.tensor_files, checkpoint.indexes, kinds=("scanned", "unscanned", "int8"),
                      quantize_type="int8", piece_budget=1 << 30, unit_budget=4 << 30, layout=layout,
                      target=MAXTEXT)
    assert_tiled_once(plan)


def test_hf_plan_tiles_every_output_array_once():
    """A Hugging Face checkpoint is one shard whose tensors are located across files by their own names."""
    from rayconv.leaves import TensorInfo

    spec = DATA_SPECS["llama3-gqa-hf"]
    index, offset = {}, 0
    for key, shape in families.expected_tensors(spec, "hf"):
        nbytes = 2 * math.prod(shape)
        index[key] = TensorInfo(key, "bfloat16", shape, offset, nbytes)
        offset += nbytes
    plan = build_plan(spec, ["model.safetensors"], [index], kinds=("scanned", "unscanned", "int8"),
                      quantize_type="int8", piece_budget=4 << 10, unit_budget=16 << 10, target=MAXTEXT)
    assert {r.tensor for u in plan.units for p in u.pieces for r in p.reads} == set(index)
    assert_tiled_once(plan)


@pytest.mark.parametrize("budget", [1 << 10, 4 << 10, 16 << 10, 1 << 30], ids=lambda b: f"piece{b}")
@pytest.mark.parametrize("name", ["qwen3-dense", "qwen3-moe"])
def test_qwen3_plan_tiles_every_output_array_once(name, budget):
    """Expert tensors (6 KiB each) are cut into (expert range × row block) pieces: all four (1 GiB), two (16 KiB),
    row blocks of one (4 KiB, 1 KiB); every chunk of every output array still has exactly one writer."""
    checkpoint = simulated_hf_checkpoint(DATA_SPECS[name])
    plan = build_plan(checkpoint.spec, checkpoint.tensor_files, checkpoint.indexes, kinds=("scanned", "unscanned"),
                      quantize_type=None, piece_budget=budget, unit_budget=4 * budget, target=MAXTEXT,
                      locate=checkpoint.locate, layout=None)
    assert plan.tree.name == "to_maxtext"
    assert {r.tensor for u in plan.units for p in u.pieces for r in p.reads} == set(checkpoint.where)
    assert all(p.nbytes <= budget for u in plan.units for p in u.pieces if p.experts is not None)
    assert_tiled_once(plan)


def test_qwen3_235b_plan_at_real_widths_tiles_every_output_array_once():
    """Qwen3-235B-A22B's published dims (94 layers, 128 experts of 1536): one layer's experts are ~4.8 GB, yet no
    expert piece is over the 47 MB budget of a 1 GiB worker writing to GCS."""
    checkpoint = simulated_checkpoint(None, "qwen3-235b-a22b")
    budget = 47 << 20
    plan = build_plan(checkpoint.spec, checkpoint.tensor_files, checkpoint.indexes, kinds=("scanned",), quantize_type=None,
                      piece_budget=budget, unit_budget=1 << 30, target=MAXTEXT, locate=checkpoint.locate, layout=None)
    spec = plan.spec
    assert (spec.n_experts, spec.moe_ffn_dim, spec.n_layers) == (128, 1536, 94)
    experts = [p for u in plan.units for p in u.pieces if p.experts is not None]
    assert experts and max(p.nbytes for p in experts) <= budget
    assert sum(p.nbytes for p in experts) == 94 * 128 * 3 * 4096 * 1536 * 2
    assert_tiled_once(plan)
