#!/usr/bin/env python
"""Benchmark the sources: the same weights from Meta's .pth, Hugging Face safetensors and Meta's FP8 SKU.

    .venvs/main/bin/python scripts/bench_sources.py --out bench-sources

Two comparisons, each run side by side (rayconv with default settings, all three outputs, a cold page cache
and --skip_md5, as scripts/bench.py runs it; whole-process-tree peak RSS/PSS from bench.py's sampler):

* **Hugging Face** (issue 13): the ``demo`` synthetic (Llama-3.1 405B layout, 593 MB, MP16) as Meta's 16
  ``consolidated.NN.pth`` and as the HF files transformers writes from the same weights (100 MB files,
  tests/hf_checkpoints.py); then MaxText 0.2.5's own HF route, ``to_maxtext.py`` (reference env,
  ``--maxtext_025``), on the same HF files. It writes the scanned output only; the bench compares its leaves
  with rayconv's scanned output from the HF files and reports which differ and by how much.
* **FP8** (issue 14): Meta's FP8 SKU layout (8 shards, the FFN weights of layers 1..n-2 float8 with row
  scales in ``fp8_scales_{r}.pt``) scaled to the ``405b-2gb`` widths, against its bf16 MP8 twin (the same
  weights dequantized by torch, tests/fp8_checkpoints.py): what each reads, its time and memory.

Writes <out>/results.json and prints a table. Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tools" / "maxtext_ref"))
sys.path.insert(0, str(REPO))

from bench_measure import Run, measure, rayconv_run, run_log  # noqa: E402
from fp8_checkpoints import ensure_dequantized  # noqa: E402
from hf_checkpoints import ensure_hf_checkpoint  # noqa: E402
from rayconv.synthetic import PRESETS, ensure_checkpoint  # noqa: E402

#: Meta's FP8 SKU (the default Llama3.1-405B[-Instruct] download) at the narrow bench widths: 8 shards, one kv
#: head per shard, 16 of 18 layers with float8 FFN weights (the 405B: 124 of 126).
FP8_MODEL = dataclasses.replace(PRESETS["405b-2gb"], n_shards=8, fp8=True, descriptor="Llama3.1-405B-Instruct")
BF16_MP8 = "Llama3.1-405B-Instruct:bf16-mp8"
READ = re.compile(r"Done in .*?: read ([0-9.]+ [KMGT]?B)")

TO_MAXTEXT = """
import os, sys
sys.path.insert(0, os.environ["MAXTEXT_025"])
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=16"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["DECOUPLE_GCLOUD"] = "TRUE"
hf_dir, out = sys.argv[1], sys.argv[2]
import transformers, maxtext
from maxtext.checkpoint_conversion import to_maxtext
from maxtext.checkpoint_conversion.utils import hf_model_configs
cfg = transformers.LlamaConfig.from_pretrained(hf_dir)
hf_model_configs.HF_MODEL_CONFIGS["llama3.1-405b"] = cfg  # its hooks read head counts from this config
to_maxtext.main(["to_maxtext", os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml"),
    "model_name=llama3.1-405b", "override_model_config=true", f"base_emb_dim={cfg.hidden_size}",
    f"base_num_query_heads={cfg.num_attention_heads}", f"base_num_kv_heads={cfg.num_key_value_heads}",
    f"head_dim={cfg.head_dim}", f"base_mlp_dim={cfg.intermediate_size}",
    f"base_num_decoder_layers={cfg.num_hidden_layers}", f"vocab_size={cfg.vocab_size}", "hardware=cpu",
    "skip_jax_distributed_system=true", f"base_output_directory={out}", "run_name=tm", f"hf_model_path={hf_dir}",
    "weight_dtype=bfloat16", "async_checkpointing=false", "scan_layers=true"])
