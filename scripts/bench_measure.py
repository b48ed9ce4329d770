"""The measuring parts every benchmark script shares: a contender's run (wall time, peak RSS/PSS of the whole
process tree), cold page caches, the I/O floor, rayconv's closing line. ``bench.py`` (convert), ``bench_export.py``,
``bench_qwen3.py`` and ``bench_sources.py`` import them from here, so no script imports another's entry point."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


#: rayconv's OCDBT commit batch on a local disk (rayconv.job.COMMIT_BATCH_BYTES): the durable unit of its writes.
SYNC_BATCH = 16 << 20
BLOCK = 64 << 20


@dataclasses.dataclass
class Run:
    name: str
    seconds: float
    peak_rss: int
    peak_pss: int
    steps: list[dict] = dataclasses.field(default_factory=list)
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    worker_mb_s: float | None = None  # per-worker conversion rate from the closing log line
    failed: str | None = None  # why the run did not finish (e.g. killed: out of memory)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class TreeSampler(threading.Thread):
    """Peak of the summed RSS/PSS of a process and all its descendants.

    RSS comes from /proc/<pid>/statm (cheap) every ``interval``; PSS needs /proc/<pid>/smaps_rollup, which costs
    the kernel a walk of every mapping: sampling it for a dozen Ray processes ten times a second took a third
    of a core on this 2-core machine (measured with ps during a run), slowing the many-process contender it
    measures. PSS is therefore sampled every ``pss_every`` samples."""

    def __init__(self, pid: int, interval: float = 0.1, pss_every: int = 10) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.pss_every = pid, interval, pss_every
        self.peak_rss = self.peak_pss = 0
        self.done = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        tick = 0
        while not self.done.is_set():
            with_pss = tick % self.pss_every == 0
            tick += 1
            rss = pss = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for proc in procs:
                try:
                    if with_pss:
                        info = proc.memory_full_info()
                        rss += info.rss
                        pss += getattr(info, "pss", info.rss)
                    else:
                        rss += proc.memory_info().rss
                except psutil.Error:
                    continue
            self.peak_rss = max(self.peak_rss, rss)
            if with_pss:
                self.peak_pss = max(self.peak_pss, pss)
            self.done.wait(self.interval)


def load() -> str:
    """The 1/5/15-minute load averages (how busy the machine was while measuring)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def drop_cache(paths: list[Path]) -> None:
    """Evict the files' pages from the page cache (clean pages: no root needed), so the next read is cold."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(cmd: list[str], env: dict | None = None, cwd: str | None = None, log: Path | None = None,
            check: bool = True) -> Run:
    start = time.monotonic()
    with open(log or os.devnull, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        sampler.done.set()
        sampler.join()
    seconds = time.monotonic() - start
    run = Run(Path(cmd[1]).name if len(cmd) > 1 else cmd[0], seconds, sampler.peak_rss, sampler.peak_pss)
    if rc != 0:
        tail = log.read_text()[-3000:] if log else ""
        if check:
            raise SystemExit(f"benchmark step failed ({rc}): {' '.join(cmd)}\n{tail}")
        run.failed = f"exit status {rc}" + (" (killed: SIGKILL, the kernel's out-of-memory killer)" if rc == -9 else "")
    return run


CLOSING = re.compile(r"Done in ([\d.]+) s \(([^)]*)\)")
PHASE = re.compile(r"([a-z][a-z ]*) ([\d.]+) s")
RATE = re.compile(r"per-worker rate ([\d.]+) MB/s")


def parse_closing_line(text: str) -> tuple[dict[str, float], float | None]:
    """Phase seconds and the per-worker rate from rayconv's closing log line."""
    match = CLOSING.search(text)
    phases = {name: float(value) for name, value in PHASE.findall(match.group(2))} if match else {}
    rate = RATE.search(text)
    return phases, float(rate.group(1)) if rate else None


def run_log(logs: Path, label: str) -> Path:
    """Where :func:`rayconv_run` keeps the log of the run named ``label``."""
    return logs / f"{label.replace(' ', '_').replace(',', '')}.log"


#: The outputs the Llama benchmarks ask for besides the bf16 ones (a family without AQT output passes ``()``).
INT8 = ("--quantize_type", "int8", "--quantize_weights", "True")


def rayconv_run(src: Path, out: Path, descriptor: str | None, logs: Path, label: str, *extra: str,
                outputs: tuple[str, ...] = INT8) -> Run:
    """``rayconv convert`` writing its outputs (bf16 and, by default, int8) from a cold page cache (``descriptor``
    None: an HF source names its model itself)."""
    model = ["--model_path", descriptor] if descriptor else []
    cmd = [sys.executable, "-m", "rayconv.cli", "convert", "--input_directory", str(src), "--output_directory",
           str(out), *model, *outputs, "--no_progress", "--restart", "--skip_md5", *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    drop_cache([p for p in sorted(src.iterdir()) if p.is_file()])
    log = run_log(logs, label)
    run = measure(cmd, env=env, log=log)
    run.name = label
    run.phases, run.worker_mb_s = parse_closing_line(log.read_text())
    phases = ", ".join(f"{k} {v:.1f}" for k, v in run.phases.items())
    print(f"  {label}: {run.seconds:.1f} s, peak RSS {run.peak_rss / 1e9:.2f} GB (PSS {run.peak_pss / 1e9:.2f}); "
          f"{phases}; {run.worker_mb_s} MB/s per worker", flush=True)
    return run


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def io_floor(src: Path, write_bytes: int, scratch: Path, sync_every: int | None = None,
             files: list[Path] | None = None) -> Run:
    """Read each input file once, cold; write write_bytes in 64 MiB blocks, fdatasync at the end (and every
    ``sync_every`` bytes if given). ``steps`` holds the read and the write times. ``files``: the input's files when
    ``src`` is not flat (a MaxText checkpoint's items)."""
    files = files or sorted(src.iterdir())
    drop_cache(files)
    buf = bytearray(BLOCK)
    start = time.monotonic()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    read_done = time.monotonic()
    data = os.urandom(BLOCK)
    target = scratch / "floor.bin"
    step = min(BLOCK, sync_every or BLOCK)
    with open(target, "wb", buffering=0) as f:
        left, since_sync = write_bytes, 0
        while left > 0:
            n = min(step, left)
            f.write(data[:n])
            left -= n
            since_sync += n
            if sync_every and since_sync >= sync_every:
                os.fdatasync(f.fileno())
                since_sync = 0
        os.fdatasync(f.fileno())
    seconds = time.monotonic() - start
    write_seconds = time.monotonic() - read_done
    target.unlink()
    rss = psutil.Process().memory_info().rss
    name = "I/O floor" + (f", fdatasync every {sync_every >> 20} MiB" if sync_every else "")
    return Run(name, seconds, rss, rss, steps=[
        {"name": "cold read", "seconds": read_done - start, "peak_rss": rss, "peak_pss": rss},
        {"name": "write + fdatasync", "seconds": write_seconds, "peak_rss": rss, "peak_pss": rss}])
