"""A successful `rayconv convert` with a local Ray exits without waiting for Ray's shutdown — and still leaves
no process behind, with every output committed (the CLI's fast exit relies on PR_SET_PDEATHSIG and the watchdog).
The Ray it starts has no autoscaler monitor and no dashboard API server (``rayconv.engine.lean_ray``).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import psutil

from conftest import synthetic_checkpoint
from rayconv.synthetic import SyntheticModel

MODEL = SyntheticModel(family="llama-3.1", dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512,
                       multiple_of=64, ffn_dim_multiplier=1.3, n_shards=2, seed=17)


def test_convert_with_local_ray_exits_at_once_and_leaves_nothing_running(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "rayconv.cli", "convert", "--no_progress", "--executor", "ray",
                             "--num_workers", "1", "--input_directory", str(synthetic_checkpoint(MODEL)),
                             "--output_directory", str(out), "--model_name", "llama-3.1", "--quantize_type", "int8",
                             "--quantize_weights", "True"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, float] = {}
    names: dict[int, str] = {}
    commands: dict[int, str] = {}
    done = threading.Event()

    def watch() -> None:  # every process the run starts (pid and start time, so a reused pid is not mistaken)
        while not done.is_set():
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    created = child.create_time()
                    if seen.setdefault(child.pid, created) != created:
                        continue  # a reused pid
                    # Read again at every sight: a child first seen between its fork and its exec still bears its
                    # parent's name and command line (the raylet was once recorded as "python" on a loaded machine).
                    names[child.pid], commands[child.pid] = child.name(), " ".join(child.cmdline())
            except psutil.Error:
                pass
            done.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate(timeout=600)
    done.set()
    watcher.join()
    assert proc.returncode == 0, stderr[-3000:]
    assert [line.split(":")[0] for line in stdout.splitlines()] == ["scanned", "unscanned", "int8"]
    assert "Done in" in stderr
    assert any(name.endswith("raylet") for name in names.values()), names  # a local Ray was started
    # ... without the daemons a one-machine conversion never uses (rayconv.engine.lean_ray)
    assert any("gcs_server" in command for command in commands.values()), commands
    unused = [c for c in commands.values() if "autoscaler/_private/monitor.py" in c or "dashboard/dashboard.py" in c]
    assert not unused, unused

    deadline = time.monotonic() + 30
    alive = seen
    while alive and time.monotonic() < deadline:
        alive = {}
        for pid, created in seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive[pid] = f"{pid} {p.name()}"
            except psutil.Error:
                pass
        time.sleep(0.2)
    assert not alive, f"still running 30 s after rayconv exited: {sorted(alive.values())}"
