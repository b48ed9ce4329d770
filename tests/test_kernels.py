"""The hot kernels (transpose, query scaling, AQT quantization) against the plain numpy formulations they replaced.

The kernels work on bit patterns and in cache-sized tiles for speed (issue 24); the references below are the
straightforward float32 / ml_dtypes code they replaced, kept here as the definition of the result. Every
comparison is bit for bit, on random bf16 patterns over the whole finite range and on the edge cases (zeros,
all-zero channels, ±max, subnormals); NaN is excluded (a NaN weight is a corrupt checkpoint, not a value).
"""

import ml_dtypes
import numpy as np
import pytest

from rayconv import mapping, quantize
from rayconv.families import llama

BF16 = np.dtype(ml_dtypes.bfloat16)
MAX = 0x7F7F  # the largest finite bf16
SUBNORMALS = np.arange(1, 0x80, dtype=np.uint16)


def reference_quantize(kernel, contraction, bits):
    """The quantization as it was written before the bit-pattern kernel: float32 passes and ml_dtypes casts."""
    bound = np.float32(2 ** (bits - 1) - 0.5)
    qmax = np.float32(2 ** (bits - 1) - 1)
    absmax = np.abs(kernel.astype(np.float32)).max(axis=contraction, keepdims=True).astype(BF16)
    absmax = np.where(absmax == 0, np.asarray(1, BF16), absmax)
    scale = (absmax.astype(np.float32) / bound).astype(BF16)
    inverse = (np.float32(1) / scale.astype(np.float32)).astype(BF16).astype(np.float32)
    product = (kernel.astype(np.float32) * inverse).astype(BF16).astype(np.float32)
    q = np.rint(np.clip(product, -qmax, qmax)).astype(np.int8)
    return (q if bits == 8 else q.astype(ml_dtypes.int4)), scale


def reference_scale_query(kernel, divisor):
    return (kernel.astype(np.float32) / np.float32(divisor)).astype(BF16)


def finite_patterns(rng, shape):
    """Random bf16 bit patterns over every finite value (NaN and ±inf redrawn as ±max)."""
    words = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    special = (words & 0x7F80) == 0x7F80
    words[special] = (words[special] & 0x8000) | MAX
    return words.view(BF16)


def weights(rng, shape, sigma=0.02):
    return (rng.standard_normal(shape, dtype=np.float32) * sigma).astype(BF16)


def with_edges(kernel):
    """Zeros, an all-zero channel, ±max, subnormals and a channel of only subnormals, written into ``kernel``."""
    flat = kernel.view(np.uint16).reshape(kernel.shape[0], -1)
    if flat.shape[0] < 4 or flat.shape[1] < 4:
        flat[...] = 0
        return kernel
    flat[:, 0] = 0  # an all-zero channel (axis 0 is a contraction axis of every kernel here)
    flat[:, 1] = SUBNORMALS[np.arange(flat.shape[0]) % len(SUBNORMALS)]  # only subnormals
    flat[0, 2], flat[1, 2] = MAX, 0x8000 | MAX  # ±max
    flat[2, 3:] = 0
    flat[3, 3:] = SUBNORMALS[np.arange(flat.shape[1] - 3) % len(SUBNORMALS)] | 0x8000
    return kernel


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_round_to_bf16_is_ml_dtypes_rounding_for_every_upper_half():
    # Every bf16 (upper half) with the lower halves that decide a rounding: 0, just below / at / above half an
    # ulp (ties go to the even neighbour), the largest, and random ones.
    rng = np.random.default_rng(0)
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, *rng.integers(0, 1 << 16, 4)], dtype=np.uint32)
    bits = ((np.arange(1 << 16, dtype=np.uint32)[:, None] << 16) | lows[None, :]).reshape(-1)
    bits = bits[~np.isnan(bits.view(np.float32))]
    expected = bits.view(np.float32).astype(BF16)
    got = bits.copy()
    quantize.round_to_bf16(got, np.empty_like(got))
    assert not (got & 0xFFFF).any()
    assert same((got >> 16).astype(np.uint16).view(BF16), expected)
    assert np.isinf(expected.astype(np.float32)).sum() > 2  # overflow to ±inf was among the cases


