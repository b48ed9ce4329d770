#!/usr/bin/env python
"""Benchmark: rayconv vs MaxText's three-script chain vs the I/O floor, on one synthetic checkpoint, in one run.

    .venvs/main/bin/python scripts/bench.py                 # 405B layout, ~2.1 GB (+ a 2x model for rayconv)
    .venvs/main/bin/python scripts/bench.py --layers 18 --scale-layers 36 --out bench-results

Measured for each contender: wall time, and peak memory of the whole process tree (the sum over the process
and all its descendants, sampled every 0.1 s; both RSS and PSS, since Ray's processes share library pages):

* MaxText 0.2.4 as the tutorial runs it (reference env, Python 3.12): llama_or_mistral_ckpt (scanned) →
  generate_param_only_checkpoint (unscanned) → load_and_quantize_checkpoint (int8), one process each;
* rayconv producing the same three outputs in one pass: 1 worker, and one worker per core (Ray started by the
  CLI, so the tree includes Ray's GCS, raylet and workers);
* the I/O floor: read every input byte once and write as many bytes as rayconv writes, once, on the same disk;
* rayconv on a model with twice the layers (memory should stay flat).

Writes <out>/results.json, <out>/benchmarks.md (the table) and <out>/benchmarks.png (the chart).
Not a test: numbers depend on the machine; the targets are reported, not asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools" / "maxtext_ref"))  # the MaxText harness (reference.py)
sys.path.insert(0, str(REPO))

from rayconv.synthetic import PRESETS, ensure_checkpoint  # noqa: E402


@dataclasses.dataclass
class Run:
    name: str
    seconds: float
    peak_rss: int
    peak_pss: int
    steps: list[dict] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class TreeSampler(threading.Thread):
    """Peak of the summed RSS/PSS of a process and all its descendants."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0
        self.done = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.done.is_set():
            rss = pss = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for proc in procs:
                try:
                    info = proc.memory_full_info()
                    rss += info.rss
                    pss += getattr(info, "pss", info.rss)
                except psutil.Error:
                    continue
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.done.wait(self.interval)


