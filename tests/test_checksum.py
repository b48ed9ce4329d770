"""CRC-32 combination: per-range CRCs from workers must rebuild the zip record's CRC exactly."""

import os
import random
import zlib

import pytest

from rayconv.checksum import combine, combine_segments


@pytest.mark.parametrize("length", [1, 2, 3, 8, 1000, 65536, 123457])
def test_combine_matches_zlib(length):
    data = os.urandom(500 + length)
    assert combine(zlib.crc32(data[:500]), zlib.crc32(data[500:]), length) == zlib.crc32(data)


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
