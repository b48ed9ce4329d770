"""The commit and resume protocol survives an interruption at every step, on local disk and gs://.

Each kill-point test ends a real ``rayconv convert`` process (``os._exit`` through the
``RAYCONV_TEST_STOP_AFTER`` hook, i.e. no cleanup at all) right after one step of the commit, then
checks the invariant — no output that carries ``commit_success.txt`` differs from an uninterrupted
run — and resumes: the rerun must finish every output, bit-equal leaf by leaf to the uninterrupted
run, and pass ``rayconv verify``. The commits of the three outputs run concurrently, so the other
outputs are stopped at whatever step they had reached: more states than the named one are covered.

Also here: the states the protocol refuses (each in one line, never deleting a finished output),
``--restart`` removing outputs the new run does not write, receipts tied to the shard bytes they were
read from (item 6 of issue 11), and resuming after --worker_memory_gb changed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MODELS, run_convert, synthetic_checkpoint
from helpers import leaf_bytes as read_leaves
from helpers import one_error, run_convert_cli, small_filesystem
from rayconv.sink.commit import STOP_EXIT_CODE
from rayconv.storage import Location
from rayconv.synthetic import SyntheticModel

MODEL = MODELS["llama2-mp2"][0]  # 2 shards: several units, so each output merges several databases
KINDS = ("scanned", "unscanned", "int8")
STEP_DIRS = {"scanned": "bf16/scanned/0", "unscanned": "bf16/unscanned/checkpoints/0", "int8": "int8"}
ITEMS = {"scanned": "bf16/scanned/0/items", "unscanned": "bf16/unscanned/checkpoints/0/items", "int8": "int8"}


@pytest.fixture(scope="module")
def src() -> Path:
    return synthetic_checkpoint(MODEL)


@pytest.fixture(scope="module")
def uninterrupted(src, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("uninterrupted")
    run_convert(src, out, model_name=MODEL.family, kinds=KINDS, quantize_type="int8", executor="local")
    return {kind: read_leaves(out / ITEMS[kind]) for kind in KINDS}


def cli(src: Path, out: str, *extra: str, stop: str | None = None, quantize: bool = True,
        env: dict | None = None, executor: str = "local") -> subprocess.CompletedProcess:
    full = dict(env or {}, **({"RAYCONV_TEST_STOP_AFTER": stop} if stop else {}))
    args = ["--input_directory", str(src), "--model_name", MODEL.family, "--output_directory", out, *extra]
    if quantize:
        args += ["--quantize_type", "int8", "--quantize_weights", "True"]
    return run_convert_cli(*args, env=full, executor=executor)


def local_item(out: Location, kind: str, scratch: Path) -> Path:
    """The item directory, copied down from the bucket when it lives there."""
    if out.is_local:
        return Path(out.path) / ITEMS[kind]
    target = scratch / f"copy-{len(list(scratch.glob('copy-*')))}"
    item = out.join(ITEMS[kind])
    for key in item.list_keys():
        path = target / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(item.read_bytes(key))
    return target


def assert_marked_outputs_are_right(out: Location, uninterrupted: dict, scratch: Path) -> list[str]:
    """The invariant: whatever carries a commit_success.txt equals the uninterrupted run."""
    marked = []
    for kind in KINDS:
        if out.exists(f"{STEP_DIRS[kind]}/commit_success.txt") or out.exists(f"{ITEMS[kind]}/commit_success.txt"):
            assert read_leaves(local_item(out, kind, scratch)) == uninterrupted[kind], kind
            marked.append(kind)
    return marked


def assert_complete(out: Location, uninterrupted: dict, scratch: Path, kinds=KINDS) -> None:
    for kind in kinds:
        assert out.exists(f"{STEP_DIRS[kind]}/commit_success.txt"), kind
        assert out.exists(f"{ITEMS[kind]}/commit_success.txt"), kind
        assert read_leaves(local_item(out, kind, scratch)) == uninterrupted[kind], kind
        state = json.loads(out.read_bytes(f".rayconv/commits/{kind}.json"))
        assert state["state"] == "committed", state
    if out.is_local:
        assert not list(Path(out.path).rglob("*.orbax-checkpoint-tmp-rayconv")), "staging left behind"
    assert out.read_bytes(".rayconv/lock") is None, "lock not released"


def resume(src: Path, out: Location, **kwargs):
    return run_convert(src, out.uri, model_name=MODEL.family, kinds=KINDS, quantize_type="int8", executor="local",
                       **kwargs)


LOCAL_STOPS = ["units:1", "intent", "merge:scanned", "merge:int8", "metadata:unscanned", "item_marker:int8",
               "item_marker:scanned", "step_marker:unscanned", "rename:scanned", "rename:int8", "ledger:unscanned",
               "ledger:int8", "merge:int8,rename:int8"]
GCS_STOPS = ["units:1", "intent", "merge:int8", "metadata:scanned", "item_marker:scanned", "item_marker:int8",
             "step_marker:unscanned", "ledger:scanned", "metadata:int8,item_marker:int8"]


def interrupted_then_resumed(src, out: Location, stops: str, uninterrupted, scratch) -> None:
    # Several interruptions in a row, each resumed by the next run. The outputs commit concurrently, so a
    # later stop names the same output as the one before (another output may already have finished).
    for stop in stops.split(","):
        killed = cli(src, out.uri, stop=stop)
        assert killed.returncode == STOP_EXIT_CODE, f"{stop} was never reached: {killed.stderr[-3000:]}"
        assert_marked_outputs_are_right(out, uninterrupted, scratch)
    resume(src, out)  # verifies the output with rayconv verify
    assert_complete(out, uninterrupted, scratch)
    again = resume(src, out)  # and once more: nothing to do, nothing changes
    assert again.units_run == 0
    assert_complete(out, uninterrupted, scratch)


@pytest.mark.parametrize("stops", LOCAL_STOPS)
def test_interrupted_commit_resumes_local(src, uninterrupted, tmp_path, stops):
    interrupted_then_resumed(src, Location.parse(str(tmp_path / "out")), stops, uninterrupted, tmp_path)


@pytest.mark.parametrize("stops", GCS_STOPS)
def test_interrupted_commit_resumes_gcs(src, uninterrupted, tmp_path, gcs_prefix, stops):
    interrupted_then_resumed(src, gcs_prefix, stops, uninterrupted, tmp_path)


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_databases_no_receipt_names_are_removed_before_the_markers(src, uninterrupted, tmp_path, where, request):
    """A unit attempt that was retried or killed leaves a child database no receipt names; the root never
    references it, so it is storage nobody reads — on GCS, inside the final checkpoint. The commit removes it."""
    from rayconv import trees
    from rayconv.engine.ledger import Ledger
    from rayconv.sink.places import DB_PREFIX
    from rayconv.targets.maxtext import MAXTEXT

    out = Location.parse(str(tmp_path / "out")) if where == "local" else request.getfixturevalue("gcs_prefix")
    killed = cli(src, out.uri, stop="units:1")
    assert killed.returncode == STOP_EXIT_CODE, killed.stderr[-3000:]
    places = {kind.name: layout for kind, layout in MAXTEXT.places(out, "int8", trees.LINEN).items()}
    for kind in KINDS:  # a complete database under a name no receipt has: the worst case, it looks legitimate
        item = places[kind].item(staging=True)
        real = next(name for name in item.list_folders() if name.startswith(DB_PREFIX))
        for key in item.join(real).list_keys():
            item.join(f"{DB_PREFIX}stale{kind}").write_bytes(key, item.join(real).read_bytes(key))
    resume(src, out)
    assert_complete(out, uninterrupted, tmp_path)
    named = [receipt.dbs for receipt, _ in Ledger(out).receipts().values()]
    for kind in KINDS:
        folders = {name for name in out.join(ITEMS[kind]).list_folders() if name.startswith(DB_PREFIX)}
        assert folders == {DB_PREFIX + dbs[kind] for dbs in named}, kind


def test_unwritable_destination_fails_in_one_line_and_keeps_finished_outputs(src, uninterrupted, tmp_path):
    out = tmp_path / "out"
    assert cli(src, str(out), stop="intent").returncode == STOP_EXIT_CODE
    (out / "int8").write_text("not a directory")
    error = one_error(cli(src, str(out)))
    assert f"{out}/int8 exists but is not a checkpoint this conversion committed" in error
    assert (out / "int8").read_text() == "not a directory"
    location = Location.parse(str(out))
    assert assert_marked_outputs_are_right(location, uninterrupted, tmp_path) == ["scanned", "unscanned"]
    for kind in ("scanned", "unscanned"):
        assert json.loads((out / f".rayconv/commits/{kind}.json").read_text())["state"] == "committed"
    (out / "int8").unlink()
    resume(src, location)
    assert_complete(location, uninterrupted, tmp_path)


def test_a_file_where_an_output_goes_is_refused_before_any_work(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "int8").write_text("not a directory")
    error = one_error(cli(src, str(out)))
    assert f"{out}/int8 already exists and was not written by this conversion" in error
    assert not list(out.rglob("commit_success.txt")) and not (out / ".rayconv/receipts").exists()


def test_inconsistent_states_are_reported_and_nothing_finished_is_deleted(src, uninterrupted, tmp_path):
    out = tmp_path / "out"
    location = Location.parse(str(out))
    resume(src, location)
    # The ledger lost its record of committing int8: the output is kept, the run refuses.
    (out / ".rayconv/commits/int8.json").unlink()
    error = one_error(cli(src, str(out)))
    assert f"{out}/int8 holds a checkpoint this conversion did not commit" in error
    assert assert_marked_outputs_are_right(location, uninterrupted, tmp_path) == list(KINDS)
    # A committed output removed behind the ledger's back: said so, not silently "completed".
    resume(src, location, restart=True)
    shutil.rmtree(out / "bf16/unscanned")
    error = one_error(cli(src, str(out)))
    assert "the ledger says the unscanned checkpoint was committed" in error and "commit_success.txt is missing" \
        in error
    # A finished output whose tree is not this conversion's (here: damaged metadata) is never rebuilt over.
    resume(src, location, restart=True)
    record = json.loads((out / ".rayconv/commits/int8.json").read_text())  # keeps the sources it was made from
    (out / ".rayconv/commits/int8.json").write_text(json.dumps({**record, "state": "committing"}))
    (out / "int8/_METADATA").write_text("{}")
    error = one_error(cli(src, str(out)))
    assert "carries commit_success.txt but its _METADATA is not the tree this conversion writes" in error
    assert (out / "int8/_METADATA").read_text() == "{}" and (out / "int8/commit_success.txt").exists()


def test_restart_removes_outputs_the_new_run_does_not_write(src, uninterrupted, tmp_path):
    out = tmp_path / "out"
    location = Location.parse(str(out))
    resume(src, location)
    (out / "notes.txt").write_text("the user's")
    (out / "int8w.orbax-checkpoint-tmp-rayconv").mkdir()  # a staging directory of some earlier run
    result = run_convert(src, str(out), model_name=MODEL.family, kinds=("scanned", "unscanned"), executor="local",
                         restart=True)
    assert set(result.outputs) == {"scanned", "unscanned"}
    assert not (out / "int8").exists() and not (out / "int8w.orbax-checkpoint-tmp-rayconv").exists()
    assert (out / "notes.txt").read_text() == "the user's"
    assert_complete(location, uninterrupted, tmp_path, kinds=("scanned", "unscanned"))


# Receipts tied to the bytes they came from ---------------------------------------------------

SHARDED = SyntheticModel(family="llama-3.1", dim=256, n_layers=1, n_heads=16, n_kv_heads=8, vocab_size=256,
                         multiple_of=64, n_shards=16, seed=11)  # test_errors' model: 16 shards, many units
DESCRIPTOR = "Llama3.1-405B-Instruct:bf16-mp16"
BAD_TENSOR = "layers.0.feed_forward.w2.weight"


def _units_reading(src: Path, shard: int, tensor: str | None = None) -> tuple[int, int]:
    """(units of the plan reading ``shard`` [``tensor``], all units)."""
    from rayconv.job import ConvertOptions, make_plan, open_checkpoint
    from rayconv.source.checkpoint import list_input

    options = ConvertOptions(files=list_input(str(src)), input_display=str(src), output="", model_path=DESCRIPTOR,
                             kinds=KINDS, quantize_type="int8")
    plan = make_plan(open_checkpoint(options), options)
    hit = [u for u in plan.units if any(r.file == shard and (tensor is None or r.tensor == tensor)
                                        for p in u.pieces for r in (*p.reads, *p.duplicates))]
    return len(hit), len(plan.units)


@pytest.mark.parametrize("restore", ["fresh copy", "in place, same mtime"])
def test_redownloaded_shard_is_reread_and_the_rest_resumes(tmp_path, restore):
    from rayconv.source.bytesource import open_source
    from rayconv.source.pth import index_pth

    src = tmp_path / "in"
    shutil.copytree(synthetic_checkpoint(SHARDED), src)
    # Without checklist.chk there is no md5 pass: the damage reaches the CRC check this test is about.
    (src / "checklist.chk").unlink(missing_ok=True)
    shard = src / "consolidated.07.pth"
    good = shard.read_bytes()
    info = index_pth(open_source(str(shard)))[BAD_TENSOR]
    damaged = bytearray(good)
    damaged[info.offset + info.nbytes // 2] ^= 0x40
    shard.write_bytes(bytes(damaged))
    stat = shard.stat()  # the identity the receipts of the corrupt bytes record
    out = tmp_path / "out"
    args = ["--input_directory", str(src), "--output_directory", str(out), "--model_path", DESCRIPTOR,
            "--quantize_type", "int8", "--quantize_weights", "True"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", RAY_USAGE_STATS_ENABLED="0")
    failed = subprocess.run([sys.executable, "-m", "rayconv.cli", "convert", "--no_progress", "--executor", "local",
                             *args], capture_output=True, text=True, env=env, timeout=300)
    assert f"tensor {BAD_TENSOR} fails its CRC-32 check" in one_error(failed)
    assert not list(out.rglob("commit_success.txt"))

    if restore == "fresh copy":  # what re-downloading does: new file, new mtime and inode
        fresh = tmp_path / "download.tmp"
        fresh.write_bytes(good)
        os.replace(fresh, shard)
        expected, total = _units_reading(src, 7)
    else:  # same file, size and mtime: only the forgotten receipts of the corrupt bytes make the rerun re-read
        with open(shard, "r+b") as f:
            f.seek(info.offset + info.nbytes // 2)
            f.write(good[info.offset + info.nbytes // 2:info.offset + info.nbytes // 2 + 1])
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        expected, total = _units_reading(src, 7, BAD_TENSOR)
    assert 0 < expected < total
    result = run_convert(src, out, model_path=DESCRIPTOR, kinds=KINDS, quantize_type="int8", executor="local")
    assert (result.units_run, result.units_skipped) == (expected, total - expected)


def test_a_different_model_with_the_same_shapes_is_not_resumed(src, uninterrupted, tmp_path):
    out = tmp_path / "out"
    location = Location.parse(str(out))
    resume(src, location)
    other = synthetic_checkpoint(dataclasses.replace(MODEL, seed=MODEL.seed + 100))
    error = one_error(cli(other, str(out)))
    assert "holds the output of a different source checkpoint" in error and "--restart" in error
    assert assert_marked_outputs_are_right(location, uninterrupted, tmp_path) == list(KINDS)


# Resuming after --worker_memory_gb changed -------------------------------------------------

# Embedding and output shards of 2 MiB: at --worker_memory_gb 0.3 (1 MiB pieces) they are cut in
# two; at 4 GiB they are whole, so the two budgets make different plans.
WIDE = SyntheticModel(family="llama-3", dim=256, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=8192,
                      multiple_of=64, n_shards=2, seed=8)


def _fingerprint(src: Path, worker_memory_gb: float) -> str:
    from rayconv.job import ConvertOptions, make_plan, open_checkpoint
    from rayconv.source.checkpoint import list_input

    options = ConvertOptions(files=list_input(str(src)), input_display=str(src), output="", model_name="llama-3",
                             worker_memory_gb=worker_memory_gb)
    return make_plan(open_checkpoint(options), options).fingerprint()


def wide_cli(src: Path, out: Path, memory: str, stop: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", RAY_USAGE_STATS_ENABLED="0")
    if stop:
        env["RAYCONV_TEST_STOP_AFTER"] = stop
    return subprocess.run([sys.executable, "-m", "rayconv.cli", "convert", "--no_progress", "--executor", "local",
                           "--input_directory", str(src), "--model_name", "llama-3", "--output_directory", str(out),
                           "--worker_memory_gb", memory], capture_output=True, text=True, env=env, timeout=300)


def test_raising_worker_memory_resumes_with_the_recorded_plan(tmp_path):
    src = synthetic_checkpoint(WIDE)
    assert _fingerprint(src, 0.3) != _fingerprint(src, 4.0)  # else this test would prove nothing
    out = tmp_path / "out"
    assert wide_cli(src, out, "0.3", stop="units:1").returncode == STOP_EXIT_CODE
    resumed = wide_cli(src, out, "4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming with the plan this output was started with" in resumed.stderr
    match = re.search(r"(\d+) units \((\d+) resumed\)", resumed.stderr)
    assert match and int(match.group(2)) == 1 and int(match.group(1)) >= 1, resumed.stderr[-2000:]
    run_convert(src, out, model_name="llama-3", executor="local", worker_memory_gb=4.0)  # resumes, verifies


def test_lowering_worker_memory_below_the_recorded_plan_is_refused(tmp_path):
    src = synthetic_checkpoint(WIDE)
    out = tmp_path / "out"
    assert wide_cli(src, out, "4", stop="units:1").returncode == STOP_EXIT_CODE
    error = one_error(wide_cli(src, out, "0.3"))
    assert "planned for workers of at least 0.31 GiB" in error and "--restart" in error


def test_reuploaded_gcs_shard_is_reread_and_the_rest_resumes(src, uninterrupted, tmp_path, gcs_prefix):
    """On GCS a shard's identity is its object generation: uploading it again re-reads its units only."""
    bucket_src = gcs_prefix.join("in")
    for path in sorted(src.iterdir()):
        bucket_src.write_bytes(path.name, path.read_bytes())
    out = tmp_path / "out"
    assert cli(bucket_src.uri, str(out), stop="intent").returncode == STOP_EXIT_CODE  # every unit done
    bucket_src.write_bytes("consolidated.01.pth", (src / "consolidated.01.pth").read_bytes())  # new generation

    from rayconv.job import ConvertOptions, make_plan, open_checkpoint
    from rayconv.source.checkpoint import list_input

    options = ConvertOptions(files=list_input(bucket_src.uri), input_display=bucket_src.uri, output="",
                             model_name=MODEL.family, kinds=KINDS, quantize_type="int8")
    plan = make_plan(open_checkpoint(options), options)
    reading = [u for u in plan.units if any(r.file == 1 for p in u.pieces for r in (*p.reads, *p.duplicates))]
    assert 0 < len(reading) < len(plan.units)
    result = run_convert(bucket_src.uri, out, model_name=MODEL.family, kinds=KINDS, quantize_type="int8",
                         executor="local")
    assert (result.units_run, result.units_skipped) == (len(reading), len(plan.units) - len(reading))
    assert_complete(Location.parse(str(out)), uninterrupted, tmp_path)


