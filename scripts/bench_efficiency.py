"""The efficiency row of ``scripts/bench.py``: MB of input converted per CPU-second.

On a cluster the disk is not the limit, CPU is, and CPU is what a job costs. Wall time on this shared
2-core machine moves with whatever else runs; the CPU-seconds a conversion spends (user + sys of the whole
process tree) move much less. So this row measures one ``rayconv convert --executor local`` (driver and worker
in one process, no Ray), all three outputs, written to tmpfs (no disk in the measurement), from a warm input
(every file is read once before each run: rayconv drops the pages it reads, so the next run would read cold),
and reports input MB / (user + sys CPU-seconds of the child and every descendant it waited for, from
``wait4``), over several runs (min / median / max).

    .venvs/main/bin/python scripts/bench.py --preset narrow --efficiency-only [--efficiency-runs 3]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: tmpfs, so the measurement holds the conversion's CPU and not a disk's latency.
TMPFS = Path("/dev/shm")


def warm(src: Path) -> None:
    """Read every input file once, so the conversion reads from the page cache."""
    buf = bytearray(64 << 20)
    for path in sorted(src.iterdir()):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def input_bytes(src: Path) -> int:
    return sum(p.stat().st_size for p in src.rglob("*") if p.is_file())


def convert_command(src: Path, out: Path, descriptor: str | None) -> list[str]:
    model = ["--model_path", descriptor] if descriptor else []
    return [sys.executable, "-m", "rayconv.cli", "convert", "--input_directory", str(src), "--output_directory",
            str(out), *model, "--quantize_type", "int8", "--quantize_weights", "True", "--no_progress", "--restart",
            "--skip_md5", "--executor", "local"]


def one_run(src: Path, descriptor: str | None, root: Path, log: Path) -> dict:
    """One measured conversion: wall seconds, user and sys CPU-seconds of the process tree, peak RSS."""
    warm(src)
    out = Path(tempfile.mkdtemp(prefix="rayconv-eff-", dir=root))
    env = dict(os.environ, JAX_PLATFORMS="cpu", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    try:
        start = time.monotonic()
        with open(log, "w") as f:
            proc = subprocess.Popen(convert_command(src, out / "o", descriptor), env=env, stdout=f,
                                    stderr=subprocess.STDOUT)
            # wait4: this child's own rusage (with every descendant it waited for), not the sum over all the
            # bench's children (RUSAGE_CHILDREN would also hold MaxText's chain and its peak RSS).
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"efficiency run failed ({proc.returncode}); log: {log}\n{log.read_text()[-3000:]}")
    user, sys_ = usage.ru_utime, usage.ru_stime
    return {"wall": wall, "user": user, "sys": sys_, "cpu": user + sys_, "peak_rss": usage.ru_maxrss * 1024}


def efficiency(src: Path, descriptor: str | None, logs: Path, runs: int = 3, root: Path | None = None) -> dict:
    """``runs`` measured conversions of ``src`` and their MB of input per CPU-second (min / median / max)."""
    root = root or (TMPFS if TMPFS.is_dir() else Path(tempfile.gettempdir()))
    size = input_bytes(src)
    samples = []
    for i in range(runs):
        sample = one_run(src, descriptor, root, logs / f"efficiency-{i}.log")
        sample["mb_per_cpu_s"] = size / 1e6 / sample["cpu"]
        samples.append(sample)
        print(f"  efficiency run {i + 1}/{runs}: {sample['cpu']:.2f} CPU-s (user {sample['user']:.2f} + sys "
              f"{sample['sys']:.2f}), wall {sample['wall']:.1f} s, {sample['mb_per_cpu_s']:.0f} MB/CPU-s, "
              f"peak RSS {sample['peak_rss'] / 1e9:.2f} GB", flush=True)
    rates = [s["mb_per_cpu_s"] for s in samples]
    cpus = [s["cpu"] for s in samples]
    return {"input_bytes": size, "output_root": str(root), "samples": samples,
            "mb_per_cpu_s": {"min": min(rates), "median": statistics.median(rates), "max": max(rates)},
            "cpu_s": {"min": min(cpus), "median": statistics.median(cpus), "max": max(cpus)}}


def efficiency_line(eff: dict) -> str:
    """The row's one-line summary for the results table."""
    r, c = eff["mb_per_cpu_s"], eff["cpu_s"]
    user = statistics.median(s["user"] for s in eff["samples"])
    sys_ = statistics.median(s["sys"] for s in eff["samples"])
    return (f"* Efficiency (`--executor local`, one process, output on tmpfs, warm input, all three outputs; "
            f"{len(eff['samples'])} runs): **{r['median']:.0f} MB of input per CPU-second** (median; min "
            f"{r['min']:.0f}, max {r['max']:.0f}), {c['median']:.2f} CPU-seconds (median user {user:.2f} + sys "
            f"{sys_:.2f}) for {eff['input_bytes'] / 1e9:.2f} GB.")
