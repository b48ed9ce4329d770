"""Hostile input, one test per class: whatever a user or a damaged file feeds rayconv ends in one line.

Each case runs the real CLI in a subprocess and asserts exit status 1, a last stderr line starting with
``rayconv: error:``, no traceback, and no ``commit_success.txt`` under the output (nothing looks complete).
The local executor is used where Ray adds nothing; the Ray-specific failures are in test_ray_lifecycle.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import synthetic_checkpoint
from helpers import assert_one_line, run_cli
from rayconv.synthetic import SyntheticModel

MODEL = SyntheticModel(family="llama-3.1", dim=256, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=256,
                       multiple_of=64, n_shards=2, seed=41)


def convert(src: Path, out: Path, *extra: str, executor: str = "local") -> subprocess.CompletedProcess:
    return run_cli("convert", "--no_progress", "--executor", executor, "--input_directory", str(src),
                   "--output_directory", str(out), "--model_name", "llama-3.1", *extra)


@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    dst = tmp_path / "in"
    shutil.copytree(synthetic_checkpoint(MODEL), dst)
    return dst


def edit_params(src: Path, **changes) -> None:
    params = json.loads((src / "params.json").read_text())
    params.update(changes)
    (src / "params.json").write_text(json.dumps(params))


# -- params.json: wrong types, zero divisors, absurd sizes --------------------------------------------------


@pytest.mark.parametrize("changes,needle", [
    ({"dim": "abc"}, 'dim must be an integer, got "abc"'),
    ({"dim": [256]}, "dim must be an integer, got [256]"),
    ({"dim": None}, "dim is null"),
    ({"dim": -256}, "dim -256 is out of range"),
    ({"dim": 256.0}, "dim must be an integer, got 256.0"),
    ({"dim": True}, "dim must be an integer, got true"),
    ({"n_heads": 0}, "n_heads 0 is out of range"),
    ({"n_kv_heads": 0}, "n_kv_heads 0 is out of range"),
    ({"n_kv_heads": "4"}, 'n_kv_heads must be an integer, got "4"'),
    ({"multiple_of": 0}, "multiple_of 0 is out of range"),
    ({"ffn_dim_multiplier": "x"}, 'ffn_dim_multiplier must be a number, got "x"'),
    ({"ffn_dim_multiplier": float("nan")}, "params.json: NaN is not a JSON number"),  # the bounded JSON reader
    ({"ffn_dim_multiplier": 1e300}, "ffn_dim_multiplier 1e+300 must be a positive finite number at most 64"),
    ({"norm_eps": 1e300}, "norm_eps 1e+300 must be a positive finite number at most 1"),
    ({"rope_theta": 1e300}, "rope_theta 1e+300 must be a positive finite number at most 1e+12"),
    ({"ffn_dim_multiplier": -1}, "ffn_dim_multiplier -1.0 must be a positive finite number"),
    ({"norm_eps": "x"}, "norm_eps must be a number"),
    ({"rope_theta": [1]}, "rope_theta must be a number"),
    ({"use_scaled_rope": "no"}, "use_scaled_rope must be true or false"),
    # Llama 3.1 (the flag) has the scaled rope: as on the HF path (config.json's rope_type), a params.json saying
    # otherwise is another model (item 8 of issue 21).
    ({"use_scaled_rope": False}, "use_scaled_rope false (no scaled rope: Llama 2/3), which disagrees with model "
                                 "llama-3.1"),
    ({"vocab_size": 10**15}, "vocab_size 1000000000000000 is out of range"),
    ({"n_layers": 10**12}, "n_layers 1000000000000 is out of range"),
    # Within the hard bound, but more layers than the shards hold: refused before the table is built.
    ({"n_layers": 4000}, "has no tensor layers.1.attention.wq.weight (params.json says 4000 layers)"),
])
def test_params_json_hostile_values(checkpoint, tmp_path, changes, needle):
    edit_params(checkpoint, **changes)
    out = tmp_path / "out"
    started = time.monotonic()
    assert_one_line(convert(checkpoint, out), needle, out)
    assert time.monotonic() - started < 60
    assert not out.exists() or not (out / "bf16").exists()


def test_params_json_not_an_object_or_oversized(checkpoint, tmp_path):
    out = tmp_path / "out"
    (checkpoint / "params.json").write_text("[1, 2]")
    assert_one_line(convert(checkpoint, out), "is not a JSON object", out)
    (checkpoint / "params.json").write_bytes(b" " * (2 << 20))
    assert_one_line(convert(checkpoint, out), "not a Meta params.json", out)


# -- malformed pickles made only of the classes a weights file may name ----------------------------------------
# Hand-assembled pickle opcodes (protocol 2): each names only torch._utils._rebuild_tensor_v2, a torch storage
# type and collections.OrderedDict, but with arguments of the wrong type. helper B hardens the reader itself;
# here the CLI must turn whatever the parser trips on into one line.


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(text: str) -> bytes:
    return b"X" + len(text.encode()).to_bytes(4, "little") + text.encode()


def _int(n: int) -> bytes:
    return b"J" + n.to_bytes(4, "little", signed=True)


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _storage(type_obj: bytes | None = None) -> bytes:
    return _tuple(_str("storage"), type_obj or _global("torch", "BFloat16Storage"), _str("0"), _str("cpu"),
                  _int(4)) + b"Q"


def _rebuild(storage: bytes, size: bytes = _tuple(_int(4))) -> bytes:
    hooks = _global("collections", "OrderedDict") + _tuple() + b"R"
    return _global("torch._utils", "_rebuild_tensor_v2") + _tuple(storage, _int(0), size, _tuple(_int(1)),
                                                                   b"\x89", hooks) + b"R"


def _state(value: bytes) -> bytes:
    return b"\x80\x02}" + _str("tok_embeddings.weight") + value + b"s."


@pytest.mark.parametrize("pickled", [
    _state(_rebuild(_str("not a storage"))),
    _state(_rebuild(_storage(type_obj=_str("BFloat16Storage")))),
    _state(_rebuild(_storage(), size=_int(4))),
    b"\x80\x02" + _global("collections", "OrderedDict") + _tuple(_int(5)) + b"R.",
], ids=["storage-is-a-string", "storage-type-is-a-string", "size-is-an-int", "ordereddict-of-an-int"])
def test_malformed_pickle_of_allowed_classes(checkpoint, tmp_path, pickled):
    import zipfile

    shard = checkpoint / "consolidated.00.pth"
    with zipfile.ZipFile(shard) as archive:
        entries = [(info.filename, archive.read(info.filename)) for info in archive.infolist()]
    with zipfile.ZipFile(shard, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries:
            archive.writestr(name, pickled if name.endswith("data.pkl") else data)
    out = tmp_path / "out"
    assert_one_line(convert(checkpoint, out), "consolidated.00.pth", out)


# -- flags ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,needle", [
    (["--worker_memory_gb", "0"], "--worker_memory_gb must be"),
    (["--worker_memory_gb", "nan"], "--worker_memory_gb must be"),
    (["--worker_memory_gb", "inf"], "--worker_memory_gb must be"),
    (["--worker_memory_gb", "-1"], "--worker_memory_gb must be"),
    (["--num_workers", "0"], "--num_workers must be at least 1, got 0"),
    (["--num_workers", "-1"], "--num_workers must be at least 1, got -1"),
    (["--num_kv_heads", "0"], "--num_kv_heads must be at least 1"),
    (["--num_kv_heads", "3"], "is not a multiple of n_kv_heads 3"),
    (["--worker_start_timeout", "0"], "--worker_start_timeout must be a positive number"),
])
def test_engine_flags_are_checked_before_ray_starts(checkpoint, tmp_path, flags, needle):
    out = tmp_path / "out"
    started = time.monotonic()
    assert_one_line(convert(checkpoint, out, *flags, executor="ray"), needle, out)
    assert time.monotonic() - started < 60  # no Ray was started, nothing waited


def test_plan_refuses_bad_budgets(checkpoint):
    for value in ("0", "nan"):
        result = run_cli("plan", "--input_directory", str(checkpoint), "--model_name", "llama-3.1",
                         "--worker_memory_gb", value)
        assert_one_line(result, "--worker_memory_gb must be")


# -- rayconv synthetic ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,needle", [
    (["--n_shards", "0"], "n_shards must be an integer from 1"),
    (["--n_shards", "-1"], "n_shards must be an integer from 1"),
    (["--n_shards", "3"], "must be a multiple of n_shards"),
    (["--n_layers", "0"], "n_layers must be an integer from 1"),
    (["--seed", "-1"], "seed must be a non-negative integer"),
])
def test_synthetic_refuses_invalid_dims(tmp_path, flags, needle):
    out = tmp_path / "syn"
    assert_one_line(run_cli("synthetic", "demo", "--out", str(out), *flags), needle)
    assert not out.exists() or not any(out.iterdir())


# -- rayconv verify on a damaged output ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "out"
    result = convert(synthetic_checkpoint(MODEL), out, "--skip_scanned")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


ITEMS = "bf16/unscanned/checkpoints/0/items"


def _largest_data_file(items: Path) -> Path:
    return max((p for p in items.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)


def _delete_a_zarr_json(items: Path) -> None:
    """Remove one array's zarr.json key from the OCDBT database (the file is a key inside it, not on disk)."""
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{items}/"}).result()
    key = sorted(k for k in kv.list().result() if k.endswith(b"/zarr.json"))[0]
    kv.delete_range(ts.KvStore.KeyRange(key, key + b"\x00")).result()