def test_bf16_bits_to_f32_is_exact_for_every_pattern():
    words = np.arange(1 << 16, dtype=np.uint16)
    out = np.empty(words.shape, dtype=np.uint32)
    got = quantize.bf16_bits_to_f32(words, out)
    assert got.dtype == np.float32 and got.base is not None
    expected = words.view(BF16).astype(np.float32)
    assert got.view(np.uint32).tolist() == expected.view(np.uint32).tolist()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape,contraction", [((2048, 40), (0,)), ((96, 3, 16), (0,)), ((8, 16, 48), (0, 1)),
                                               ((1, 5), (0,)), ((300, 7), (0,))])
def test_quantize_equals_the_float32_reference(bits, shape, contraction):
    rng = np.random.default_rng(bits * 100 + len(shape))
    for kernel in (weights(rng, shape), with_edges(weights(rng, shape)), finite_patterns(rng, shape),
                   with_edges(finite_patterns(rng, shape))):
        q, scale = quantize.quantize(kernel, contraction, bits)
        want_q, want_scale = reference_quantize(kernel, contraction, bits)
        assert same(scale, want_scale)
        assert same(q, want_q), f"{np.mean(q.astype(np.int8) != want_q.astype(np.int8)):.3%} of values differ"


def test_quantize_slabs_cover_the_kernel():
    # Many slabs, and a last slab shorter than the others: every row is quantized once.
    rng = np.random.default_rng(7)
    kernel = with_edges(weights(rng, (1000, 300)))
    assert quantize.slab_rows(kernel.shape) < 1000 and 1000 % quantize.slab_rows(kernel.shape)
    assert same(quantize.quantize(kernel, (0,))[0], reference_quantize(kernel, (0,), 8)[0])


@pytest.mark.parametrize("divisor", [11.3125, 4.0, 8.0, 2.828125])
def test_scale_query_equals_the_float32_reference(divisor):
    rng = np.random.default_rng(3)
    for kernel in (weights(rng, (600, 3, 16)), with_edges(finite_patterns(rng, (600, 3, 16))),
                   finite_patterns(rng, (5, 2, 8))):
        assert same(mapping.scale_query(kernel, divisor), reference_scale_query(kernel, divisor))


@pytest.mark.parametrize("shape", [(1, 1), (1, 300), (300, 1), (128, 128), (257, 130), (2048, 416), (130, 4096)])
def test_transpose_equals_numpy(shape):
    rng = np.random.default_rng(shape[0])
    block = finite_patterns(rng, shape)
    got = mapping.transpose(block)
    assert got.flags.c_contiguous and same(got, np.ascontiguousarray(block.T))
    as_float = rng.standard_normal(shape).astype(np.float32)  # other dtypes are transposed as they are
    assert same(mapping.transpose(as_float), np.ascontiguousarray(as_float.T))


def test_side_by_side_block_is_its_parts_concatenated():
    rng = np.random.default_rng(5)
    parts = finite_patterns(rng, (4, 130, 136))
    block = mapping.SideBySide(parts)
    whole = np.concatenate(list(parts), axis=1)
    assert block.shape == whole.shape and block.dtype == BF16
    assert same(block.assemble(), whole)
    assert same(mapping.transpose(block), np.ascontiguousarray(whole.T))


@pytest.mark.parametrize("transform", ["out", "wo", "embedding"])
def test_to_layer_block_takes_side_by_side_blocks(transform):
    """A dim-1-split tensor's block, read shard by shard, converts to exactly what its concatenation does."""
    from types import SimpleNamespace

    spec = SimpleNamespace(n_heads=4, head_dim=8, dim=40, ffn_dim=64, vocab_size=40)
    rule = next(r for r in llama.RULES if r.transform.name == transform)
    columns = rule.transform.global_shape(spec)[1]
    rng = np.random.default_rng(2)
    parts = finite_patterns(rng, (4, 24, columns // 4))
    whole = np.concatenate(list(parts), axis=1)
    got = mapping.to_layer_block(rule, mapping.SideBySide(parts), spec)
    assert same(got, mapping.to_layer_block(rule, whole, spec))


def test_split_to_bf16_rounds_every_bf16_product_like_the_cast():
    """Every float32 with at most 16 significant bits (the exact products of two bf16) in quantize's range."""
    mantissas = np.arange(1 << 15, dtype=np.uint32) << 8
    exponents = np.arange(127 - 100, 127 + 9, dtype=np.uint32) << 23
    bits = (exponents[:, None] | mantissas[None, :]).reshape(-1)
    values = np.concatenate([bits, bits | 0x80000000]).view(np.float32)
    got = values.copy()
    quantize.split_to_bf16(got, np.empty_like(got))
    assert same(got, values.astype(BF16).astype(np.float32))
