"""The output lock, on a local disk and on fake-gcs-server: exclusive, stale locks taken over by
exactly one contender, heartbeats that notice a takeover, and a second conversion refused in one line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import MODELS, synthetic_checkpoint
from helpers import cli_env, run_convert_cli
from rayconv.sink.lock import OutputLock, OutputLocked, read_holder
from rayconv.storage import Location

MODEL = MODELS["llama3-mp1"][0]


@pytest.fixture(params=["local", "gs"])
def out(request, tmp_path) -> Location:
    if request.param == "local":
        return Location.parse(str(tmp_path / "out"))
    return request.getfixturevalue("gcs_prefix")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant(out: Location, **holder) -> None:
    """A lock left behind by some other process."""
    now = time.time()
    body = {"owner": "someone-else", "host": socket.gethostname(), "pid": os.getpid(), "started": now,
            "heartbeat": now, **holder}
    out.join(".rayconv").write_bytes("lock", json.dumps(body).encode())


def test_second_holder_is_refused_naming_the_first(out):
    with OutputLock(out, stale=60):
        holder = read_holder(out)
        assert holder is not None and holder.pid == os.getpid() and holder.host == socket.gethostname()
        with pytest.raises(OutputLocked) as refused:
            OutputLock(out, stale=60).acquire()
        message = str(refused.value)
        assert f"host {socket.gethostname()}, pid {os.getpid()}, last heartbeat" in message and out.uri in message
    assert read_holder(out) is None  # released
    OutputLock(out, stale=60).acquire().release()  # and free again


@pytest.mark.parametrize("why", ["dead pid", "old heartbeat"])
def test_stale_lock_is_taken_over(out, why):
    if why == "dead pid":
        plant(out, pid=dead_pid())  # same host, process gone: stale at once
    else:
        plant(out, host="another-host", heartbeat=time.time() - 600)
    lock = OutputLock(out, stale=120).acquire()
    try:
        assert lock.took_over is not None and lock.took_over.owner == "someone-else"
        assert read_holder(out).pid == os.getpid()
    finally:
        lock.release()


def test_live_lock_of_another_host_is_respected(out):
    """Another host's holder is alive when its heartbeat advances: refused, naming it."""
    plant(out, host="another-host", pid=1)
    stop = threading.Event()

    def beat() -> None:  # the other host's heartbeat thread
        while not stop.wait(0.3):
            plant(out, host="another-host", pid=1)

    beating = threading.Thread(target=beat)
    beating.start()
    try:
        started = time.time()
        with pytest.raises(OutputLocked, match="being written by another conversion \\(host another-host, pid 1,"):
            OutputLock(out, stale=8).acquire()
        assert time.time() - started < 6  # refused once a beat was seen, not after the timeout
    finally:
        stop.set()
        beating.join()
    assert read_holder(out).owner == "someone-else"


def test_silent_lock_of_another_host_is_taken_over_once_stale(out):
    """A job retried on a fresh cluster right after its driver died: it waits out the heartbeat timeout."""
    plant(out, host="another-host", pid=1)  # fresh heartbeat, but nobody beats any more
    started = time.time()
    lock = OutputLock(out, stale=3).acquire()
    try:
        assert 2 < time.time() - started < 15
        assert lock.took_over is not None and read_holder(out).pid == os.getpid()
    finally:
        lock.release()


def test_only_one_of_many_contenders_takes_over_a_stale_lock(out):
    plant(out, host="another-host", heartbeat=time.time() - 600)
    contenders = [OutputLock(out, stale=120) for _ in range(6)]
    won, refused = [], []
    barrier = threading.Barrier(len(contenders))

    def contend(lock: OutputLock) -> None:
        barrier.wait()
        try:
            won.append(lock.acquire())
        except OutputLocked as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=contend, args=(lock,)) for lock in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(won) == 1, (won, refused)
        assert len(refused) == len(contenders) - 1
        assert read_holder(out).owner == won[0]._holder.owner
    finally:
        for lock in won:
            lock.release()


def test_heartbeat_refreshes_and_notices_a_takeover(out):
    lock = OutputLock(out, stale=2, heartbeat=0.2).acquire()
    try:
        first = read_holder(out).heartbeat
        deadline = time.time() + 10
        while read_holder(out).heartbeat == first and time.time() < deadline:
            time.sleep(0.1)
        assert read_holder(out).heartbeat > first  # the thread beats
        lock._stop.set()  # this run "stalls": no more heartbeats
        lock._thread.join()
        time.sleep(2.5)
        thief = OutputLock(out, stale=2).acquire()
        lock.refresh()
        with pytest.raises(OutputLocked, match="lost the lock"):
            lock.check()
        lock.release()  # must not delete the new holder's lock
        assert read_holder(out).owner == thief._holder.owner
        thief.release()
    finally:
        lock.release()


def cli(*args: str, env: dict | None = None, wait: bool = True):
    if wait:
        return run_convert_cli(*args, env=env)
    cmd = [sys.executable, "-m", "rayconv.cli", "convert", "--no_progress", "--executor", "local", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(env))


