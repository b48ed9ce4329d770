#!/usr/bin/env python
"""Benchmark of the export (issue 22): MaxText 0.2.5's to_huggingface.py vs ``rayconv export`` vs the write floor.

    .venvs/main/bin/python scripts/bench_export.py --preset narrow --out bench-export-narrow
    .venvs/main/bin/python scripts/bench_export.py --preset real-width --out bench-export-real

Per preset (scripts/bench.py's synthetic 405B-layout inputs), rayconv converts the input once (bf16 scanned +
unscanned, linen trees; not measured, kept under ``<cache>/export-inputs/``). Then, side by side on its bf16
*unscanned* items, each from a cold page cache for those items (bench.py's ``drop_cache``) and measured by bench.py's
``measure`` (wall time, peak RSS and PSS of the whole process tree):

* MaxText 0.2.5's ``to_huggingface.py``, run exactly as tools/maxtext_ref/to_hf.py runs it in the reference env
  (tokenizer stubbed, ``--override_model_architecture``, ``weight_dtype=bfloat16``, its 3 GiB file split). It holds
  the whole model in memory: it is not started when less memory is available than it needs
  (:func:`maxtext_memory_need`), and a failure (the kernel's out-of-memory kill) is recorded, not fatal;
* ``rayconv export`` of the same items with the same split: default settings (Ray started by the CLI, 1 GiB
  workers), and ``--executor local`` (one process);
* the write floor: read every file of the items cold and write as many bytes as the export writes
  (bench.py's ``io_floor``, one fdatasync at the end).

The safetensors files (and the index, when split) of every export are compared with MaxText's by SHA-256: the table
says whether they are byte-equal. Writes <out>/results.json and <out>/benchmarks.md. Not a test: numbers depend on
the machine; nothing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))  # hf_checkpoints.hf_config: the synthetic model's HF config.json
sys.path.insert(0, str(REPO / "tools" / "maxtext_ref"))
sys.path.insert(0, str(REPO))

from bench import BENCH_PRESETS  # noqa: E402
from bench_measure import Run, dir_bytes, drop_cache, io_floor, load, measure  # noqa: E402

from rayconv.synthetic import PRESETS, SyntheticModel, ensure_checkpoint  # noqa: E402

UNSCANNED = "bf16/unscanned/checkpoints/0/items"
#: Marker of a finished preparatory conversion (written last, so a killed one is redone).
PREPARED = ".bench-export-complete"
#: MaxText's exporter restores every leaf, keeps the transformed copies and hands the whole state dict to
#: safetensors: its peak grows with the model. Measured on the narrow preset: 6.10 GB of tree RSS for 2.06 GB of
#: weights, i.e. ~1.8 GB of imports (jax, torch, orbax; reference.py) + 2.1x the weights. Below this need it is not
#: started; and it runs with oom_score_adj 1000, so that if the estimate is short the kernel's out-of-memory killer
#: takes it and not another process on the machine.
MAXTEXT_BYTES_FACTOR = 2.1
MAXTEXT_BASE_BYTES = 2.0e9
HASH_BLOCK = 16 << 20
MAXTEXT, DEFAULT, LOCAL = ("MaxText 0.2.5 to_huggingface.py", "rayconv export, default settings",
                           "rayconv export, --executor local")

CLOSING = re.compile(r"Done in ([\d.]+) s: read ([^,]+), wrote ([^,]+), (\d+) units \((\d+) resumed\), "
                     r"(\d+) workers, worker peak RSS (.+?)\s*$", re.M)


def parse_export_line(text: str) -> dict | None:
    """The fields of ``rayconv export``'s closing log line (None when the log has none)."""
    match = CLOSING.search(text)
    if not match:
        return None
    seconds, read, wrote, units, resumed, workers, peak = match.groups()
    return {"seconds": float(seconds), "read": read.strip(), "wrote": wrote.strip(), "units": int(units),
            "resumed": int(resumed), "workers": int(workers), "worker_peak_rss": peak.strip()}


