"""A real multi-process Ray cluster for tests: ``ray start --head`` in its own temp dir and ports.

Shared by tests/test_deploy.py (the RayJob entrypoint) and tests/test_ray_lifecycle.py (``ray job submit``).
It stops only the processes it started (never ``ray stop``, which would kill every Ray on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    """`ray start --head` in its own temp dir and ports; stopped by killing only its own processes."""

    def __init__(self, *, num_cpus: int, memory: int, env: dict[str, str]) -> None:
        self.tmp = tempfile.mkdtemp(prefix="rcdeploy-", dir="/tmp")  # short: unix socket paths are limited
        self.port, self.dashboard = _free_port(), _free_port()
        self.env = env
        self.args = [
            "--head", f"--port={self.port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard}", f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}", f"--num-cpus={num_cpus}", f"--memory={memory}",
            f"--object-store-memory={512 << 20}", f"--temp-dir={self.tmp}", "--disable-usage-stats",
        ]
        self.pgid: int | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    def start(self) -> "LocalRayCluster":
        proc = subprocess.Popen([bin_path("ray"), "start", *self.args], env=self.env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.pgid = proc.pid
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{out}")
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 120
        while True:
            try:
                JobSubmissionClient(self.address).list_jobs()
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(1)

    def _processes(self):
        import psutil

        mine = set()
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if (self.pgid is not None and os.getpgid(proc.pid) == self.pgid) or \
                        any(self.tmp in arg for arg in proc.info["cmdline"] or []):
                    mine.add(proc)
            except (psutil.Error, ProcessLookupError):
                pass
        for proc in list(mine):
            try:
                mine.update(proc.children(recursive=True))
            except psutil.Error:
                pass
        mine.discard(psutil.Process())
        return mine

    def stop(self) -> None:
        """Never `ray stop`: it would kill every Ray on the machine. Only this cluster's process tree."""
        import psutil

        procs = self._processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.tmp, ignore_errors=True)


def bin_path(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is not installed next to {sys.executable} (pip install -e .)"
    return found