def test_damaged_ledger_entries(src, uninterrupted, tmp_path):
    """A damaged receipt only costs its unit a rerun; a damaged plan.json or a changed codec is one line."""
    out = tmp_path / "out"
    assert cli(src, str(out), stop="intent").returncode == STOP_EXIT_CODE
    receipts = sorted((out / ".rayconv/receipts").glob("*.json"))
    assert len(receipts) > 1
    receipts[0].write_text('{"unit": 3')
    result = resume(src, Location.parse(str(out)))
    assert (result.units_run, result.units_skipped) == (1, len(receipts) - 1)
    assert_complete(Location.parse(str(out)), uninterrupted, tmp_path)

    (out / ".rayconv/plan.json").write_text("{not json")
    assert "plan.json is damaged (not a rayconv ledger record); rerun with --restart" in one_error(cli(src, str(out)))

    other = tmp_path / "other"
    assert cli(src, str(other), stop="units:1").returncode == STOP_EXIT_CODE
    error = one_error(cli(src, str(other), "--compression", "zstd"))
    assert "was started with --compression none" in error


@pytest.mark.parametrize("free_kb,executor", [(16, "local"), (64, "ray")])
def test_disk_full_during_the_commit_keeps_finished_outputs(free_kb, executor, tmp_path, src, uninterrupted):
    """Issue 11, item 1's disk-full trigger, on a real filesystem: the units finish, then the disk is filled to
    within ``free_kb`` of full, so the commit itself runs out of space (16 KB: in the first merge; 64 KB: after
    one output has finished, on its neighbours' metadata or the ledger's commit records, whichever of the
    concurrent commits writes first). The run fails in one line; whatever carries a marker equals the
    uninterrupted run; once space is freed the same command finishes every output, bit-equal."""
    with small_filesystem(tmp_path / "disk", "64M") as disk:
        out = Location.parse(str(disk / "out"))
        stopped = cli(src, out.uri, stop="intent", executor=executor)
        assert stopped.returncode == STOP_EXIT_CODE, stopped.stderr[-3000:]
        filler = disk / "filler"
        stat = os.statvfs(disk)
        filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - free_kb * 1024))
        full = cli(src, out.uri, executor=executor)
        error = one_error(full)
        assert "No space left on device" in error, error
        # ... in the commit: an output's files, or the commit records of the ledger (not the lock, not the probe)
        assert re.search(r"/(bf16|int8)\b|/\.rayconv/commits/", error), error
        assert not all(json.loads(out.read_bytes(f".rayconv/commits/{kind}.json"))["state"] == "committed"
                       for kind in KINDS)
        assert_marked_outputs_are_right(out, uninterrupted, tmp_path)
        filler.unlink()
        again = cli(src, out.uri, executor=executor)
        assert again.returncode == 0, again.stderr[-3000:]
        assert_complete(out, uninterrupted, tmp_path)