def measure(cmd: list[str], env: dict | None = None, cwd: str | None = None, log: Path | None = None) -> Run:
    start = time.monotonic()
    with open(log or os.devnull, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        sampler.done.set()
        sampler.join()
    seconds = time.monotonic() - start
    if rc != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise SystemExit(f"benchmark step failed ({rc}): {' '.join(cmd)}\n{tail}")
    return Run(Path(cmd[1]).name if len(cmd) > 1 else cmd[0], seconds, sampler.peak_rss, sampler.peak_pss)


def maxtext_chain(model, src: Path, work: Path, logs: Path) -> Run:
    import reference

    spec = json.dumps(reference.model_spec(model))
    py, scripts, env = str(reference.ref_python()), reference.SCRIPTS_DIR, reference.child_env()
    steps = [
        ("llama_or_mistral_ckpt", [py, str(scripts / "scanned.py"), "--model", spec, "--src", str(src),
                                   "--out", str(work / "scanned")]),
        ("generate_param_only_checkpoint", [py, str(scripts / "unscanned.py"), "--model", spec, "--scanned",
                                            str(work / "scanned/0/items"), "--out-base", str(work),
                                            "--run-name", "unscanned"]),
        ("load_and_quantize_checkpoint", [py, str(scripts / "quantized.py"), "--model", spec, "--unscanned",
                                          str(work / "unscanned/checkpoints/0/items"), "--out", str(work / "int8"),
                                          "--quant", "int8"]),
    ]
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for name, cmd in steps:
        run = measure(cmd, env=env, cwd=str(work), log=logs / f"maxtext-{name}.log")
        run.name = name
        runs.append(run)
        print(f"  MaxText {name}: {run.seconds:.1f} s, peak RSS {run.peak_rss / 1e9:.2f} GB", flush=True)
    return Run("MaxText chain", sum(r.seconds for r in runs), max(r.peak_rss for r in runs),
               max(r.peak_pss for r in runs), [r.as_dict() for r in runs])


def rayconv_run(src: Path, out: Path, descriptor: str, workers: int, logs: Path, label: str) -> Run:
    cmd = [str(REPO / ".venvs/main/bin/rayconv"), "convert", "--input_directory", str(src), "--output_directory",
           str(out), "--model_path", descriptor, "--quantize_type", "int8", "--quantize_weights", "True",
           "--num_workers", str(workers), "--no_progress", "--restart"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", RAY_USAGE_STATS_ENABLED="0")
    run = measure(cmd, env=env, log=logs / f"{label}.log")
    run.name = label
    print(f"  {label}: {run.seconds:.1f} s, peak RSS {run.peak_rss / 1e9:.2f} GB (PSS {run.peak_pss / 1e9:.2f})",
          flush=True)
    return run


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def io_floor(src: Path, write_bytes: int, scratch: Path) -> Run:
    """Read each input file once, write write_bytes once (64 MiB blocks, fsync at the end like tensorstore)."""
    block = 64 << 20
    start = time.monotonic()
    for path in sorted(src.iterdir()):
        with open(path, "rb", buffering=0) as f:
            while f.read(block):
                pass
    buf = os.urandom(block)
    target = scratch / "floor.bin"
    with open(target, "wb", buffering=0) as f:
        left = write_bytes
        while left > 0:
            f.write(buf[: min(block, left)])
            left -= block
        os.fsync(f.fileno())
    seconds = time.monotonic() - start
    target.unlink()
    rss = psutil.Process().memory_info().rss
    return Run("I/O floor", seconds, rss, rss)


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    names = [r["name"] for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.barh(names, [r["seconds"] for r in runs], color="#4477aa")
    a.set_xlabel("wall time (s)")
    b.barh(names, [r["peak_rss"] / 1e9 for r in runs], color="#cc6677")
    b.set_xlabel("peak RSS of the process tree (GB)")
    for ax in (a, b):
        ax.invert_yaxis()
    fig.suptitle(f"{results['input']['description']}: {results['input']['bytes'] / 1e9:.2f} GB in")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: dict) -> str:
    runs = {r["name"]: r for r in results["runs"]}
    mx = runs["MaxText chain"]
    best = min((r for n, r in runs.items() if n.startswith("rayconv") and "2x" not in n), key=lambda r: r["seconds"])
    floor = runs["I/O floor"]
    lines = [
        f"Input: {results['input']['description']}, {results['input']['bytes'] / 1e9:.2f} GB "
        f"({results['input']['shards']} shards); outputs bf16 scanned + bf16 unscanned + int8, "
        f"{results['output_bytes'] / 1e9:.2f} GB written. Machine: {results['machine']}.",
        "",
        "| run | wall time (s) | peak RSS, tree (GB) | peak PSS, tree (GB) |",
        "|---|---:|---:|---:|",
    ]
    for r in results["runs"]:
        lines.append(f"| {r['name']} | {r['seconds']:.1f} | {r['peak_rss'] / 1e9:.2f} | {r['peak_pss'] / 1e9:.2f} |")
        for s in r.get("steps", []):
            lines.append(f"| &nbsp;&nbsp;{s['name']} | {s['seconds']:.1f} | {s['peak_rss'] / 1e9:.2f} | "
                         f"{s['peak_pss'] / 1e9:.2f} |")
    lines += [
        "",
        f"* rayconv ({best['name']}) vs MaxText: **{mx['seconds'] / best['seconds']:.1f}x faster**, "
        f"**{mx['peak_rss'] / best['peak_rss']:.1f}x less peak RSS** "
        f"({best['peak_rss'] / mx['peak_rss']:.2f} of MaxText's; PSS ratio {best['peak_pss'] / mx['peak_pss']:.2f}).",
        f"* rayconv vs the I/O floor: {best['seconds'] / floor['seconds']:.2f}x the floor's wall time.",
    ]
    if "rayconv, 2x layers" in runs:
        big = runs["rayconv, 2x layers"]
        same = runs.get(big.get("compare_to", ""), best)
        lines.append(f"* Memory vs model size: {results['input']['bytes'] / 1e9:.2f} GB → {same['peak_rss'] / 1e9:.2f} GB "
                     f"peak; {results['scaled_input_bytes'] / 1e9:.2f} GB → {big['peak_rss'] / 1e9:.2f} GB peak "
                     f"(same worker count).")
    if "MaxText chain, 2x layers" in runs:
        mx2 = runs["MaxText chain, 2x layers"]
        big = runs["rayconv, 2x layers"]
        lines.append(f"* At {results['scaled_input_bytes'] / 1e9:.2f} GB: rayconv **{mx2['seconds'] / big['seconds']:.1f}x "
                     f"faster** than MaxText's chain, **{mx2['peak_rss'] / big['peak_rss']:.1f}x less peak RSS**; "
                     f"MaxText's peak grew {mx2['peak_rss'] / mx['peak_rss']:.2f}x, rayconv's "
                     f"{big['peak_rss'] / best['peak_rss']:.2f}x.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="405b-2gb")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--scale-layers", type=int, default=None, help="layers of the 2x model (default 2x)")
    parser.add_argument("--out", default=str(REPO / "bench-results"))
    parser.add_argument("--scratch", default=None, help="work directory on the disk to measure (default: /tmp)")
    parser.add_argument("--skip-maxtext", action="store_true")
    parser.add_argument("--maxtext-2x", action="store_true", help="also run MaxText's chain on the 2x model")
    args = parser.parse_args()

    model = PRESETS[args.preset]
    if args.layers:
        model = dataclasses.replace(model, n_layers=args.layers)
    big = dataclasses.replace(model, n_layers=args.scale_layers or 2 * model.n_layers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="rayconv-bench-", dir=args.scratch))
    cache = REPO / ".cache" / "synthetic"
    try:
        print(f"preparing inputs in {cache}", flush=True)
        src = ensure_checkpoint(model, cache)
        src_big = ensure_checkpoint(big, cache)
        in_bytes = dir_bytes(src)
        cpus = os.cpu_count() or 2
        runs: list[Run] = []
        if not args.skip_maxtext:
            print("MaxText 0.2.4 chain", flush=True)
            runs.append(maxtext_chain(model, src, scratch / "maxtext", logs))
            shutil.rmtree(scratch / "maxtext", ignore_errors=True)
        print("rayconv", flush=True)
        runs.append(rayconv_run(src, scratch / "r1", model.descriptor, 1, logs, "rayconv, 1 worker"))
        out_bytes = dir_bytes(scratch / "r1")
        shutil.rmtree(scratch / "r1")
        runs.append(rayconv_run(src, scratch / "rn", model.descriptor, cpus, logs, f"rayconv, {cpus} workers"))
        shutil.rmtree(scratch / "rn")
        scaled = rayconv_run(src_big, scratch / "rb", model.descriptor, cpus, logs, "rayconv, 2x layers")
        shutil.rmtree(scratch / "rb")
        scaled_maxtext = None
        if args.maxtext_2x and not args.skip_maxtext:
            print("MaxText 0.2.4 chain, 2x layers", flush=True)
            scaled_maxtext = maxtext_chain(big, src_big, scratch / "maxtext-2x", logs)
            scaled_maxtext.name = "MaxText chain, 2x layers"
            shutil.rmtree(scratch / "maxtext-2x", ignore_errors=True)
        print("I/O floor", flush=True)
        floor = io_floor(src, out_bytes, scratch)
        print(f"  I/O floor: {floor.seconds:.1f} s", flush=True)
        runs += [floor, scaled] + ([scaled_maxtext] if scaled_maxtext else [])
        results = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": f"{cpus} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
            "input": {"description": f"synthetic Llama-3.1 405B layout ({model.n_layers} layers, dim {model.dim}, "
                                     f"{model.n_heads} heads, {model.n_kv_heads} kv heads)",
                      "bytes": in_bytes, "shards": model.n_shards},
            "scaled_input_bytes": dir_bytes(src_big),
            "output_bytes": out_bytes,
            "runs": [r.as_dict() for r in runs],
        }
        next(r for r in results["runs"] if r["name"] == "rayconv, 2x layers")["compare_to"] = f"rayconv, {cpus} workers"
        (out / "results.json").write_text(json.dumps(results, indent=1))
        text = table(results)
        (out / "benchmarks.md").write_text(text + "\n")
        chart(results, out / "benchmarks.png")
        print("\n" + text)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
