#!/usr/bin/env python
"""Benchmark: rayconv vs MaxText's three-script chain vs the I/O floor, on one synthetic checkpoint, in one run.

    .venvs/main/bin/python scripts/bench.py                          # narrow 405B layout, ~2.1 GB (+ a 2x model)
    .venvs/main/bin/python scripts/bench.py --preset real-width      # one layer at the 405B's real tensor shapes
    .venvs/main/bin/python scripts/bench.py --preset narrow --maxtext-2x --out bench-results
    .venvs/main/bin/python scripts/bench.py --preset qwen3-moe-real-width  # Qwen3-235B-A22B's shapes, vs to_maxtext.py

Presets (both the 405B MP16 layout: 16 shards, 128 heads, 8 kv heads repeated on shard pairs):

* ``narrow``: hidden 2048, 18 layers, ~2.1 GB — many small tensors, where fixed costs show;
* ``real-width``: hidden 16384, FFN 53248, one layer (``--layers 2`` for two), vocabulary 2048 — the 405B's
  real tensor shapes (104 MiB FFN shard tensors), ~6.6 GB in, where throughput and memory per byte show.

Measured for each contender: wall time, and peak memory of the whole process tree (the sum over the process
and all its descendants; RSS sampled every 0.1 s, PSS every 1 s since reading it is costly; both, since Ray's
processes share library pages):

* MaxText 0.2.4 as the tutorial runs it (reference env, Python 3.12): llama_or_mistral_ckpt (scanned) →
  generate_param_only_checkpoint (unscanned) → load_and_quantize_checkpoint (int8), one process each. At real
  widths it needs ~20 GB: it is skipped (and says so) when less memory is available, and a failure (e.g. the
  kernel's out-of-memory kill) is recorded, not fatal;
* rayconv producing the same three outputs in one pass (Ray started by the CLI, so the tree includes Ray's
  GCS, raylet, agents and workers): default settings (1 GiB workers), one worker, and (real widths) 4 GiB workers, all with
  --skip_md5 (MaxText's chain checks no md5 either; rayconv's default md5 pass against checklist.chk is one
  more full read of the input, measured apart; every tensor's CRC-32 is checked either way). The
  phase times of each run (index, plan, Ray start, convert, verify, commit, shutdown) are read from its
  closing log line, with the per-worker conversion rate (input bytes / the units' own run time);
* the I/O floor, on the same disk in the same run: read every input byte *cold* (the page cache of each file
  is dropped first with posix_fadvise DONTNEED, as it is before every contender) and write as many bytes as
  rayconv writes, in 64 MiB blocks, with one fdatasync at the end — and a second time with an fdatasync
  every 16 MiB (rayconv's OCDBT commit batch, each of which tensorstore makes durable before the unit's
  receipt is recorded);
* narrow preset: rayconv (and with --maxtext-2x MaxText) on a model with twice the layers (~4 GB);
* efficiency: MB of input per CPU-second of one local-executor process writing to tmpfs from a warm input
  (scripts/bench_efficiency.py; ``--efficiency-only`` runs just that).

The export (MaxText 0.2.5's to_huggingface.py vs ``rayconv export`` vs the write floor, same presets) has its own
entry point, scripts/bench_export.py, built on this module's measure, drop_cache and io_floor.

Writes <out>/results.json, <out>/benchmarks.md (the table), <out>/benchmarks.png (the bars, with their values)
and <out>/benchmarks-growth.png (time and memory against the input size; ``--plot-from`` redraws both from
saved results, e.g. a narrow and a real-width run together).
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
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools" / "maxtext_ref"))  # the MaxText harness (reference.py)
sys.path.insert(0, str(REPO))

from bench_efficiency import efficiency, efficiency_line  # noqa: E402
from bench_plots import chart, growth_chart, plot_from  # noqa: E402
from bench_measure import (BLOCK, SYNC_BATCH, Run, dir_bytes, drop_cache, io_floor, load, measure,  # noqa: E402,F401
                           parse_closing_line, rayconv_run, run_log)

from rayconv.engine.executors import LOCAL_RAY  # noqa: E402
from rayconv.synthetic import PRESETS, SyntheticModel, ensure_checkpoint  # noqa: E402

#: The benchmark's inputs. Keys of PRESETS (e.g. ``405b-2gb``) are accepted too.
BENCH_PRESETS: dict[str, SyntheticModel] = {
    "narrow": PRESETS["405b-2gb"],
    # The 405B's real widths: dim 16384, ffn int(1.2 · 8/3 · 16384) rounded up to 4096 = 53248, 128 heads of
    # 128, 8 kv heads repeated on shard pairs (MP16); one layer and a small vocabulary keep it at ~6.6 GB.
    "real-width": SyntheticModel(family="llama-3.1", dim=16384, n_layers=1, n_heads=128, n_kv_heads=8,
                                 vocab_size=2048, multiple_of=4096, ffn_dim_multiplier=1.2, n_shards=16,
                                 descriptor="Llama3.1-405B-Instruct:bf16-mp16"),
}
#: MaxText's chain peaked at ~20 GB on one real-width layer; below this much free memory it is not started.
MAXTEXT_REAL_WIDTH_GB = 21.0


def maxtext_chain(model, src: Path, work: Path, logs: Path, name: str = "MaxText chain") -> Run:
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
    drop_cache(sorted(src.iterdir()))
    runs = []
    for step, cmd in steps:
        run = measure(cmd, env=env, cwd=str(work), log=logs / f"{name}-{step}.log", check=False)
        run.name = step
        runs.append(run)
        print(f"  MaxText {step}: {run.seconds:.1f} s, peak RSS {run.peak_rss / 1e9:.2f} GB"
              + (f" — FAILED: {run.failed}" if run.failed else ""), flush=True)
        if run.failed:
            break
    chain = Run(name, sum(r.seconds for r in runs), max(r.peak_rss for r in runs), max(r.peak_pss for r in runs),
                [r.as_dict() for r in runs])
    chain.failed = next((f"{r.name}: {r.failed}" for r in runs if r.failed), None)
    return chain


#: Ray's own start, alone: ray.init as rayconv's executor starts a local Ray (LOCAL_RAY, passed as argv[1], and
#: without the unused daemons; the measured process imports nothing else of rayconv's), then one actor per core that
#: imports rayconv's worker module. Prints wall seconds and the CPU seconds the driver and Ray's processes used.
RAY_START = """
import json, os, sys, time, psutil
from rayconv.engine.lean_ray import without_unused_daemons  # imports nothing of Ray's
start = time.monotonic()
import ray
with without_unused_daemons():
    ray.init(num_cpus=os.cpu_count(), **json.loads(sys.argv[1]))
