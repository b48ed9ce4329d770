"""The torch-free .pth index reader against torch.load itself."""

import os
import zlib

import numpy as np
import pytest
import torch

from rayconv.errors import SourceError
from rayconv.source.bytesource import open_source
from rayconv.source.pth import index_pth, read_rows


@pytest.fixture(scope="module")
def pth(tmp_path_factory):
    path = tmp_path_factory.mktemp("pth") / "consolidated.00.pth"
    base = torch.randn(64, 48).to(torch.bfloat16)
    state = {"a": base, "b": torch.ones(5, dtype=torch.bfloat16), "view": base[8:16], "f32": torch.arange(6.0)}
    torch.save(state, path)
    return path


def test_every_tensor_and_row_range_matches_torch_load(pth):
    source = open_source(str(pth))
    index = index_pth(source)
    loaded = torch.load(pth, mmap=True, weights_only=True)
    assert set(index) == set(loaded)
    for name, info in index.items():
        expected = loaded[name]
        raw = expected.view(torch.int16).numpy() if expected.dtype == torch.bfloat16 else expected.numpy()
        got = read_rows(source, info)
        assert got.shape == tuple(expected.shape)
        assert got.view(raw.dtype).tobytes() == raw.tobytes(), name
        if info.shape[0] > 3:
            assert read_rows(source, info, 1, 3).view(raw.dtype).tobytes() == raw[1:3].tobytes()


def test_views_into_shared_storage_honour_offsets(pth):
    index = index_pth(open_source(str(pth)))
    assert index["view"].offset == index["a"].offset + 8 * 48 * 2
    assert index["view"].crc32 is None and index["a"].crc32 is not None


def test_index_records_the_zip_crc_of_the_tensor_bytes(pth):
    """The zip CRC-32 the index records is what the driver checks every read range against (checksum.crc_check)."""
    good = open_source(str(pth))
    info = index_pth(good)["a"]
    assert zlib.crc32(read_rows(good, info).view(np.uint8)) == info.crc32


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file_is_a_one_line_error(pth, tmp_path, keep):
    bad = tmp_path / "consolidated.00.pth"
    data = pth.read_bytes()
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(SourceError) as err:
        source = open_source(str(bad))
        index = index_pth(source)
        for info in index.values():
            read_rows(source, info)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_missing_file():
    with pytest.raises(SourceError, match="missing file"):
        open_source("/nonexistent/consolidated.00.pth")


def test_not_a_zip(tmp_path):
    path = tmp_path / "consolidated.00.pth"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(SourceError, match="not a readable torch checkpoint"):
        index_pth(open_source(str(path)))
