"""The watchdog reaps what a dead driver started, also a process orphaned between two of its snapshots.

Issue 21 item 11: after a double Ctrl-C one Ray worker lived on for 30–60 s. The watchdog remembered the
driver's descendants every 0.5 s; a worker started just before the driver (and with it the raylet) died was
reparented to init before any snapshot saw it. The driver here is a small Python process that starts the real
watchdog, then a child that starts a grandchild and exits at once, then exits itself: the grandchild is never
the driver's descendant at a snapshot, exactly like that worker.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from helpers import cli_env

DRIVER = textwrap.dedent("""
    import subprocess, sys
    from rayconv.engine import watchdog
    watchdog.start()
    # The child starts the grandchild in a session of its own and exits: the grandchild is reparented at once.
    subprocess.run([sys.executable, "-c", "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
                    "'import time; time.sleep(120)'], start_new_session=True); print(p.pid)"],
                   stdout=open(sys.argv[1], "w"), check=True)
""")


def _alive(pid: int, created: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_a_process_orphaned_between_snapshots_is_reaped(tmp_path: Path):
    pid_file = tmp_path / "grandchild.pid"
    subprocess.run([sys.executable, "-c", DRIVER, str(pid_file)], env=cli_env(), check=True, timeout=60)
    pid = int(pid_file.read_text())
    proc = psutil.Process(pid)
    created = proc.create_time()
    try:
        deadline = time.monotonic() + 60  # a loaded machine (two test workers on 2 cores) is slow to reap
        while _alive(pid, created) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(pid, created), "the orphaned grandchild outlived its driver and the watchdog"
    finally:
        if _alive(pid, created):  # ours: started by the driver this test ran
            proc.kill()


def test_a_driver_dead_before_its_watchdog_looked_still_has_its_marked_processes_reaped():
    """On a loaded machine the driver (and the child that started the orphan) can exit before the watchdog's
    interpreter has even imported psutil: the watchdog finds no driver to snapshot, and the mark alone must
    still find what the driver started."""
    from rayconv.engine import watchdog

    since, token = time.time(), "dead-driver-test-token"
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True,
                              env={**cli_env(), watchdog.MARK: token})
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs: the driver
    created = psutil.Process(orphan.pid).create_time()
    try:
        subprocess.run([sys.executable, "-m", "rayconv.engine.watchdog", str(gone.pid), repr(since), token],
                       stdin=subprocess.DEVNULL, env=cli_env(), check=True, timeout=60)
        orphan.wait(timeout=10)
        assert not _alive(orphan.pid, created), "the watchdog left the dead driver's marked process running"
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
