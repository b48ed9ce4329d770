"""CRC-32 bookkeeping: prove every byte read equals what the zip recorded, without a second pass.

Each .pth record carries the CRC-32 of its bytes. Workers read row ranges of records in any
order, so each receipt reports the CRC of what it read; :func:`combine` (zlib's crc32_combine,
GF(2) matrix method) stitches the per-range CRCs into the record's CRC on the driver. A flipped
byte anywhere in a record that was read fails the conversion before anything is committed.
"""

from __future__ import annotations

from typing import Iterable

_POLY = 0xEDB88320


def _gf2_times(mat: list[int], vec: int) -> int:
    total, i = 0, 0
    while vec:
        if vec & 1:
            total ^= mat[i]
        vec >>= 1
        i += 1
    return total


def _gf2_square(mat: list[int]) -> list[int]:
    return [_gf2_times(mat, mat[n]) for n in range(32)]


def combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A+B from crc(A), crc(B) and len(B)."""
    if len2 <= 0:
        return crc1
    odd = [_POLY] + [1 << n for n in range(31)]  # operator for one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    while True:
        even = _gf2_square(odd)
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _gf2_square(even)
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


def combine_segments(segments: Iterable[tuple[int, int, int]]) -> tuple[int, int] | None:
    """Combine (start_byte, length, crc) segments; None unless they tile [0, total) exactly."""
    crc, position = 0, 0
    for start, length, seg_crc in sorted(segments):
        if start != position:
            return None
        crc = combine(crc, seg_crc, length)
        position += length
    return crc, position
