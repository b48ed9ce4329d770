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


def _bf16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32).astype(BF16)


def quantize(kernel: np.ndarray, contraction: tuple[int, ...], bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(qvalue, scale) of a bf16 kernel; scale keeps the kernel's rank with contraction axes = 1."""
    if kernel.dtype != BF16:
        raise ValueError(f"quantize expects bfloat16, got {kernel.dtype}")
    bound = np.float32(2 ** (bits - 1) - 0.5)
    qmax = np.float32(2 ** (bits - 1) - 1)
    # |w| is the bit pattern without its sign, and non-negative bf16 order like their bit patterns:
    # an integer max over the contraction axes is exactly the bf16 absmax, ~6x faster.
    absmax = np.max(kernel.view(np.uint16) & np.uint16(0x7FFF), axis=contraction, keepdims=True).view(BF16)
    absmax = np.where(absmax == 0, np.asarray(1, BF16), absmax)
    scale = (absmax.astype(np.float32) / bound).astype(BF16)
    inverse = (np.float32(1) / scale.astype(np.float32)).astype(BF16).astype(np.float32)
    dtype = QUANT_TYPES["int4w" if bits == 4 else "int8"][1]
    q = np.empty(kernel.shape, dtype=np.int8)
    # Slabs along axis 0 (a contraction axis, so every slab uses the same per-channel inverse): the seven
    # elementwise passes then run in cache instead of streaming a multi-hundred-MB float32 array 7 times.
    rows = slab_rows(kernel.shape)
    work = np.empty((rows,) + kernel.shape[1:], dtype=np.float32)
    rounded = np.empty(work.shape, dtype=BF16)
    for r in range(0, kernel.shape[0], rows):
        n = min(rows, kernel.shape[0] - r)
        w, b = work[:n], rounded[:n]
        np.copyto(w, kernel[r:r + n], casting="unsafe")
        np.multiply(w, inverse, out=w)
        np.copyto(b, w, casting="unsafe")  # the product is rounded to bf16 ...
        np.copyto(w, b, casting="unsafe")  # ... and compared / rounded from there
        np.clip(w, -qmax, qmax, out=w)
        np.rint(w, out=w)  # round half to even
        np.copyto(q[r:r + n], w, casting="unsafe")
    return (q if dtype == np.int8 else q.astype(dtype)), scale


def slab_rows(shape: tuple[int, ...], target_bytes: int = 1 << 19) -> int:
    """Leading-axis rows whose float32 slab is about ``target_bytes`` (fits in L2)."""
    per_row = 4 * int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 4
    return max(1, min(shape[0], target_bytes // max(per_row, 1)))