def maxtext_memory_need(model_bytes: int) -> float:
    """Bytes of memory MaxText's exporter is expected to need for a model of ``model_bytes`` (see the constants)."""
    return MAXTEXT_BYTES_FACTOR * model_bytes + MAXTEXT_BASE_BYTES


def export_digests(directory: Path) -> dict[str, str]:
    """SHA-256 of each safetensors file and of the index: the files that must be byte-equal across exporters
    (config.json differs by design: rayconv adds ``dtype``, docs/export.md)."""
    digests = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and (path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json")):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(HASH_BLOCK):
                    h.update(block)
            digests[path.name] = h.hexdigest()
    return digests


def compare_digests(reference: dict[str, str], other: dict[str, str]) -> tuple[bool, str]:
    """(byte-equal, what differs) of two exports' :func:`export_digests`."""
    if not reference:
        return False, "no reference files"
    if set(reference) != set(other):
        return False, f"file sets differ: {sorted(set(reference) ^ set(other))}"
    differ = [name for name in reference if reference[name] != other[name]]
    if differ:
        return False, f"bytes differ: {differ}"
    return True, f"{len(reference)} files byte-equal"


def files_of(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def child_env() -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS="cpu", RAY_USAGE_STATS_ENABLED="0",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def prepare(model: SyntheticModel, src: Path, cache: Path, logs: Path) -> Path:
    """rayconv's bf16 scanned + unscanned (linen) output of ``src``, converted once and kept in ``cache``."""
    key = hashlib.sha256(f"{model!r} linen".encode()).hexdigest()[:12]
    out = cache / "export-inputs" / key
    if (out / PREPARED).exists():
        return out
    cmd = [sys.executable, "-m", "rayconv.cli", "convert", "--input_directory", str(src), "--output_directory",
           str(out), "--model_path", model.descriptor, "--maxtext_layout", "linen", "--no_progress", "--restart",
           "--skip_md5"]
    with open(logs / "prepare-convert.log", "w") as log:
        rc = subprocess.run(cmd, env=child_env(), stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"preparatory conversion failed ({rc}); log: {logs / 'prepare-convert.log'}")
    (out / PREPARED).write_text("")
    return out


def maxtext_export(model: SyntheticModel, items: Path, out: Path, scratch: Path, logs: Path) -> Run:
    """to_huggingface.py as tools/maxtext_ref/to_hf.py runs it (the reference harness's script, maxtext 0.2.5)."""
    import reference

    spec = scratch / "model.json"
    spec.write_text(json.dumps(reference.model_spec(model)))
    cmd = [str(reference.ref_python()), str(reference.SCRIPTS_DIR / "to_hf.py"), "--model", str(spec), "--items",
           str(items), "--scan-layers", "false", "--out", str(out)]
    cmd = ["sh", "-c", 'echo 1000 > /proc/self/oom_score_adj && exec "$@"', "sh", *cmd]  # first to go if short
    drop_cache(files_of(items))
    run = measure(cmd, env=reference.child_env("0.2.5"), cwd=str(scratch), log=logs / "maxtext-to_huggingface.log",
                  check=False)
    run.name = MAXTEXT
    return run


def rayconv_export(items: Path, out: Path, config: Path, logs: Path, label: str, *extra: str) -> Run:
    cmd = [sys.executable, "-m", "rayconv.cli", "export", "--input_directory", str(items), "--output_directory",
           str(out), "--config", str(config), "--no_progress", "--restart", *extra]
    drop_cache(files_of(items))
    log = logs / f"{label.replace(' ', '_').replace(',', '').replace('-', '')}.log"
    run = measure(cmd, env=child_env(), log=log, check=False)
    run.name = label
    closing = parse_export_line(log.read_text())
    if closing:
        run.phases = {"export": closing["seconds"]}
        run.steps = [dict(closing, name="closing line")]
    return run


def write_config(model: SyntheticModel, path: Path) -> Path:
    """The synthetic model's HF config.json (transformers' LlamaConfig, Llama 3.1's bos/eos), as tests/test_export."""
    from hf_checkpoints import hf_config

    config = hf_config(model)
    config.bos_token_id, config.eos_token_id = 128000, 128001
    config.to_json_file(str(path))
    return path


def versions() -> dict[str, str]:
    """maxtext (its dist-info), and orbax-checkpoint / tensorstore / transformers / jax of both envs."""
    import reference

    probe = ("import importlib.metadata as m, json\nfound = {}\n"
             "for n in ('orbax-checkpoint', 'tensorstore', 'transformers', 'jax', 'safetensors', 'ray'):\n"
             "    try:\n        found[n] = m.version(n)\n    except m.PackageNotFoundError:\n        pass\n"
             "print(json.dumps(found))")
    found = {"maxtext": reference.maxtext_version("0.2.5").removeprefix("maxtext-").removesuffix(".dist-info")}
    for env, py, child in (("reference", str(reference.ref_python()), reference.child_env("0.2.5")),
                           ("rayconv", sys.executable, child_env())):
        out = subprocess.run([py, "-c", probe], capture_output=True, text=True, env=child, timeout=120)
        for name, version in (json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {}).items():
            found[f"{name} ({env} env)"] = version
    return found


def table(results: dict) -> str:
    inp = results["input"]
    lines = [
        f"Input: rayconv's bf16 unscanned (linen) output of the {results['preset']} preset ({inp['description']}), "
        f"{inp['bytes'] / 1e9:.2f} GB; each export writes {results['export_bytes'] / 1e9:.2f} GB of safetensors "
        f"({results['export_files']} file(s)). Machine: {results['machine']}; load average {results['load_before']} "
        f"before, {results['load_after']} after.",
        "",
        "| run | wall time (s) | peak RSS, tree (GB) | peak PSS, tree (GB) | vs floor | safetensors vs MaxText's |",
        "|---|---:|---:|---:|---:|---|",
    ]
    floor = next((r for r in results["runs"] if r["name"].startswith("write floor")), None)
    for r in results["runs"]:
        ratio = f"{r['seconds'] / floor['seconds']:.2f}x" if floor and not r.get("failed") else ""
        note = f"**failed: {r['failed']}**" if r.get("failed") else r.get("equal", "")
        lines.append(f"| {r['name']} | {r['seconds']:.1f} | {r['peak_rss'] / 1e9:.2f} | {r['peak_pss'] / 1e9:.2f} | "
                     f"{ratio} | {note} |")
    lines.append("")
    runs = {r["name"]: r for r in results["runs"]}
    mx = runs.get(MAXTEXT)
    for name in (DEFAULT, LOCAL):
        r = runs.get(name)
        if r and mx and not r.get("failed") and not mx.get("failed"):
            lines.append(f"* {name} vs MaxText: **{mx['seconds'] / r['seconds']:.1f}x faster**, peak RSS of the tree "
                         f"**{r['peak_rss'] / mx['peak_rss']:.2f}** of MaxText's.")
    lines.append("")
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="narrow", help=f"{', '.join(BENCH_PRESETS)} (or a rayconv.synthetic preset)")
    parser.add_argument("--out", default=str(REPO / "bench-export"))
    parser.add_argument("--scratch", default=None, help="work directory on the disk to measure (default: /tmp)")
    parser.add_argument("--cache", default=None, help="where inputs are kept (default: $RAYCONV_TEST_CACHE/synthetic "
                                                      "or <repo>/.cache/synthetic)")
    parser.add_argument("--skip-maxtext", action="store_true")
    args = parser.parse_args()

    model = BENCH_PRESETS.get(args.preset) or PRESETS[args.preset]
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    test_cache = os.environ.get("RAYCONV_TEST_CACHE")
    cache = Path(args.cache) if args.cache else (Path(test_cache) / "synthetic" if test_cache
                                                 else REPO / ".cache" / "synthetic")
    print(f"preparing inputs in {cache}", flush=True)
    src = ensure_checkpoint(model, cache)
    items = prepare(model, src, cache, logs) / UNSCANNED
    in_bytes = dir_bytes(items)
    scratch = Path(tempfile.mkdtemp(prefix="rayconv-bench-export-", dir=args.scratch))
    load_before = load()
    print(f"load average {load_before}; items {items} ({in_bytes / 1e9:.2f} GB)", flush=True)
    try:
        config = write_config(model, scratch / "config.json")
        runs: list[Run] = []
        reference_digests: dict[str, str] = {}
        if not args.skip_maxtext:
            free = psutil.virtual_memory().available
            need = maxtext_memory_need(in_bytes)
            if free < need:
                why = (f"not run: {free / 1e9:.1f} GB of memory available, MaxText's exporter needs ~{need / 1e9:.0f} "
                       f"GB for {in_bytes / 1e9:.1f} GB of weights")
                runs.append(Run(MAXTEXT, 0.0, 0, 0, failed=why))
            else:
                print("MaxText 0.2.5 to_huggingface.py", flush=True)
                run = maxtext_export(model, items, scratch / "mx", scratch, logs)
                if not run.failed:
                    reference_digests = export_digests(scratch / "mx")
                    run.equal = "(the reference)"
                runs.append(run)
                shutil.rmtree(scratch / "mx", ignore_errors=True)
            print(f"  {runs[-1].name}: {runs[-1].seconds:.1f} s, peak RSS {runs[-1].peak_rss / 1e9:.2f} GB"
                  + (f" — {runs[-1].failed}" if runs[-1].failed else ""), flush=True)
        export_bytes, export_files = 0, 0
        for label, extra in ((DEFAULT, ()), (LOCAL, ("--executor", "local"))):
            print(label, flush=True)
            run = rayconv_export(items, scratch / "r", config, logs, label, *extra)
            if not run.failed:
                digests = export_digests(scratch / "r")
                export_files = len([n for n in digests if n.endswith(".safetensors")])
                export_bytes = sum((scratch / "r" / n).stat().st_size for n in digests)
                equal, detail = compare_digests(reference_digests, digests)
                run.equal = ("**yes**, " if equal else "**no**: ") + detail if reference_digests else "(no reference)"
            runs.append(run)
            shutil.rmtree(scratch / "r", ignore_errors=True)
            print(f"  {label}: {run.seconds:.1f} s, peak RSS {run.peak_rss / 1e9:.2f} GB; {getattr(run, 'equal', '')}"
                  + (f" — {run.failed}" if run.failed else ""), flush=True)
        print("write floor", flush=True)
        floor = io_floor(items, export_bytes, scratch, files=files_of(items))
        floor.name = "write floor (cold read of the items + write, one fdatasync)"
        runs.append(floor)
        print(f"  {floor.name}: {floor.seconds:.1f} s", flush=True)
        results = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "preset": args.preset,
            "machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
            "load_before": load_before,
            "load_after": load(),
            "versions": versions(),
            "input": {"description": f"{model.n_layers} layers, dim {model.dim}, ffn {model.ffn_dim}, {model.n_heads} "
                                     f"heads, {model.n_kv_heads} kv heads, vocab {model.vocab_size}",
                      "bytes": in_bytes, "items": str(items)},
            "export_bytes": export_bytes,
            "export_files": export_files,
            "runs": [dict(r.as_dict(), equal=getattr(r, "equal", "")) for r in runs],
        }
        (out / "results.json").write_text(json.dumps(results, indent=1))
        text = table(results)
        (out / "benchmarks.md").write_text(text + "\n")
        print("\n" + text)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
