"""CRC-32 combination: per-range CRCs from workers must rebuild the zip record's CRC exactly."""

import os
import random
import zlib

import numpy as np
import pytest

from rayconv.checksum import combine, combine_segments, crc32


@pytest.mark.parametrize("length", [1, 2, 3, 8, 1000, 65536, 123457])
def test_combine_matches_zlib(length):
    data = os.urandom(500 + length)
    assert combine(zlib.crc32(data[:500]), zlib.crc32(data[500:]), length) == zlib.crc32(data)


@pytest.mark.parametrize("length", [0, 1, 7, 15, 16, 63, 64, 255, 4095, 4096, 65537, (1 << 20) + 13])
def test_crc32_is_zlibs(length):
    """ISA-L's CRC-32 (what workers compute on every byte read) is zlib's, whole and continued from any CRC, on
    bytes and on the numpy views the worker passes."""
    rng = np.random.default_rng(length)
    data = rng.integers(0, 256, length, dtype=np.uint8)
    assert crc32(data) == zlib.crc32(data) == crc32(data.tobytes())
    for start in (1, 0xFFFFFFFF, int(rng.integers(0, 1 << 32))):
        assert crc32(data, start) == zlib.crc32(data, start)
    cut = length // 3
    assert crc32(data[cut:], crc32(data[:cut])) == zlib.crc32(data)
    words = rng.integers(0, 1 << 16, (length // 2, 1), dtype=np.uint16)
    assert crc32(words.reshape(-1).view(np.uint8)) == zlib.crc32(words.tobytes())


def test_segments_in_any_order_tile_the_record():
    data = os.urandom(300_000)
    cuts = sorted(random.Random(0).sample(range(1, len(data)), 20)) + [len(data)]
    segments, start = [], 0
    for cut in cuts:
        segments.append((start, cut - start, zlib.crc32(data[start:cut])))
        start = cut
    random.Random(1).shuffle(segments)
    assert combine_segments(segments) == (zlib.crc32(data), len(data))


def test_gaps_are_not_verified():
    data = os.urandom(1000)
    segments = [(0, 400, zlib.crc32(data[:400])), (500, 500, zlib.crc32(data[500:]))]
    assert combine_segments(segments) is None
