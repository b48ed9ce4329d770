"""AQT weight quantization, in numpy, bit-equal to what MaxText's int8 conversion stores.

MaxText (aqtp, ``IntSymmetric`` with preserve_zero, bound 2^(bits-1) - 0.5, CALIBRATION_AND_VALUE
freezing) computes per output channel, with every elementwise op rounded to bf16 as XLA:CPU does:

    absmax = max |w| over the contraction axes      (exact in bf16; 0 → 1)
    scale  = bf16(absmax / bound)
    q      = round_half_even(clip(bf16(w · bf16(1 / scale)), -qmax, qmax))

No JAX trace is needed: each per-layer kernel block holds its whole contraction axes (see
:mod:`rayconv.mapping`), so a block's scales are final.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)

#: quantize_type → (bits, storage dtype). int8 = weights int8 + dynamic int8 activations (DRQ);
#: int8w / int4w = MaxText's weight-only ``intmp`` configs. The stored tree is the same.
QUANT_TYPES: dict[str, tuple[int, np.dtype]] = {
    "int8": (8, np.dtype(np.int8)),
    "int8w": (8, np.dtype(np.int8)),
    "int4w": (4, np.dtype(ml_dtypes.int4)),
}
#: The type an AQT output has when none is named (a ledger written before types were recorded).
DEFAULT_TYPE = "int8"


def quantize(kernel: np.ndarray, contraction: tuple[int, ...], bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(qvalue, scale) of a bf16 kernel; scale keeps the kernel's rank with contraction axes = 1.

    Two passes over the kernel, each in slabs along axis 0 (a contraction axis, so every slab uses the same
    per-channel scale) that fit in L2, with no kernel-sized temporary: the absmax, then the rounding chain. bf16
    ↔ float32 conversions are done on the bit patterns (:func:`bf16_bits_to_f32`, :func:`round_to_bf16`),
    plain uint32 vector ops instead of ml_dtypes' per-element casts; the values are the same bit for bit.
    """
    if kernel.dtype != BF16:
        raise ValueError(f"quantize expects bfloat16, got {kernel.dtype}")
    bound = np.float32(2 ** (bits - 1) - 0.5)
    qmax = np.float32(2 ** (bits - 1) - 1)
    words = kernel.view(np.uint16)
    rows = slab_rows(kernel.shape)
    slab = (rows,) + kernel.shape[1:]
    # |w| is the bit pattern without its sign, and non-negative bf16 order like their bit patterns:
    # an integer max over the contraction axes is exactly the bf16 absmax.
    magnitude = np.empty(slab, dtype=np.uint16)
    top: np.ndarray | None = None
    for r in range(0, kernel.shape[0], rows):
        n = min(rows, kernel.shape[0] - r)
        np.bitwise_and(words[r:r + n], np.uint16(0x7FFF), out=magnitude[:n])
        most = magnitude[:n].max(axis=contraction, keepdims=True)
        top = most if top is None else np.maximum(top, most, out=top)
    assert top is not None
    absmax = top.view(BF16)
    absmax = np.where(absmax == 0, np.asarray(1, BF16), absmax)
    scale = (absmax.astype(np.float32) / bound).astype(BF16)
    inverse = (np.float32(1) / scale.astype(np.float32)).astype(BF16).astype(np.float32)
    dtype = QUANT_TYPES["int4w" if bits == 4 else "int8"][1]
    q = np.empty(kernel.shape, dtype=np.int8)
    # An infinite inverse (a channel whose absmax/bound underflows bf16) makes infinite products, which the
    # three-op split cannot round: such a kernel takes the integer rounding, exact for every value.
    split = bool(np.isfinite(inverse).all())
    work, spare = np.empty(slab, dtype=np.uint32), np.empty(slab, dtype=np.uint32)
    for r in range(0, kernel.shape[0], rows):
        n = min(rows, kernel.shape[0] - r)
        value = bf16_bits_to_f32(words[r:r + n], work[:n])
        np.multiply(value, inverse, out=value)  # the float32 product, as XLA computes it before rounding
        # The product is rounded to bf16, and compared / rounded from there.
        if split:
            split_to_bf16(value, spare[:n].view(np.float32))
        else:
            round_to_bf16(work[:n], spare[:n])
        np.clip(value, -qmax, qmax, out=value)
        np.rint(value, out=value)  # round half to even
        np.copyto(q[r:r + n], value, casting="unsafe")
    return (q if dtype == np.int8 else q.astype(dtype)), scale


def bf16_bits_to_f32(words: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float32 values of bf16 bit patterns (uint16), into the uint32 array ``out``; returns its float32 view.

    A bf16 is the upper half of the float32 of the same value, so this is exact for every pattern (NaN too).
    """
    np.copyto(out, words, casting="safe")
    np.left_shift(out, np.uint32(16), out=out)
    return out.view(np.float32)


def round_to_bf16(bits: np.ndarray, spare: np.ndarray) -> None:
    """Round float32 bit patterns (uint32, in place) to the nearest bf16, ties to even, as float32.

    Adding 0x7FFF plus the lowest kept bit carries into the kept half exactly when the dropped half is above
    half an ulp, or exactly half with an odd kept half; masking the dropped half leaves the rounded value (what
    ml_dtypes' float32 → bf16 cast gives for every non-NaN input, infinities and overflow to them included).
    """
    np.right_shift(bits, np.uint32(16), out=spare)
    np.bitwise_and(spare, np.uint32(1), out=spare)
    np.add(spare, np.uint32(0x7FFF), out=spare)
    np.add(bits, spare, out=bits)
    np.bitwise_and(bits, np.uint32(0xFFFF0000), out=bits)


#: Veltkamp's splitting constant for keeping 24 - 16 = 8 significant bits of a float32 (bf16's precision).
_SPLIT = np.float32(2**16 + 1)


def split_to_bf16(value: np.ndarray, spare: np.ndarray) -> None:
    """Round float32 values (in place) to bf16 precision, as float32, in three float ops (Veltkamp's split).

    c = x·(2^16 + 1), hi = c − (c − x) keeps x's top 8 significant bits, rounded to nearest even: checked
    equal to the bf16 cast for every float32 with at most 16 significant bits (every product of two bf16) of
    magnitude 2^-100 to 2^9, and 5·10^7 random float32 in that range (tests/test_kernels.py checks the products'
    set). Only for |x| well below overflow (c must stay finite): with a finite inverse quantize's products stay
    within a few hundred. Below 2^-100 it may differ from the cast, where both round to the integer 0.
    """
    np.multiply(value, _SPLIT, out=spare)
    np.subtract(spare, value, out=value)  # c − x
    np.subtract(spare, value, out=value)  # c − (c − x)


def slab_rows(shape: tuple[int, ...], target_bytes: int = 1 << 19) -> int:
    """Leading-axis rows whose float32 slab is about ``target_bytes`` (fits in L2)."""
    per_row = 4 * int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 4
    return max(1, min(shape[0], target_bytes // max(per_row, 1)))
