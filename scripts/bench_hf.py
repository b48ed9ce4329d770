#!/usr/bin/env python
"""Benchmark: rayconv from Hugging Face safetensors vs from Meta's .pth (same weights), and MaxText 0.2.5's to_maxtext.py.

    .venvs/main/bin/python scripts/bench_hf.py                      # the `demo` synthetic (593 MB, 405B layout)
    .venvs/main/bin/python scripts/bench_hf.py --out bench-hf --workers 2

The HF checkpoint is written by transformers (tests/hf_checkpoints.py) from the synthetic Meta weights, in
100 MB files. Measured per run with scripts/bench.py's sampler: wall time and the peak summed RSS/PSS of the
whole process tree (for rayconv that includes Ray's GCS, raylet and the workers). rayconv writes all three
outputs (scanned, unscanned, int8); to_maxtext.py writes one (scanned bf16), run in the reference env with
maxtext 0.2.5 (``--maxtext_025``, default ``.venvs/maxtext-0.2.5``) on the same files.
Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

from bench import measure  # noqa: E402
from hf_checkpoints import ensure_hf_checkpoint  # noqa: E402
from rayconv.synthetic import PRESETS, ensure_checkpoint  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench-hf-results")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--maxtext_025", default=str(REPO / ".venvs" / "maxtext-0.2.5"))
    parser.add_argument("--ref_python", default=os.environ.get("RAYCONV_REF_PYTHON", str(REPO / ".venvs/ref/bin/python")))
    args = parser.parse_args()
    out = Path(args.out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("RAYCONV_TEST_CACHE", REPO / ".cache"))
    model = PRESETS["demo"]
    meta = ensure_checkpoint(model, cache / "synthetic")
    hf = ensure_hf_checkpoint(model, cache / "bench-hf", max_shard_size="100MB")
    env = dict(os.environ, JAX_PLATFORMS="cpu", RAY_USAGE_STATS_ENABLED="0")
    common = ["--quantize_type", "int8", "--quantize_weights", "True", "--num_workers", str(args.workers),
              "--no_progress", "--restart"]
    results = {}
    for label, source in (("rayconv, Meta .pth", ["--input_directory", str(meta), "--model_path", model.descriptor]),
                          ("rayconv, HF safetensors", ["--input_directory", str(hf)])):
        cmd = [sys.executable, "-m", "rayconv.cli", "convert", *source, "--output_directory",
               str(out / label.split()[-1].replace(".", "")), *common]
        run = measure(cmd, env=env, log=logs / f"{label.split()[-1].replace('.', '')}.log")
        results[label] = run.as_dict()
        print(f"{label}: {run.seconds:.1f} s, peak tree RSS {run.peak_rss / 1e9:.2f} GB (PSS {run.peak_pss / 1e9:.2f})",
              flush=True)
    if (Path(args.maxtext_025) / "maxtext").is_dir() and Path(args.ref_python).exists():
        script = out / "to_maxtext_run.py"
        script.write_text(TO_MAXTEXT)
        shutil.rmtree(out / "to_maxtext", ignore_errors=True)
        run = measure([args.ref_python, str(script), str(hf), str(out / "to_maxtext")],
                      env=dict(os.environ, MAXTEXT_025=args.maxtext_025), cwd=str(out), log=logs / "to_maxtext.log")
        results["MaxText 0.2.5 to_maxtext.py"] = run.as_dict()
        print(f"to_maxtext.py: {run.seconds:.1f} s, peak RSS {run.peak_rss / 1e9:.2f} GB", flush=True)
    else:
        print(f"maxtext 0.2.5 not found under {args.maxtext_025}: to_maxtext.py not measured")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