def test_second_conversion_into_one_output_refuses_while_the_first_runs(out, tmp_path):
    src = synthetic_checkpoint(MODEL)
    args = ["--input_directory", str(src), "--model_name", MODEL.family, "--output_directory", out.uri]
    release = tmp_path / "release"
    first = cli(*args, env={"RAYCONV_TEST_WAIT_AFTER": "intent", "RAYCONV_TEST_WAIT_FILE": str(release)},
                wait=False)
    try:
        deadline = time.time() + 120
        while not os.path.exists(f"{release}.reached") and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert os.path.exists(f"{release}.reached"), first.communicate()[1][-2000:]
        second = cli(*args)
        errors = [line for line in second.stderr.splitlines() if line.startswith("rayconv: error:")]
        assert second.returncode == 1 and len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"being written by another conversion (host {socket.gethostname()}, pid {first.pid}," in errors[0]
        release.touch()
        _, stderr = first.communicate(timeout=300)
        assert first.returncode == 0, stderr[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert read_holder(out) is None
    assert out.exists("bf16/scanned/0/commit_success.txt") and out.exists("bf16/unscanned/checkpoints/0/commit_success.txt")


def test_a_run_that_lost_its_lock_stops_before_committing(tmp_path):
    src = synthetic_checkpoint(MODEL)
    out = Location.parse(str(tmp_path / "out"))
    release = tmp_path / "release"
    run = cli("--input_directory", str(src), "--model_name", MODEL.family, "--output_directory", out.uri,
              env={"RAYCONV_TEST_WAIT_AFTER": "units:1", "RAYCONV_TEST_WAIT_FILE": str(release),
                   "RAYCONV_LOCK_STALE_SECONDS": "2"}, wait=False)
    try:
        deadline = time.time() + 120
        while not os.path.exists(f"{release}.reached") and run.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert os.path.exists(f"{release}.reached"), run.communicate()[1][-2000:]
        plant(out, host="another-host", pid=1)  # someone took the output over while this run was paused
        time.sleep(1.5)  # at least one heartbeat (every 0.5 s) notices
        release.touch()
        _, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    errors = [line for line in stderr.splitlines() if line.startswith("rayconv: error:")]
    assert run.returncode == 1 and len(errors) == 1, stderr[-3000:]
    assert "lost the lock" in errors[0] and "host another-host, pid 1" in errors[0]
    assert not list((tmp_path / "out").rglob("commit_success.txt"))
    assert read_holder(out).owner == "someone-else"  # the new holder's lock is left alone


def acquire_within(lock: OutputLock, limit: float = 90.0) -> OutputLock:
    """``lock.acquire()`` in a thread; fails (instead of hanging the suite) if it is still waiting after ``limit``."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(_try(lock.acquire)), daemon=True)
    thread.start()
    thread.join(limit)
    assert result, f"acquire() still waiting after {limit:.0f} s"
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _try(fn):
    try:
        return fn()
    except BaseException as exc:  # handed to the test thread
        return exc


@pytest.mark.parametrize("heartbeat", ["ten years ahead", "1e300", "Infinity", "1e999"])
def test_a_heartbeat_from_the_future_does_not_hold_the_output(out, heartbeat):
    """A time beyond the clock-skew allowance is no sign of life: judged by the lock's age, the wait is bounded."""
    body = {"owner": "someone-else", "host": "another-host", "pid": 1, "started": time.time()}
    text = json.dumps(body)[:-1] + ', "heartbeat": ' + {
        "ten years ahead": repr(time.time() + 10 * 365 * 86400)}.get(heartbeat, heartbeat) + "}"
    out.join(".rayconv").write_bytes("lock", text.encode())
    lock = acquire_within(OutputLock(out, stale=2))
    try:
        assert lock.took_over is None  # nobody believable held it
        assert read_holder(out).pid == os.getpid()
    finally:
        lock.release()


@pytest.mark.parametrize("body", ["deep", "digits", "pid", "list"])
def test_a_hostile_lock_file_is_an_unreadable_lock(out, body):
    """Garbage that breaks json.loads (RecursionError, int limit) or names no process is unreadable, hence stale in time."""
    data = {"deep": "[" * 100000 + "]" * 100000,
            "digits": '{"owner": "x", "host": "h", "pid": ' + "9" * 5000 + ', "started": 1, "heartbeat": 1}',
            "pid": json.dumps({"owner": "x", "host": socket.gethostname(), "pid": 10**40, "started": 1,
                               "heartbeat": time.time()}),
            "list": "[]"}[body]
    out.join(".rayconv").write_bytes("lock", data.encode())
    assert read_holder(out) is None
    lock = acquire_within(OutputLock(out, stale=2))
    try:
        assert read_holder(out).pid == os.getpid()
    finally:
        lock.release()


def test_an_unreadable_lock_touched_into_the_future_is_stale(tmp_path):
    """A local lock whose mtime lies years ahead shows no life: taken over at once, not after years."""
    out = Location.parse(str(tmp_path / "out"))
    out.join(".rayconv").write_bytes("lock", b"not json")
    future = time.time() + 10 * 365 * 86400
    os.utime(tmp_path / "out" / ".rayconv" / "lock", (future, future))
    lock = acquire_within(OutputLock(out, stale=2))
    lock.release()