init = time.monotonic() - start
@ray.remote(num_cpus=1)
class Worker:
    def ready(self):
        import rayconv.worker  # noqa: F401
        return os.getpid()
ray.get([w.ready.remote() for w in [Worker.remote() for _ in range(os.cpu_count())]])
ready = time.monotonic() - start
me = psutil.Process()
cpu = sum(sum(p.cpu_times()[:2]) for p in [me, *me.children(recursive=True)] if p.is_running())
print(json.dumps({"init": init, "ready": ready, "cpu": cpu}))
ray.shutdown()
"""


def ray_start_cost(runs: int = 3) -> dict:
    """Ray's fixed cost on this machine, apart from rayconv: the best of ``runs`` starts (wall, CPU seconds)."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    samples = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", RAY_START, json.dumps(LOCAL_RAY)], capture_output=True, text=True,
                             env=env, timeout=300)
        samples.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(samples, key=lambda x: x["ready"])
    print(f"  Ray alone: ray.init {best['init']:.1f} s, + {os.cpu_count()} actors ready {best['ready']:.1f} s, "
          f"{best['cpu']:.1f} CPU-seconds (best of {runs})", flush=True)
    return best


def table(results: dict) -> str:
    runs = {r["name"]: r for r in results["runs"]}
    lines = [
        f"Input: {results['input']['description']}, {results['input']['bytes'] / 1e9:.2f} GB "
        f"({results['input']['shards']} shards); outputs bf16 scanned + bf16 unscanned + int8, "
        f"{results['output_bytes'] / 1e9:.2f} GB written. Machine: {results['machine']}; load average "
        f"{results['load_before']} before, {results['load_after']} after.",
        "",
        "| run | wall time (s) | peak RSS, tree (GB) | peak PSS, tree (GB) | phases (s) |",
        "|---|---:|---:|---:|---|",
    ]
    for r in results["runs"]:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r.get("phases", {}).items())
        if r.get("phases"):  # before the driver's clock starts (imports) and after the closing line (exit)
            phases += f"; outside them {r['seconds'] - sum(r['phases'].values()):.1f}"
        if r.get("worker_mb_s"):
            phases += f"; {r['worker_mb_s']:.0f} MB/s per worker"
        if r.get("failed"):
            phases = f"**failed: {r['failed']}**"
        lines.append(f"| {r['name']} | {r['seconds']:.1f} | {r['peak_rss'] / 1e9:.2f} | {r['peak_pss'] / 1e9:.2f} | "
                     f"{phases} |")
        for s in r.get("steps", []):
            lines.append(f"| &nbsp;&nbsp;{s['name']} | {s['seconds']:.1f} | {s['peak_rss'] / 1e9:.2f} | "
                         f"{s['peak_pss'] / 1e9:.2f} | {s.get('failed') or ''} |")
    default = runs.get("rayconv, default settings")
    floor = runs.get("I/O floor")
    mx = runs.get("MaxText chain")
    lines.append("")
    if default and floor:
        lines.append(f"* rayconv (default settings) vs the I/O floor: **{default['seconds'] / floor['seconds']:.2f}x** "
                     f"the floor's wall time ({floor['seconds']:.1f} s: cold read "
                     f"{floor['steps'][0]['seconds']:.1f} s + write with one fdatasync {floor['steps'][1]['seconds']:.1f} s).")
    if default and mx and not mx.get("failed"):
        lines.append(f"* rayconv (default settings) vs MaxText: **{mx['seconds'] / default['seconds']:.1f}x faster**, "
                     f"peak RSS **{default['peak_rss'] / mx['peak_rss']:.2f}** of MaxText's "
                     f"(PSS {default['peak_pss'] / mx['peak_pss']:.2f}).")
    elif mx:
        lines.append(f"* MaxText's chain did not finish: {mx['failed']}.")
    alone = results.get("ray_alone")
    if alone:
        lines.append(f"* Ray alone on this machine (the floor of the *ray start* phase): `ray.init` as rayconv starts a "
                     f"local Ray {alone['init']:.1f} s, with one actor per core ready {alone['ready']:.1f} s, "
                     f"{alone['cpu']:.1f} CPU-seconds across Ray's processes (best of 3).")
    large = runs.get("rayconv, 4 GiB workers")
    if default and large:
        lines.append(f"* 4 GiB workers: {large['seconds'] / default['seconds']:.2f}x the default's time, "
                     f"{large['peak_rss'] / default['peak_rss']:.2f}x its peak RSS.")
    if results.get("efficiency"):
        lines.append(efficiency_line(results["efficiency"]))
    big, mx2 = runs.get("rayconv, 2x layers"), runs.get("MaxText chain, 2x layers")
    if big:
        lines.append(f"* 2x layers ({results['scaled_input_bytes'] / 1e9:.2f} GB): rayconv {big['seconds']:.1f} s, "
                     f"{big['peak_rss'] / 1e9:.2f} GB peak" + (
                         f"; MaxText {mx2['seconds']:.1f} s, {mx2['peak_rss'] / 1e9:.2f} GB: **"
                         f"{mx2['seconds'] / big['seconds']:.1f}x faster**" if mx2 and not mx2.get("failed") else "")
                     + ".")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="narrow", help=f"{', '.join(BENCH_PRESETS)} (or a rayconv.synthetic preset)")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--scale-layers", type=int, default=None, help="layers of the 2x model (narrow; default 2x)")
    parser.add_argument("--out", default=str(REPO / "bench-results"))
    parser.add_argument("--scratch", default=None, help="work directory on the disk to measure (default: /tmp)")
    parser.add_argument("--cache", default=None, help="where synthetic inputs are kept (default: $RAYCONV_TEST_CACHE/"
                                                      "synthetic or <repo>/.cache/synthetic)")
    parser.add_argument("--skip-maxtext", action="store_true")
    parser.add_argument("--maxtext-2x", action="store_true", help="also run MaxText's chain on the 2x model")
    parser.add_argument("--rayconv-only", action="store_true", help="only rayconv's default run (and the floor)")
    parser.add_argument("--efficiency-only", action="store_true",
                        help="only the efficiency row: MB of input per CPU-second (scripts/bench_efficiency.py)")
    parser.add_argument("--efficiency-runs", type=int, default=3, help="runs of the efficiency row (min/median)")
    parser.add_argument("--plot-from", nargs="+", metavar="RESULTS_JSON",
                        help="only redraw the charts from saved results.json files into --out (scripts/bench_plots.py)")
    args, rest = parser.parse_known_args()
    if args.preset == "qwen3-moe-real-width":  # HF files, to_maxtext.py side by side: scripts/bench_qwen3.py
        from bench_qwen3 import main as qwen3_bench

        qwen3_bench(["--out", args.out, *(["--scratch", args.scratch] if args.scratch else []),
                     *(["--cache", args.cache] if args.cache else []), *(["--skip-maxtext"] if args.skip_maxtext
                                                                          else []), *rest])
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.plot_from:
        plot_from(args.plot_from, Path(args.out))
        return

    real_width = args.preset == "real-width"
    model = BENCH_PRESETS.get(args.preset) or PRESETS[args.preset]
    if args.layers:
        model = dataclasses.replace(model, n_layers=args.layers)
    big = None if real_width else dataclasses.replace(model, n_layers=args.scale_layers or 2 * model.n_layers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="rayconv-bench-", dir=args.scratch))
    test_cache = os.environ.get("RAYCONV_TEST_CACHE")
    cache = Path(args.cache) if args.cache else (Path(test_cache) / "synthetic" if test_cache
                                                 else REPO / ".cache" / "synthetic")
    load_before = load()
    print(f"load average {load_before}; preparing inputs in {cache}", flush=True)
    try:
        src = ensure_checkpoint(model, cache)
        if args.efficiency_only:
            print("efficiency", flush=True)
            eff = efficiency(src, model.descriptor, logs, args.efficiency_runs)
            (out / "efficiency.json").write_text(json.dumps(dict(eff, load_before=load_before, load_after=load()),
                                                            indent=1))
            print("\n" + efficiency_line(eff))
            return
        src_big = ensure_checkpoint(big, cache) if big and not args.rayconv_only else None
        in_bytes = dir_bytes(src)
        cpus = os.cpu_count() or 2
        runs: list[Run] = []
        if not args.skip_maxtext and not args.rayconv_only:
            free_gb = psutil.virtual_memory().available / 1e9
            if real_width and free_gb < MAXTEXT_REAL_WIDTH_GB:
                print(f"MaxText chain skipped: {free_gb:.1f} GB available, it needs ~20", flush=True)
                runs.append(Run("MaxText chain", 0.0, 0, 0, failed=f"not run: {free_gb:.1f} GB of memory available, "
                                f"MaxText's chain needs ~20 GB at real widths"))
            else:
                print("MaxText 0.2.4 chain", flush=True)
                runs.append(maxtext_chain(model, src, scratch / "maxtext", logs))
                shutil.rmtree(scratch / "maxtext", ignore_errors=True)
        print("rayconv", flush=True)
        runs.append(rayconv_run(src, scratch / "r", model.descriptor, logs, "rayconv, default settings"))
        out_bytes = dir_bytes(scratch / "r")
        shutil.rmtree(scratch / "r")
        if not args.rayconv_only:
            runs.append(rayconv_run(src, scratch / "r", model.descriptor, logs, "rayconv, 1 worker",
                                    "--num_workers", "1"))
            shutil.rmtree(scratch / "r")
            if real_width:
                runs.append(rayconv_run(src, scratch / "r", model.descriptor, logs, "rayconv, 4 GiB workers",
                                        "--worker_memory_gb", "4"))
                shutil.rmtree(scratch / "r")
        print("I/O floor", flush=True)
        for sync_every in (None, SYNC_BATCH):
            floor = io_floor(src, out_bytes, scratch, sync_every)
            print(f"  {floor.name}: {floor.seconds:.1f} s (read {floor.steps[0]['seconds']:.1f}, write "
                  f"{floor.steps[1]['seconds']:.1f})", flush=True)
            runs.append(floor)
        print("Ray alone", flush=True)
        ray_alone = ray_start_cost()
        print("efficiency", flush=True)
        eff = efficiency(src, model.descriptor, logs, args.efficiency_runs)
        if src_big is not None:
            runs.append(rayconv_run(src_big, scratch / "rb", model.descriptor, logs, "rayconv, 2x layers"))
            shutil.rmtree(scratch / "rb")
            if args.maxtext_2x and not args.skip_maxtext:
                print("MaxText 0.2.4 chain, 2x layers", flush=True)
                runs.append(maxtext_chain(big, src_big, scratch / "maxtext-2x", logs, "MaxText chain, 2x layers"))
                shutil.rmtree(scratch / "maxtext-2x", ignore_errors=True)
        results = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "preset": args.preset,
            "machine": f"{cpus} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
            "load_before": load_before,
            "load_after": load(),
            "input": {"description": f"synthetic Llama-3.1 405B layout ({model.n_layers} layers, dim {model.dim}, "
                                     f"ffn {model.ffn_dim}, {model.n_heads} heads, {model.n_kv_heads} kv heads, "
                                     f"vocab {model.vocab_size})",
                      "bytes": in_bytes, "shards": model.n_shards},
            "scaled_input_bytes": dir_bytes(src_big) if src_big else None,
            "output_bytes": out_bytes,
            "ray_alone": ray_alone,
            "efficiency": eff,
            "runs": [r.as_dict() for r in runs],
        }
        (out / "results.json").write_text(json.dumps(results, indent=1))
        text = table(results)
        (out / "benchmarks.md").write_text(text + "\n")
        chart(results, out / "benchmarks.png")
        growth_chart([results], out / "benchmarks-growth.png")
        print("\n" + text)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
