"""The torch-free .pth index on hostile files, judged against ``torch.load(weights_only=True)`` itself.

Each case crafts a file (a hand-written weights-only pickle in a hand-written torch zip, or a
``torch.save`` file with patched entries) and states what torch 2.13 does with it. The test checks
that statement against torch and then holds rayconv to it: where torch refuses, ``index_pth`` raises
one ``SourceError`` line naming the file; where torch reads, rayconv reads the same tensors, byte for
byte. A short, explicit list of files torch reads but rayconv refuses by design (ambiguous or not
range-readable) is checked the same way. ``map_location="cpu"`` is how Meta checkpoints are loaded
(rayconv never restores devices).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import shutil
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from rayconv.errors import SourceError
from rayconv.source.bytesource import open_source
from rayconv.source.pth import MAX_PICKLE_BYTES, index_pth, read_rows

OD = collections.OrderedDict


# -- crafting -------------------------------------------------------------------------------------------------------
class PID:
    """A persistent id to emit verbatim (torch.save emits ('storage', type, key, location, numel))."""

    def __init__(self, tup: object) -> None:
        self.tup = tup


class T:
    """Pickles as ``torch._utils._rebuild_tensor_v2(*args)`` (or v3), with any arguments at all."""

    def __init__(self, *args: object, v3: bool = False) -> None:
        self.args, self.v3 = args, v3

    def __reduce__(self):  # noqa: ANN204
        return (torch._utils._rebuild_tensor_v3 if self.v3 else torch._utils._rebuild_tensor_v2, self.args)


class Global:
    """Pickles as a bare GLOBAL reference to ``obj`` (e.g. a function torch's allow-list lacks)."""

    def __init__(self, func: Callable, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):  # noqa: ANN204
        return (self.func, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        return obj.tup if isinstance(obj, PID) else None


def pkl(obj: object) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def pid(key: object = "0", numel: object = 12, storage: object = torch.BFloat16Storage) -> PID:
    return PID(("storage", storage, key, "cpu", numel))


def t2(offset: object = 0, size: object = (3, 4), stride: object = (4, 1), *rest: object, key: object = "0",
       numel: object = 12, storage: object = torch.BFloat16Storage) -> T:
    """A _rebuild_tensor_v2 call; ``rest`` replaces (requires_grad, hooks) when given."""
    return T(pid(key, numel, storage), offset, size, stride, *(rest or (False, OD())))


RECORD = torch.arange(12, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()  # 24 bytes
RECORD2 = (torch.arange(12, dtype=torch.bfloat16) + 100).view(torch.int16).numpy().tobytes()


def entries(state: object, records: dict[str, bytes] | None = None, *, raw_pkl: bytes | None = None) -> list:
    """torch.save's entry list (names relative to the archive folder)."""
    records = {"0": RECORD} if records is None else records
    return [("data.pkl", raw_pkl if raw_pkl is not None else pkl(state)), (".format_version", b"1"),
            (".storage_alignment", b"64"), ("byteorder", b"little"),
            *[(f"data/{k}", v) for k, v in records.items()], ("version", b"3\n"), (".data/serialization_id", b"0" * 40)]


def write_zip(path: Path, items: list, *, prefix: str = "archive/", deflate: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate names some cases want
            for name, data in items:
                kind = zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED
                z.writestr(zipfile.ZipInfo(prefix + name), data, compress_type=kind)
    return path


def replace(items: list, name: str, data: bytes | None) -> list:
    """The entry list with ``name``'s data replaced (None drops the entry)."""
    return [(n, data if n == name else d) for n, d in items if not (n == name and data is None)]


def lying_size(path: Path) -> None:
    """Make the deflated data.pkl declare 100 bytes although it expands to more."""
    data = bytearray(path.read_bytes())
    info = zipfile.ZipFile(path).getinfo("archive/data.pkl")
    struct.pack_into("<L", data, info.header_offset + 22, 100)
    central = data.find(b"PK\x01\x02")
    struct.pack_into("<L", data, central + 24, 100)
    path.write_bytes(bytes(data))


def torch_saved(tmp: Path, state: dict) -> Path:
    torch.save(state, tmp / "saved.pth")
    return tmp / "saved.pth"


def _bigint_file(tmp: Path) -> Path:
    return write_zip(tmp / "c.pth", entries({"a": t2(0, (2**62, 4, 0), (1, 1, 1))}))


# -- the cases ------------------------------------------------------------------------------------------------------
# name → (builder(tmp) → path, expected): "read" = torch and rayconv read the same bytes; "reject" = torch
# refuses and so must rayconv; ("policy", needle) = torch reads it, rayconv refuses it with a line containing needle.
def _c(state: object = None, **kw: object) -> Callable[[Path], Path]:
    deflate = kw.pop("deflate", ())
    prefix = kw.pop("prefix", "archive/")
    after: Callable | None = kw.pop("after", None)  # type: ignore[assignment]
    items_fn: Callable | None = kw.pop("items", None)  # type: ignore[assignment]

    def build(tmp: Path) -> Path:
        items = items_fn() if items_fn else entries(state, **kw)
        path = write_zip(tmp / "c.pth", items, prefix=prefix, deflate=deflate)
        if after:
            after(path)
        return path

    return build


_BASE = {"a": t2()}
_META = (False, OD())
CASES: dict[str, tuple[Callable[[Path], Path], object]] = {
    # Well-formed files, including the corners torch reads.
    "plain": (_c(_BASE), "read"),
    "torch.save views and float8 (v3)": (lambda tmp: _saved_views(tmp), "read"),
    "view of a later part": (_c({"a": t2(4, (2, 4), (4, 1))}), "read"),
    "size-1 dim with any stride": (_c({"a": t2(0, (1, 4), (999, 1))}), "read"),
    "size-1 dim with negative stride": (_c({"a": t2(0, (1, 4), (-4, 1))}), "read"),
    "empty tensor past the end": (_c({"a": t2(100, (0,), (1,))}), "read"),
    "scalar": (_c({"a": t2(5, (), ())}), "read"),
    "size as a list": (_c({"a": t2(0, [3, 4], [4, 1])}), "read"),
    "metadata argument empty": (_c({"a": t2(0, (3, 4), (4, 1), False, OD(), {})}), "read"),
    "requires_grad on a float": (_c({"a": t2(0, (3, 4), (4, 1), True, OD())}), "read"),
    "hooks None": (_c({"a": t2(0, (3, 4), (4, 1), False, None)}), "read"),
    "integer storage key": (_c({"a": t2(key=0)}), "read"),
    "bytes tag in persistent id": (_c({"a": T(PID((b"storage", torch.BFloat16Storage, "0", "cpu", 12)), 0, (12,),
                                                (1,), *_META)}), "read"),
    "float storage over the same bytes": (_c({"a": t2(0, (2, 3), (3, 1), numel=6, storage=torch.FloatStorage)}), "read"),
    "v3 bf16 over a float storage": (_c({"a": T(pid("0", 6, torch.FloatStorage), 1, (11,), (1,), *_META,
                                                torch.bfloat16, v3=True)}), "read"),
    # torch caches a storage by key: the second reference's dtype and size are ignored.
    "storage reused with another size": (_c({"a": t2(), "b": t2(0, (2, 4), (4, 1), numel=8)}), "read"),
    "storage reused with another dtype": (_c({"a": t2(), "b": t2(0, (6,), (1,), numel=6, storage=torch.FloatStorage)}),
                                          "read"),
    "record name in another case": (_c(items=lambda: replace(entries(_BASE), "data/0", None)[:4] + [
        ("DATA/0", RECORD)] + entries(_BASE)[5:]), "read"),
    "no byteorder record": (_c(items=lambda: replace(entries(_BASE), "byteorder", None)), "read"),
    "version in .data/version": (_c(items=lambda: replace(entries(_BASE), "version", None) + [
        (".data/version", b"3\n")]), "read"),
    "deflated data.pkl": (_c(_BASE, deflate=("data.pkl",)), "read"),
    # Files torch refuses.
    "offset past the record": (_c({"a": t2(4, (3, 4), (4, 1))}), "reject"),
    "offset before the record": (_c({"a": t2(-4, (2, 4), (4, 1))}), "reject"),
    "v3 float32 past the record": (_c({"a": T(pid("0", 24, torch.UntypedStorage), 1, (6,), (1,), *_META,
                                              torch.float32, v3=True)}), "reject"),
    "negative size": (_c({"a": t2(0, (-1, 4), (4, 1))}), "reject"),
    "negative stride": (_c({"a": t2(8, (2, 4), (-4, 1))}), "reject"),
    "stride overflow": (_c({"a": t2(0, (2, 2**62), (2**62, 1))}), "reject"),
    "size overflow before a zero": (_bigint_file, "reject"),
    "offset overflow": (_c({"a": t2(2**63, (0,), (1,))}), "reject"),
    "huge offset": (_c({"a": t2(2**62, (1,), (1,))}), "reject"),
    "record bigger than numel": (_c({"a": t2(0, (2, 4), (4, 1), numel=8)}), "reject"),
    "record smaller than numel": (_c({"a": t2(0, (4, 4), (4, 1), numel=16)}), "reject"),
    "float size": (_c({"a": t2(0, (3.0, 4), (4, 1))}), "reject"),
    "bool size": (_c({"a": t2(0, (True, 4), (4, 1))}), "reject"),
    "float offset": (_c({"a": t2(0.0)}), "reject"),
    "size and stride lengths differ": (_c({"a": t2(0, (3, 4), (4,))}), "reject"),
    "rebuild with 4 arguments": (_c({"a": T(pid(), 0, (3, 4), (4, 1))}), "reject"),
    "rebuild with 5 arguments": (_c({"a": T(pid(), 0, (3, 4), (4, 1), False)}), "reject"),
    "rebuild with 8 arguments": (_c({"a": T(pid(), 0, (3, 4), (4, 1), False, OD(), {}, 1)}), "reject"),
    "v3 with 9 arguments": (_c({"a": T(pid("0", 24, torch.UntypedStorage), 0, (6,), (1,), *_META, torch.float32,
                                       None, 1, v3=True)}), "reject"),
    "v3 dtype not a dtype": (_c({"a": T(pid("0", 24, torch.UntypedStorage), 0, (6,), (1,), *_META, "float32",
                                        v3=True)}), "reject"),
    "v3 requires_grad": (_c({"a": T(pid("0", 24, torch.UntypedStorage), 0, (24,), (1,), True, OD(),
                                    torch.float8_e4m3fn, v3=True)}), "reject"),
    "requires_grad not a bool": (_c({"a": t2(0, (3, 4), (4, 1), 1, OD())}), "reject"),
    "requires_grad on an int tensor": (_c({"a": t2(0, (24,), (1,), True, OD(), numel=24, storage=torch.CharStorage)}),
                                       "reject"),
    "metadata not a dict": (_c({"a": t2(0, (3, 4), (4, 1), False, OD(), [1])}), "reject"),
    "persistent id of 4": (_c({"a": T(PID(("storage", torch.BFloat16Storage, "0", "cpu")), 0, (12,), (1,), *_META)}),
                           "reject"),
    "persistent id of 6": (_c({"a": T(PID(("storage", torch.BFloat16Storage, "0", "cpu", 12, 1)), 0, (12,), (1,),
                                      *_META)}), "reject"),
    "persistent id a list": (_c({"a": T(PID(["storage", torch.BFloat16Storage, "0", "cpu", 12]), 0, (12,), (1,),
                                        *_META)}), "reject"),
    "persistent id a string": (_c({"a": T(PID("storage"), 0, (12,), (1,), *_META)}), "reject"),
    "persistent id empty": (_c({"a": T(PID(()), 0, (12,), (1,), *_META)}), "reject"),
    "persistent id of a module": (_c({"a": T(PID(("module", torch.BFloat16Storage, "0", "cpu", 12)), 0, (12,), (1,),
                                             *_META)}), "reject"),
    "float element count": (_c({"a": t2(numel=12.0)}), "reject"),
    "negative element count": (_c({"a": t2(0, (0,), (1,), numel=-1)}), "reject"),
    "storage key with a path": (_c({"a": t2(key="../data/0")}), "reject"),
    "missing record": (_c({"a": t2(key="1")}), "reject"),
    "Float8_e4m3fnStorage (no such torch class)": (_c(raw_pkl=pkl({"a": t2()}).replace(
        b"BFloat16Storage", b"Float8_e4m3fnStorage")), "reject"),
    "a global outside the allow-list": (_c({"a": t2(), "x": Global(os.getcwd)}), "reject"),
    "no version record": (_c(items=lambda: replace(entries(_BASE), "version", None)), "reject"),
    "version 0": (_c(items=lambda: replace(entries(_BASE), "version", b"0\n")), "reject"),
    "version 99": (_c(items=lambda: replace(entries(_BASE), "version", b"99\n")), "reject"),
    "version garbage": (_c(items=lambda: replace(entries(_BASE), "version", b"x\n")), "reject"),
    "unknown byte order": (_c(items=lambda: replace(entries(_BASE), "byteorder", b"middle")), "reject"),
    "no archive folder": (_c(_BASE, prefix=""), "reject"),
    "torchscript archive": (_c(items=lambda: entries(_BASE) + [("constants.pkl", pkl(()))]), "reject"),
    "deflated data.pkl lying about its size": (_c({"a": t2(), "pad": "x" * 1000}, deflate=("data.pkl",),
                                                  after=lying_size), "reject"),
    "truncated record": (lambda tmp: _truncated(tmp), "reject"),
    # Files torch reads but rayconv refuses: ambiguous, not range-readable, or not a plain tensor.
    "duplicate record, second entry read by torch": (_c(items=lambda: entries(_BASE)[:5] + [
        ("data/0", RECORD2)] + entries(_BASE)[5:]), ("policy", "duplicate zip entries")),
    "duplicate record, first entry read by torch": (_c(items=lambda: entries(_BASE) + [("data/0", RECORD2)]),
                                                    ("policy", "duplicate zip entries")),
    "duplicate data.pkl": (_c(items=lambda: [("data.pkl", pkl({"b": t2(0, (6,), (1,), numel=6)}))] + entries(_BASE)),
                           ("policy", "duplicate zip entries")),
    "compressed record": (_c(_BASE, deflate=("data/0",)), ("policy", "is compressed")),
    "big-endian": (_c(items=lambda: replace(entries(_BASE), "byteorder", b"big")), ("policy", "byte order")),
    "non-contiguous view": (_c({"a": t2(0, (2, 4), (1, 2))}), ("policy", "not contiguous")),
    "broadcast (stride 0)": (_c({"a": t2(0, (3, 4), (0, 1))}), ("policy", "not contiguous")),
    "empty tensor, huge dims after the zero": (_c({"a": t2(0, (0, 2**62, 4), (1, 1, 1))}), ("policy", "too large")),
    "negative size of an empty tensor": (_c({"a": t2(0, (-1, 0), (1, 1))}), ("policy", "negative")),
    "neg-bit metadata": (_c({"a": t2(0, (3, 4), (4, 1), False, OD(), {"neg": True})}), ("policy", "metadata")),
    "non-string key": (_c({1: t2()}), ("policy", "not a string")),
    "data.pkl expanding past the limit": (_c({"a": t2(), "pad": "x" * (MAX_PICKLE_BYTES + 1)}, deflate=("data.pkl",)),
                                          ("policy", "limit")),
}


def _saved_views(tmp: Path) -> Path:
    base = torch.randn(6, 8).to(torch.bfloat16)
    return torch_saved(tmp, {"w": base, "view": base[2:4], "row": base[5], "f32": torch.arange(5.0),
                             "f8": torch.randn(4, 8).to(torch.float8_e4m3fn), "scalar": torch.tensor(3.5)})


def _truncated(tmp: Path) -> Path:
    path = write_zip(tmp / "c.pth", entries(_BASE))
    data = path.read_bytes()
    start = data.index(RECORD)
    # Keep the directory (zipfile finds it from the end) but cut the record short: copy the tail over it.
    path.write_bytes(data[: start + 10] + data[start + len(RECORD):])
    return path


def _torch_load(path: Path) -> dict | Exception:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any refusal counts
        return exc


def _torch_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


@pytest.mark.parametrize("case", list(CASES))
def test_index_agrees_with_torch(case, tmp_path):
    build, expected = CASES[case]
    path = build(tmp_path)
    loaded = _torch_load(path)
    torch_reads = not isinstance(loaded, Exception)
    assert torch_reads == (expected != "reject"), f"torch 2.13 no longer behaves as stated: {loaded!r}"
    source = open_source(str(path))
    if expected == "read":
        index = index_pth(source)
        tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        assert set(index) == set(tensors)
        for name, info in index.items():
            assert (info.shape, "torch." + info.dtype) == (tuple(tensors[name].shape), str(tensors[name].dtype)), name
            got = read_rows(source, info)
            assert got.reshape(-1).view(np.uint8).tobytes() == _torch_bytes(tensors[name]), name
        return
    with pytest.raises(SourceError) as err:
        index = index_pth(source)
        for info in index.values():  # a refusal may only come at read time (truncation)
            read_rows(source, info)
    message = str(err.value)
    assert str(path) in message and "\n" not in message, message
    if isinstance(expected, tuple):
        assert expected[1] in message, message


def test_crafting_reproduces_torch_save(tmp_path):
    """The hand-written zip/pickle is what torch.save writes, so the cases differ from real files only where meant."""
    base = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    saved = torch_saved(tmp_path, {"a": base})
    crafted = write_zip(tmp_path / "c.pth", entries(_BASE))
    ours, theirs = index_pth(open_source(str(crafted)))["a"], index_pth(open_source(str(saved)))["a"]
    assert (ours.shape, ours.dtype, ours.nbytes, ours.crc32) == (theirs.shape, theirs.dtype, theirs.nbytes, theirs.crc32)
    assert pkl(_BASE) == zipfile.ZipFile(saved).read("saved/data.pkl")


def test_cli_refuses_a_shard_whose_tensor_runs_past_its_record(tmp_path):
    """End to end: a shard with one tensor pointing past its storage record ends in one line, exit 1, nothing done."""
    from conftest import synthetic_checkpoint
    from helpers import assert_clean_failure, mp16_convert_args, mp16_model, run_convert_cli

    src = tmp_path / "in"
    shutil.copytree(synthetic_checkpoint(mp16_model()), src)
    _shift_first_tensor(src / "consolidated.03.pth")
    out = tmp_path / "out"
    result = run_convert_cli(*mp16_convert_args(src, out))
    assert result.returncode == 1, result.stderr
    assert_clean_failure(result, out, "consolidated.03.pth")
    assert "needs" in result.stderr and "which has" in result.stderr, result.stderr


def test_verify_refuses_a_shard_whose_tensor_runs_past_its_record(tmp_path):
    """``rayconv verify`` reads the source through the same index: a good output checked against the crafted
    shard is refused in one line (it used to agree with whatever the neighbouring bytes gave), and checked
    against the intact source it passes."""
    from conftest import run_convert, synthetic_checkpoint
    from helpers import MP16_DESCRIPTOR, mp16_model, one_error, run_cli

    good = synthetic_checkpoint(mp16_model())
    out = tmp_path / "out"
    run_convert(good, out, model_path=MP16_DESCRIPTOR, kinds=("scanned",), executor="local")
    src = tmp_path / "in"
    shutil.copytree(good, src)
    _shift_first_tensor(src / "consolidated.03.pth")
    refused = run_cli("verify", str(src), str(out), "--model_path", MP16_DESCRIPTOR)
    assert "consolidated.03.pth" in one_error(refused) and "which has" in refused.stderr, refused.stderr[-2000:]
    passed = run_cli("verify", str(good), str(out), "--model_path", MP16_DESCRIPTOR)
    assert passed.returncode == 0, passed.stderr[-2000:]


def _shift_first_tensor(shard: Path) -> None:
    """Point the shard's first tensor (tok_embeddings, at element 0 of its record) 8 elements on, past its end."""
    with zipfile.ZipFile(shard) as z:
        items = [(info.filename, z.read(info)) for info in z.infolist()]
    name, data = items[0]
    assert name.endswith("/data.pkl")
    first = data.index(b"QK\x00")
    items[0] = (name, data[:first] + b"QK\x08" + data[first + 3:])
    with zipfile.ZipFile(shard, "w") as z:
        for entry, payload in items:
            z.writestr(zipfile.ZipInfo(entry), payload)
    assert isinstance(_torch_load(shard), Exception)


def _view_of_a_larger_record(shard: Path, key: str) -> None:
    """Save ``key`` as ``big[:n]``: a view of a storage record with one row more than the tensor (torch.save keeps
    the whole storage)."""
    state = torch.load(shard, weights_only=True)
    w = state[key]
    state[key] = torch.cat([w, torch.ones_like(w[:1])])[: w.shape[0]]
    torch.save(state, shard)


@pytest.mark.parametrize("where", ["none", "view", "rest"])
def test_a_tensor_viewing_part_of_a_record_has_its_whole_record_checked(where, tmp_path, caplog):
    """The CRC-32 of a zip record covers all of it; a tensor that views only part of its record used to go
    unchecked ("Verified CRC-32 of 36 source tensors" of 37 read). Now the driver reads the rest of the record
    itself, so a flipped byte in the viewed rows or in the rest fails, and an intact file verifies every tensor."""
    import logging

    from conftest import MODELS, run_convert, synthetic_checkpoint

    model = MODELS["llama3-mp1"][0]
    src, key = tmp_path / "in", "layers.1.attention.wq.weight"
    shutil.copytree(synthetic_checkpoint(model), src)
    shard = src / "consolidated.00.pth"
    _view_of_a_larger_record(shard, key)
    info = index_pth(open_source(str(shard)))[key]
    assert info.crc32 is None and info.record is not None and info.record[1] == info.nbytes + info.row_bytes
    if where != "none":
        data = bytearray(shard.read_bytes())
        data[info.offset + (7 if where == "view" else info.nbytes + 3)] ^= 0x10
        shard.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="rayconv"):
        if where != "none":
            with pytest.raises(SourceError, match=f"consolidated.00.pth: tensor {key} fails its CRC-32 check"):
                run_convert(src, tmp_path / "out", model_name=model.family, kinds=("scanned",), executor="local")
            return
        run_convert(src, tmp_path / "out", model_name=model.family, kinds=("scanned",), executor="local")
    read = len(index_pth(open_source(str(shard))))  # every tensor of this checkpoint is read
    assert f"Verified CRC-32 of {read} source tensors" in caplog.text, caplog.text
    assert f"read {info.row_bytes} bytes of records" in caplog.text, caplog.text
