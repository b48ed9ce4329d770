"""CRC-32 bookkeeping: prove every byte read equals what the zip recorded, without a second pass.

Each .pth record carries the CRC-32 of its bytes. Workers read row ranges of records in any
order, so each receipt reports the CRC of what it read; :func:`combine` (zlib's crc32_combine,
GF(2) matrix method) stitches the per-range CRCs into the record's CRC on the driver. A flipped
byte anywhere in a record that was read fails the conversion before anything is committed.
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=64)
def _shift_operator(length: int) -> tuple[int, ...]:
    """The GF(2) matrix that appends ``length`` zero bytes to a CRC (segments repeat lengths: cache it).

    Square-and-multiply over the bits of ``length``, starting from the operator for one zero byte.
    """
    op = [_POLY] + [1 << n for n in range(31)]  # one zero bit
    for _ in range(3):
        op = _gf2_square(op)  # one zero byte
    result = [1 << n for n in range(32)]  # identity
    while length:
        if length & 1:
            result = [_gf2_times(op, v) for v in result]
        length >>= 1
        if length:
            op = _gf2_square(op)
    return tuple(result)


def combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A+B from crc(A), crc(B) and len(B)."""
    if len2 <= 0:
        return crc1
    return _gf2_times(list(_shift_operator(len2)), crc1) ^ crc2


def combine_segments(segments: Iterable[tuple[int, int, int]]) -> tuple[int, int] | None:
    """Combine (start_byte, length, crc) segments; None unless they tile [0, total) exactly."""
    crc, position = 0, 0
    for start, length, seg_crc in sorted(segments):
        if start != position:
            return None
        crc = combine(crc, seg_crc, length)
        position += length
    return crc, position
