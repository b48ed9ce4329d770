"""CRC-32 bookkeeping: prove every byte read equals what the zip recorded, without a second pass.

Each .pth record carries the CRC-32 of its bytes. Workers read row ranges of records in any
order, so each receipt reports the CRC of what it read; :func:`combine` (zlib's crc32_combine,
GF(2) matrix method) stitches the per-range CRCs into the record's CRC on the driver. A flipped
byte anywhere in a record that was read fails the conversion before anything is committed.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Iterable, Sequence

from rayconv.errors import SourceError

if TYPE_CHECKING:
    from rayconv.receipts import Receipt
    from rayconv.source.checkpoint import MetaCheckpoint

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


def crc_check(checkpoint: MetaCheckpoint, receipts: Sequence[Receipt]) -> tuple[int, list[tuple[int, str]]]:
    """Combine per-range CRCs into per-record CRCs and compare with the zip directory.

    Returns (records verified, (shard, tensor) of every record that fails)."""
    segments: dict[tuple[int, str], list[tuple[int, int, int]]] = {}
    for receipt in receipts:
        for shard, tensor, offset, length, crc in receipt.crcs:
            segments.setdefault((shard, tensor), []).append((offset, length, crc))
    verified = 0
    failed: list[tuple[int, str]] = []
    for (shard, tensor), parts in segments.items():
        # shard -1-r: the row scales in fp8_scales_{r}.pt of an FP8 checkpoint (see worker._read_fp8).
        info = (checkpoint.indexes[shard] if shard >= 0 else checkpoint.scales.indexes[-1 - shard])[tensor]
        if info.crc32 is None:
            continue
        unique = sorted({(off - info.offset, length, crc) for off, length, crc in parts})
        combined = combine_segments(unique)
        if combined is None or combined[1] != info.nbytes:
            continue
        if combined[0] != info.crc32:
            failed.append((shard, tensor))
            continue
        verified += 1
    return verified, failed


def crc_error(checkpoint: MetaCheckpoint, failed: Sequence[tuple[int, str]],
               hint: str = "corrupt shard; re-download it") -> SourceError:
    shard, tensor = failed[0]
    # shard -1-r: the row scales in fp8_scales_{r}.pt of an FP8 checkpoint (see worker._read_fp8).
    uri = checkpoint.shards[shard] if shard >= 0 else checkpoint.scales.files[-1 - shard]
    name = uri.split("?", 1)[0]
    return SourceError(f"{name}: tensor {tensor} fails its CRC-32 check ({hint})")


def verify_crcs(checkpoint: MetaCheckpoint, receipts: Sequence[Receipt]) -> int:
    """:func:`crc_check`, raising on the first record that fails."""
    verified, failed = crc_check(checkpoint, receipts)
    if failed:
        raise crc_error(checkpoint, failed)
    return verified
