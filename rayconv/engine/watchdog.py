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

A snapshot misses a process that was orphaned between two snapshots (a worker the raylet started just before
the driver, and with it the raylet, died: reparented to init, no longer the driver's descendant). So the driver
also carries a mark in its environment, :data:`MARK` = a token of this watchdog's own, which every process it
starts from then on inherits (the raylet, and through it every worker and agent); at EOF the watchdog also
terminates every process created since it started that carries its token, wherever it was reparented.
"""

from __future__ import annotations

import os
import secrets
import select
import subprocess
import sys
import time

SNAPSHOT_SECONDS = 0.5
TERM_GRACE_SECONDS = 3.0

#: The environment variable that marks the processes a rayconv process started after its watchdog.
MARK = "RAYCONV_WATCHDOG_MARK"

_process: subprocess.Popen | None = None


def start() -> None:
    """Start the watchdog for this process (once); it lives until this process exits. From here on, every process
    this one starts carries the watchdog's mark (:data:`MARK`) in its environment."""
    global _process
    if _process is not None and _process.poll() is None:
        return
    token = f"{os.getpid()}-{secrets.token_hex(8)}"
    _process = subprocess.Popen([sys.executable, "-m", "rayconv.engine.watchdog", str(os.getpid()), repr(time.time()),
                                 token], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
                                env={k: v for k, v in os.environ.items() if k != MARK})
    os.environ[MARK] = token


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


def _marked(token: str, since: float, me: int) -> dict[int, float]:
    """Processes created since ``since`` whose environment carries ``token`` (reading /proc/<pid>/environ: only
    processes of this user, or any as root; the others cannot be ours)."""
    import psutil

    found = {}
    for proc in psutil.process_iter(["create_time"]):
        created = proc.info["create_time"]
        if proc.pid == me or created is None or created < since - 1.0:
            continue
        try:
            if proc.environ().get(MARK) == token:
                found[proc.pid] = created
        except psutil.Error:
            continue
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
    token = argv[3] if len(argv) > 3 else ""
    try:
        driver: psutil.Process | None = psutil.Process(driver_pid)
    except psutil.Error:
        # The driver died before this process got here (a loaded machine, a kill right after the start): nothing
        # to snapshot, but what it started carries the mark, so the sweep below still runs.
        driver = None
    known: dict[int, float] = {}
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], SNAPSHOT_SECONDS)
        if driver is not None:
            known.update(_descendants(driver, since, os.getpid()))
        if readable and not os.read(sys.stdin.fileno(), 4096):
            break  # EOF: the driver has exited
    if token:
        known.update(_marked(token, since, os.getpid()))
    _reap(known)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
