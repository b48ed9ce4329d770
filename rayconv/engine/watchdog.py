"""A local Ray started by rayconv dies with the rayconv process, even when that is SIGKILLed.

Ray fate-shares only its first generation with the driver that ran ``ray.init`` (gcs_server, raylet,
monitors die with it through ``PR_SET_PDEATHSIG``). The raylet's children, the dashboard and runtime-env
agents and the worker processes, are left to notice on their own: measured on Ray 2.60 after ``kill -9`` of
the driver, workers linger for seconds and the agents for about a minute, reparented to init. Nothing
kills them if their checks hang.

So before ``ray.init`` the driver starts this watchdog in its own session (a signal to the driver's
process group does not reach it) with a pipe on its stdin. The watchdog remembers, every
:data:`SNAPSHOT_SECONDS`, the driver's descendants created since it started (pid and start time, so a
reused pid is never hit); when the pipe reaches EOF — the driver exited, however — it terminates the
remembered processes that still run, and their children, then kills what ignores SIGTERM.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

SNAPSHOT_SECONDS = 0.5
TERM_GRACE_SECONDS = 3.0

_process: subprocess.Popen | None = None


def start() -> None:
    """Start the watchdog for this process (once); it lives until this process exits."""
    global _process
    if _process is not None and _process.poll() is None:
        return
    _process = subprocess.Popen([sys.executable, "-m", "rayconv.engine.watchdog", str(os.getpid()), repr(time.time())],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)


def _descendants(driver, since: float, me: int) -> dict[int, float]:
    import psutil

    found = {}
    try:
        children = driver.children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        try:
            created = child.create_time()
        except psutil.Error:
            continue
        if child.pid != me and created >= since - 1.0:
            found[child.pid] = created
    return found


def _reap(known: dict[int, float]) -> None:
    import psutil

    procs: dict[int, psutil.Process] = {}
    for pid, created in known.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created:
                procs[pid] = proc
        except psutil.Error:
            continue
    for proc in list(procs.values()):  # their children started after the last snapshot
        try:
            procs.update({c.pid: c for c in proc.children(recursive=True) if c.pid != os.getpid()})
        except psutil.Error:
            continue
    for proc in procs.values():
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=TERM_GRACE_SECONDS)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=TERM_GRACE_SECONDS)


def main(argv: list[str]) -> int:
    import psutil

    driver_pid, since = int(argv[1]), float(argv[2])
    try:
        driver = psutil.Process(driver_pid)
    except psutil.Error:
        return 0
    known: dict[int, float] = {}
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], SNAPSHOT_SECONDS)
        known.update(_descendants(driver, since, os.getpid()))
        if readable and not os.read(sys.stdin.fileno(), 4096):
            break  # EOF: the driver has exited
    _reap(known)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