@pytest.mark.parametrize("damage,needle", [
    (lambda items: _largest_data_file(items).unlink(), "cannot be read (the checkpoint is damaged)"),
    (_delete_a_zarr_json, "zarr.json"),
    (lambda items: os.truncate(items / "manifest.ocdbt", 20), "cannot be read (the checkpoint is damaged)"),
    (lambda items: [shutil.rmtree(d) for d in items.rglob("d") if d.is_dir()],
     "cannot be read (the checkpoint is damaged)"),
    (lambda items: (items / "_METADATA").write_bytes(b"\x9f garbage {"), "_METADATA is damaged"),
    (lambda items: (items / "_METADATA").write_text('{"tree_metadata": 5}'), "_METADATA is damaged"),
])
def test_verify_reports_a_damaged_output_in_one_line(converted, tmp_path, damage, needle):
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    damage(out / ITEMS)
    result = run_cli("verify", str(synthetic_checkpoint(MODEL)), str(out), "--model_name", "llama-3.1")
    assert_one_line(result, needle)


def test_verify_passes_the_undamaged_output(converted):
    result = run_cli("verify", str(synthetic_checkpoint(MODEL)), str(converted), "--model_name", "llama-3.1")
    assert result.returncode == 0, result.stderr[-3000:]


# -- damaged ledger (<out>/.rayconv) ---------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"{{{", b"[1]", b"\xff\xfe binary", b'{"fingerprint": "x", "committed": 5}'])
def test_damaged_plan_record_asks_for_restart(converted, tmp_path, content):
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    (out / ".rayconv/plan.json").write_bytes(content)
    result = convert(synthetic_checkpoint(MODEL), out, "--skip_scanned")
    assert_one_line(result, "plan.json is damaged")
    assert "--restart" in result.stderr
    restarted = convert(synthetic_checkpoint(MODEL), out, "--skip_scanned", "--restart")
    assert restarted.returncode == 0, restarted.stderr[-3000:]


