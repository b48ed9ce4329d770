"""The md5 pass of a local input runs while converting (issue 24 item 2), and still keeps nothing made from a
file whose md5 is wrong: the job fails in one line naming the file, nothing is committed, the units that read
it are forgotten and no md5 memo is written; the rerun after the file is fixed converts bit-equal."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from helpers import assert_nothing_committed, one_error, output_leaves, run_convert_cli
from rayconv.source.bytesource import open_source
from rayconv.source.pth import index_pth
from rayconv.synthetic import SyntheticModel, write_checkpoint

TINY = SyntheticModel(dim=256, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=64, n_shards=2,
                      seed=24)
SHARD = "consolidated.01.pth"
KINDS = ("unscanned",)


def convert(src: Path, out: Path):
    return run_convert_cli("--input_directory", str(src), "--model_name", "llama-3.1", "--skip_scanned",
                           "--output_directory", str(out))


def damage(src: Path, where: str) -> None:
    """``tensor``: one bit of a shard's tensor bytes (the CRC-32 would catch it too, after the units ran);
    ``params``: a trailing newline in params.json (same JSON, other md5: only the md5 pass sees it)."""
    if where == "params":
        with open(src / "params.json", "a") as f:
            f.write("\n")
        return
    info = index_pth(open_source(str(src / SHARD)))["layers.0.attention.wq.weight"]
    with open(src / SHARD, "r+b") as f:
        f.seek(info.offset + info.nbytes // 2)
        byte = f.read(1)
        f.seek(info.offset + info.nbytes // 2)
        f.write(bytes([byte[0] ^ 0x10]))


def receipt_sources(out: Path) -> list[set[str]]:
    """The files each receipt left in the ledger says its unit read (shard indexes)."""
    return [set(json.loads(p.read_text())["sources"]) for p in (out / ".rayconv/receipts").glob("*.json")]


@pytest.mark.parametrize("where, name", [("tensor", SHARD), ("params", "params.json")])
def test_corrupt_file_caught_while_converting_commits_nothing(tmp_path, where, name):
    src = write_checkpoint(TINY, tmp_path / "ckpt")
    clean = convert(src, tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert "while converting" in clean.stderr and "md5 of 3 files matches checklist.chk" in clean.stderr
    want = output_leaves(tmp_path / "clean", KINDS)

    original = (src / name).read_bytes()
    damage(src, where)
    out = tmp_path / "out"
    bad = convert(src, out)
    line = one_error(bad)
    assert f"{src / name}: md5 mismatch" in line, line  # the md5 names the cause, not the CRC-32 check after it
    assert_nothing_committed(out)
    assert not (out / ".rayconv/md5.json").exists()  # nothing says this input was checked
    # Every unit that read the file is forgotten: a shard's readers; for params.json (the model's shape), all.
    assert all("1" not in sources for sources in receipt_sources(out)) if where == "tensor" else \
        receipt_sources(out) == []

    (src / name).write_bytes(original)  # fixed (re-downloaded): the rerun converts and commits
    fixed = convert(src, out)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "md5 of 3 files matches checklist.chk" in fixed.stderr, fixed.stderr[-3000:]
    assert (out / ".rayconv/md5.json").exists()
    assert output_leaves(out, KINDS) == want


# The gate on its own, with a real ledger and plan: what a mismatch forgets, and when the memo is written.


def _ledger_and_plan(src: Path, out: Path, convert_first: bool = False):
    """The ledger of ``out`` and the plan convert makes for ``src`` (small units: many of them); ``convert_first``:
    convert into ``out`` first (in this process, no md5 pass), leaving a receipt per unit in the ledger."""
    from rayconv.engine.driver import convert as run
    from rayconv.engine.ledger import Ledger
    from rayconv.job import ConvertOptions, make_plan, open_checkpoint
    from rayconv.source.checkpoint import list_input
    from rayconv.storage import Location

    options = ConvertOptions(files=list_input(str(src)), input_display=str(src), output=str(out),
                             model_name="llama-3.1", kinds=KINDS, executor="local", progress=False,
                             piece_budget=64 << 10, unit_budget=64 << 10)
    if convert_first:
        run(options)
    return Ledger(Location.parse(str(out))), make_plan(open_checkpoint(options), options)


def test_mismatch_found_after_the_units_ran_forgets_their_receipts(tmp_path):
    """However late the pass finds a mismatch, the receipts of the units that read the file go (as for a
    CRC-32 failure) and no memo is written; receipts of units that did not read it stay."""
    from rayconv.engine.md5gate import Md5Gate
    from rayconv.errors import SourceError
    from rayconv.source.hashing import BackgroundMd5, read_checklist

    src = write_checkpoint(TINY, tmp_path / "ckpt")
    out = tmp_path / "out"
    ledger, plan = _ledger_and_plan(src, out, convert_first=True)
    before = receipt_sources(out)
    assert len(before) == len(plan.units) and {"0"} in before and any("1" in s for s in before)

    shard = str(src / SHARD)
    check = BackgroundMd5({SHARD: shard}, {SHARD: "0" * 32}, {SHARD: os.path.getsize(shard)})
    with pytest.raises(SourceError, match=f"{SHARD}: md5 mismatch"):
        Md5Gate({SHARD: "x"}, check).settle(ledger, plan)
    assert sorted(map(sorted, receipt_sources(out))) == sorted(sorted(s) for s in before if "1" not in s)
    assert not (out / ".rayconv/md5.json").exists()

    check = BackgroundMd5({"params.json": str(src / "params.json")}, {"params.json": "0" * 32}, {"params.json": 1})
    with pytest.raises(SourceError, match="params.json: md5 mismatch"):
        Md5Gate({"params.json": "y"}, check).settle(ledger, plan)
    assert receipt_sources(out) == []  # every unit's output depends on params.json

    sums = read_checklist((src / "checklist.chk").read_text())
    good = Md5Gate({"params.json": "y"}, BackgroundMd5({"params.json": str(src / "params.json")}, sums,
                                                       {"params.json": 1}))
    good.settle(ledger, plan)
    assert json.loads((out / ".rayconv/md5.json").read_text())["files"] == {"params.json": "y"}


def test_memo_is_written_only_once_every_file_matched(tmp_path):
    """Between units the gate records the memo only when the pass has ended well: a file still being read (a FIFO
    nobody writes yet holds the hashing thread) leaves no memo, so an interruption then costs a new pass."""
    from rayconv.engine.md5gate import Md5Gate
    from rayconv.source.hashing import BackgroundMd5

    src = write_checkpoint(TINY, tmp_path / "ckpt")
    out = tmp_path / "out"
    ledger, plan = _ledger_and_plan(src, out)
    fifo = tmp_path / "slow"
    os.mkfifo(fifo)
    check = BackgroundMd5({"slow": str(fifo)}, {"slow": hashlib.md5(b"").hexdigest()}, {"slow": 0})
    gate = Md5Gate({"slow": "z"}, check)
    gate.poll(ledger, plan)
    assert not check.done() and not (out / ".rayconv/md5.json").exists()
    with open(fifo, "wb"):  # lets the hashing thread open it; it reads an empty file
        pass
    check.wait()
    gate.poll(ledger, plan)
    assert json.loads((out / ".rayconv/md5.json").read_text())["files"] == {"slow": "z"}
