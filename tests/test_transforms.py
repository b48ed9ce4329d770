"""Pure transforms and AQT numerics, checked against independent formulations."""

import ml_dtypes
import numpy as np

from rayconv import mapping, quantize

BF16 = ml_dtypes.bfloat16


def test_query_scaling_is_bf16_rne_of_f32_division_by_bf16_sqrt():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(200_000, dtype=np.float32) * 0.05).astype(BF16)
    divisor = float(np.asarray(np.sqrt(128), dtype=BF16))
    assert divisor == 11.3125
    got = mapping.scale_query(w, divisor)
    # ml_dtypes' own bf16 division (what MaxText's numpy code runs) is the reference.
    expected = w / np.asarray(np.sqrt(128)).astype(BF16)
    assert got.dtype == BF16 and got.tobytes() == expected.tobytes()
    # A multiply by 1/sqrt(128) (the newer to_maxtext path) differs in some values.
    other = (w.astype(np.float32) * np.float32(1 / np.sqrt(128))).astype(BF16)
    assert 0 < np.mean(other.view(np.uint16) != got.view(np.uint16)) < 0.1


def test_rope_permutation_is_evens_then_odds():
    kernel = np.arange(2 * 3 * 8).reshape(2, 3, 8)
    out = mapping.permute_rope(kernel)
    assert out[0, 0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_quantize_int8_per_channel():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 4, 8), dtype=np.float32)).astype(BF16)
    w[:, 0, 0] = 0  # an all-zero channel gets scale bf16(1/127.5)
    q, scale = quantize.quantize(w, (0,), 8)
    assert q.dtype == np.int8 and scale.dtype == BF16 and scale.shape == (1, 4, 8)
    assert np.abs(q).max() <= 127 and (q[:, 0, 0] == 0).all()
    assert scale[0, 0, 0] == np.float32(1 / 127.5).astype(BF16)  # AQT's absmax 0 -> 1, then absmax / bound
    absmax = np.abs(w.astype(np.float32)).max(axis=0)
    assert np.allclose(scale[0].astype(np.float32)[absmax > 0], (absmax / 127.5)[absmax > 0], rtol=1e-2)
    error = np.abs(q.astype(np.float32) * scale.astype(np.float32) - w.astype(np.float32))
    # rint (0.5 scale) + three bf16 roundings (scale, 1/scale, w·inv: 2^-9 each, relative) at |q| ≤ 127
    assert (error <= scale.astype(np.float32) * (0.5 + 127 * 3 * 2.0**-9)).all()


def test_quantize_int4_range():
    w = np.linspace(-1, 1, 256, dtype=np.float32).reshape(32, 8).astype(BF16)
    q, scale = quantize.quantize(w, (0,), 4)
    assert q.dtype == ml_dtypes.int4 and int(q.astype(np.int8).max()) <= 7 and int(q.astype(np.int8).min()) >= -7