#: Many one-layer units: a run can be stopped between two receipts.
LAYERED = SyntheticModel(family="llama-3.1", dim=256, n_layers=24, n_heads=8, n_kv_heads=4, vocab_size=256,
                         multiple_of=64, n_shards=2, seed=31)


def test_damaged_receipt_is_redone_not_fatal(tmp_path):
    """A run stopped mid-way (SIGTERM), two of its receipts damaged: the rerun redoes those units only."""
    src, out = synthetic_checkpoint(LAYERED), tmp_path / "out"
    argv = [sys.executable, "-m", "rayconv.cli", "convert", "--no_progress", "--executor", "local",
            "--input_directory", str(src), "--output_directory", str(out), "--model_name", "llama-3.1",
            "--skip_scanned"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = out / ".rayconv/receipts"
    deadline = time.monotonic() + 300
    while not folder.exists() or len(list(folder.glob("*.json"))) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.terminate()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "interrupted (SIGTERM)" in stderr, stderr[-3000:]
    receipts = sorted(folder.glob("*.json"))
    receipts[0].write_bytes(receipts[0].read_bytes()[:25])
    receipts[1].write_text('{"unit": "x"}')

    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "is not a valid rayconv receipt; its unit runs again" in result.stderr
    assert f"Resuming: {len(receipts) - 2} of" in result.stderr
    verified = run_cli("verify", str(src), str(out), "--model_name", "llama-3.1")
    assert verified.returncode == 0, verified.stderr[-3000:]


# -- the one unwrap: Ray's task wrapper and OS errors --------------------------------------------------------


def _wrapped(cause: BaseException) -> BaseException:
    """``cause`` as ``ray.get`` raises it: Ray's RayTaskError, dual-classed with the cause's own type."""
    from ray.exceptions import RayTaskError

    try:
        raise cause
    except BaseException as exc:  # noqa: BLE001 - building Ray's wrapper from a real raise
        import traceback

        return RayTaskError("ConverterWorker.run", traceback.format_exc(), exc).as_instanceof_cause()


def test_user_error_unwraps_ray_task_errors_and_os_errors_but_not_bugs():
    from rayconv.errors import ConversionError, SourceError, user_error

    wrapped = _wrapped(SourceError("consolidated.03.pth is truncated"))
    # Why unwrapping is needed: it *is* a SourceError, but its message is the remote stack, many lines long.
    assert isinstance(wrapped, SourceError) and "\n" in str(wrapped) and "line " in str(wrapped)
    error = user_error(wrapped)
    assert type(error) is SourceError and str(error) == "consolidated.03.pth is truncated"

    disk = user_error(_wrapped(OSError(errno.ENOSPC, "No space left on device", "/out/int8/d/x")))
    assert isinstance(disk, ConversionError) and str(disk) == "No space left on device: /out/int8/d/x"

    from ray.exceptions import ActorDiedError, OutOfMemoryError

    oom = user_error(OutOfMemoryError("Task was killed due to the node running low on memory.\nMemory on the node"))
    assert isinstance(oom, ConversionError) and "node running low on memory" in str(oom)
    assert "--worker_memory_gb" in str(oom) and "\n" not in str(oom)
    assert "rerun the same command" in str(user_error(ActorDiedError()))

    assert user_error(_wrapped(KeyError("a bug"))) is None
    assert user_error(ZeroDivisionError()) is None
    assert user_error(OSError(errno.EBADF, "Bad file descriptor")) is None  # a bug, not the environment



def test_unreachable_ray_address_fails_in_seconds(checkpoint, tmp_path):
    """RAY_ADDRESS (or --address) naming nothing: one line within seconds, not minutes of Ray reconnecting."""
    from servers import free_port

    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu", RAY_ADDRESS=f"127.0.0.1:{free_port()}")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "rayconv.cli", "convert", "--no_progress", "--input_directory",
                             str(checkpoint), "--output_directory", str(out), "--model_name", "llama-3.1"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert_one_line(result, "cannot reach the Ray cluster at 127.0.0.1:", out)
    assert "(RAY_ADDRESS)" in result.stderr and time.monotonic() - started < 60
    assert_one_line(convert(checkpoint, out, "--address", "localhost:port", executor="ray"),
                    "--address 'localhost:port' is not a Ray address", out)


def test_os_error_from_storage_is_one_line(tmp_path):
    """An OSError that no rayconv check anticipated (here: the output's parent is a file) still ends in one line."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_cli("synthetic", "demo", "--out", str(blocker / "syn"), "--n_layers", "1")
    assert_one_line(result, str(blocker))