"""


def rayconv(src: Path, out: Path, descriptor: str | None, logs: Path, label: str) -> Run:
    run = rayconv_run(src, out, descriptor, logs, label)
    match = READ.search(run_log(logs, label).read_text())
    run.steps.append({"read": match.group(1) if match else None})
    return run


def compare_scanned(ours: Path, theirs: Path) -> dict:
    """Leaf-by-leaf comparison of two scanned items: which leaves differ, in what share of values, by how many
    bf16 ulps at most."""
    from reference import read_leaves

    a, b = read_leaves(ours), read_leaves(theirs)
    differ = {}
    for key in sorted(set(a) & set(b)):
        x, y = a[key], b[key]
        if x.shape != y.shape or x.dtype != y.dtype:
            differ[key] = f"{x.dtype}{x.shape} vs {y.dtype}{y.shape}"
        elif x.tobytes() != y.tobytes():
            bits = lambda v: v.view(np.int16).astype(np.int32)  # noqa: E731
            ulps = int(np.abs(bits(x) - bits(y)).max()) if x.dtype.itemsize == 2 else None
            differ[key] = f"{np.mean(x != y):.2%} of values, max {ulps} ulp"
    return {"leaves": len(b), "only_rayconv": sorted(set(a) - set(b)), "only_maxtext": sorted(set(b) - set(a)),
            "differ": differ}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench-sources")
    parser.add_argument("--maxtext_025", default=str(REPO / ".venvs" / "maxtext-0.2.5"))
    parser.add_argument("--ref_python", default=os.environ.get("RAYCONV_REF_PYTHON", str(REPO / ".venvs/ref/bin/python")))
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-fp8", action="store_true")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("RAYCONV_TEST_CACHE", REPO / ".cache"))
    results: dict[str, dict] = {}

    def record(label: str, run: Run) -> None:
        results[label] = run.as_dict()
        read = next((s["read"] for s in run.steps if "read" in s), None)
        print(f"{label}: {run.seconds:.1f} s, peak tree RSS {run.peak_rss / 1e9:.2f} GB (PSS "
              f"{run.peak_pss / 1e9:.2f}){f', read {read}' if read else ''}", flush=True)

    if not args.skip_hf:
        model = PRESETS["demo"]
        meta = ensure_checkpoint(model, cache / "synthetic")
        hf = ensure_hf_checkpoint(model, cache / "bench-hf", max_shard_size="100MB")
        record("rayconv, Meta .pth", rayconv(meta, out / "meta", model.descriptor, logs, "rayconv Meta pth"))
        record("rayconv, HF safetensors", rayconv(hf, out / "hf", None, logs, "rayconv HF safetensors"))
        if (Path(args.maxtext_025) / "maxtext").is_dir() and Path(args.ref_python).exists():
            script = out / "to_maxtext_run.py"
            script.write_text(TO_MAXTEXT)
            shutil.rmtree(out / "to_maxtext", ignore_errors=True)
            record("MaxText 0.2.5 to_maxtext.py", measure(
                [args.ref_python, str(script), str(hf), str(out / "to_maxtext")],
                env=dict(os.environ, MAXTEXT_025=args.maxtext_025), cwd=str(out), log=logs / "to_maxtext.log"))
            theirs = next((out / "to_maxtext").rglob("_METADATA")).parent
            results["to_maxtext vs rayconv (scanned)"] = compare_scanned(out / "hf/bf16/scanned/0/items", theirs)
            print(json.dumps(results["to_maxtext vs rayconv (scanned)"], indent=1), flush=True)
        else:
            print(f"maxtext 0.2.5 not found under {args.maxtext_025}: to_maxtext.py not measured")

    if not args.skip_fp8:
        fp8_src = ensure_checkpoint(FP8_MODEL, cache / "synthetic")
        bf16_src = ensure_dequantized(fp8_src, cache / "bench-fp8")
        for label, src, descriptor in (("rayconv, bf16 MP8 (dequantized twin)", bf16_src, BF16_MP8),
                                       ("rayconv, FP8 SKU", fp8_src, FP8_MODEL.descriptor)):
            size = sum(p.stat().st_size for p in src.iterdir() if p.is_file())
            run = rayconv(src, out / label.split()[1].lower(), descriptor, logs, label)
            run.steps.append({"input_files_bytes": size})
            record(f"{label} ({size / 1e9:.2f} GB of files)", run)
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
