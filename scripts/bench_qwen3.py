#!/usr/bin/env python
"""Benchmark, Qwen3 MoE: rayconv vs MaxText 0.2.5's to_maxtext.py vs the I/O floor, one layer at real widths.

    .venvs/main/bin/python scripts/bench.py --preset qwen3-moe-real-width     # ~4.9 GB in; to_maxtext needs ~RAM
    .venvs/main/bin/python scripts/bench_qwen3.py --tiny --out /tmp/q         # the same steps at toy dims (a check)

The input (``qwen3-moe-real-width``): one decoder layer of Qwen3-235B-A22B's real shapes — hidden 4096, 64 query heads
and 4 kv heads of head_dim 128, 128 experts of width 1536 (one layer's experts: 128 × 3 × 4096 × 1536 bf16 ≈ 4.8 GB)
— and a vocabulary of 2048, as Hugging Face files: transformers' ``Qwen3MoeConfig`` writes config.json, the tensors
are seeded bf16 values written straight to ``model-0000k-of-0000n.safetensors`` (+ index) under the Hub's names
(transformers would first build the fused float32 experts, 26 GB). The same dims with ``--tiny``: 8 experts of 64,
hidden 256, 4 heads of 64.

Measured for each contender (scripts/bench.py's ``measure``: wall time, peak RSS and PSS of the process tree):
* to_maxtext.py (MaxText 0.2.5, reference env; tools/maxtext_ref/to_maxtext_hf.py with its default flags), once for
  the scanned and once for the unscanned output — it writes one per run;
* rayconv convert with default flags (Ray started by the CLI; both outputs in one pass), and with one worker;
* the I/O floor (read every input byte cold, write as many bytes as rayconv writes; scripts/bench.py's ``io_floor``).
Writes <out>/qwen3-results.json and prints a table. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tools" / "maxtext_ref"))

#: (hidden, layers, heads, kv heads, head_dim, experts, top-k, expert width, vocab)
REAL_WIDTH = dict(hidden=4096, layers=1, heads=64, kv_heads=4, head_dim=128, experts=128, top_k=8, width=1536,
                  vocab=2048)
TINY = dict(hidden=256, layers=1, heads=4, kv_heads=2, head_dim=64, experts=8, top_k=2, width=64, vocab=512)
#: Safetensors files of at most this many bytes (the Hub's Qwen3 files are ~4-5 GB; smaller keeps writes streaming).
SHARD_BYTES = 1 << 30


def hf_config(dims: dict):
    import transformers

    return transformers.Qwen3MoeConfig(
        vocab_size=dims["vocab"], hidden_size=dims["hidden"], intermediate_size=dims["width"] * dims["top_k"],
        num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"], num_key_value_heads=dims["kv_heads"],
        head_dim=dims["head_dim"], num_experts=dims["experts"], num_experts_per_tok=dims["top_k"],
        moe_intermediate_size=dims["width"], norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16",
        architectures=["Qwen3MoeForCausalLM"])


def tensors(dims: dict):
    """(HF name, shape) of every tensor, in the order the files hold them."""
    e, d, h, k, x, w = dims["hidden"], dims["head_dim"], dims["heads"], dims["kv_heads"], dims["experts"], dims["width"]
    yield "model.embed_tokens.weight", (dims["vocab"], e)
    for layer in range(dims["layers"]):
        p = f"model.layers.{layer}."
        yield from ((p + "input_layernorm.weight", (e,)), (p + "post_attention_layernorm.weight", (e,)),
                    (p + "self_attn.q_proj.weight", (h * d, e)), (p + "self_attn.k_proj.weight", (k * d, e)),
                    (p + "self_attn.v_proj.weight", (k * d, e)), (p + "self_attn.o_proj.weight", (e, h * d)),
                    (p + "self_attn.q_norm.weight", (d,)), (p + "self_attn.k_norm.weight", (d,)),
                    (p + "mlp.gate.weight", (x, e)))
        for expert in range(x):
            q = f"{p}mlp.experts.{expert}."
            yield from ((q + "gate_proj.weight", (w, e)), (q + "up_proj.weight", (w, e)), (q + "down_proj.weight", (e, w)))
    yield "model.norm.weight", (e,)
    yield "lm_head.weight", (dims["vocab"], e)


def values(rng, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """bf16 bit patterns (uint16) of N(0, 0.02²)-like weights and norms near 1, without a float32 copy of the big
    tensors (a 4096 × 1536 expert is drawn as 16-bit words directly)."""
    import ml_dtypes

    if name.endswith("norm.weight"):
        return (1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16).view(np.uint16)
    # exponents 2^-7..2^-6 with a random mantissa and sign: magnitudes 0.008-0.03
    bits = rng.integers(0x3C00, 0x3D00, size=shape, dtype=np.uint16)
    return bits | (rng.integers(0, 2, size=shape, dtype=np.uint16) << 15)


def write_checkpoint(dims: dict, out: Path, seed: int = 235) -> Path:
    """config.json (transformers), the safetensors files and their index, under the Hub's names."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hf_config(dims).save_pretrained(tmp)
    rng = np.random.default_rng(seed)
    groups, current, size = [], [], 0
    for name, shape in tensors(dims):
        nbytes = 2 * int(np.prod(shape))
        if current and size + nbytes > SHARD_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    groups.append(current)
    weight_map = {}
    for i, group in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        _write_safetensors(tmp / file, [(name, shape, values(rng, name, shape)) for name, shape in group])
        weight_map.update({name: file for name, _ in group})
    total = sum(2 * int(np.prod(s)) for _, s in tensors(dims))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _write_safetensors(path: Path, items: list) -> None:
    """A safetensors file of bf16 tensors given as uint16 words (the format: 8-byte header length, JSON header
    padded to 8 bytes, then the tensors back to back)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, array in items:
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for _, _, array in items:
            f.write(np.ascontiguousarray(array).tobytes())


def ensure_checkpoint(dims: dict, cache: Path) -> Path:
    key = "-".join(f"{v}" for v in dims.values())
    path = cache / f"qwen3-moe-bench-{key}"
    return path if (path / "model.safetensors.index.json").exists() else write_checkpoint(dims, path)


def to_maxtext_run(src: Path, name: str, scanned: bool, work: Path, logs: Path):
    import reference
    from bench_measure import measure

    cmd = [str(reference.ref_python()), str(reference.SCRIPTS_DIR / "to_maxtext_hf.py"), "--src", str(src),
           "--name", name, "--scan", "true" if scanned else "false", "--out", str(work)]
    label = f"to_maxtext.py ({'scanned' if scanned else 'unscanned'})"
    run = measure(cmd, env=reference.child_env("0.2.5"), log=logs / f"{label.replace(' ', '_')}.log", check=False)
    run.name = label
    return run


def main(argv: list[str] | None = None) -> None:
    from bench_measure import dir_bytes, drop_cache, io_floor, rayconv_run

    from rayconv.families import qwen3

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy dims (a quick check that every step runs)")
    parser.add_argument("--out", default=str(REPO / "bench-results"))
    parser.add_argument("--scratch", default=None)
    parser.add_argument("--cache", default=None)
    parser.add_argument("--skip-maxtext", action="store_true")
    args = parser.parse_args(argv)
    dims = TINY if args.tiny else REAL_WIDTH
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    cache = Path(args.cache or os.environ.get("RAYCONV_TEST_CACHE") or REPO / ".cache") / "qwen3-bench"
    print(f"preparing the input in {cache}", flush=True)
    src = ensure_checkpoint(dims, cache)
    config = json.loads((src / "config.json").read_text())
    name = qwen3.spec_from_config(config).maxtext_name
    scratch = Path(tempfile.mkdtemp(prefix="rayconv-bench-qwen3-", dir=args.scratch))
    runs = []
    try:
        if not args.skip_maxtext:
            for scanned in (True, False):
                drop_cache([p for p in sorted(src.iterdir()) if p.is_file()])
                runs.append(to_maxtext_run(src, name, scanned, scratch / "tm", logs))
                shutil.rmtree(scratch / "tm", ignore_errors=True)
                print(f"  {runs[-1].name}: {runs[-1].seconds:.1f} s, peak RSS {runs[-1].peak_rss / 1e9:.2f} GB"
                      + (f" — FAILED: {runs[-1].failed}" if runs[-1].failed else ""), flush=True)
        for label, extra in (("rayconv, default settings", ()), ("rayconv, 1 worker", ("--num_workers", "1"))):
            runs.append(rayconv_run(src, scratch / "r", None, logs, label, *extra, outputs=()))
            out_bytes = dir_bytes(scratch / "r")
            shutil.rmtree(scratch / "r")
            print(f"  {label}: {runs[-1].seconds:.1f} s, peak RSS {runs[-1].peak_rss / 1e9:.2f} GB; "
                  f"{runs[-1].phases}", flush=True)
        floor = io_floor(src, out_bytes, scratch)
        runs.append(floor)
        print(f"  {floor.name}: {floor.seconds:.1f} s", flush=True)
        results = {"preset": "qwen3-moe-real-width" + (" (--tiny)" if args.tiny else ""), "dims": dims,
                   "maxtext_name": name, "input_bytes": dir_bytes(src), "output_bytes": out_bytes,
                   "runs": [r.as_dict() for r in runs]}
        (out / "qwen3-results.json").write_text(json.dumps(results, indent=1))
        print("\n| contender | seconds | peak RSS (GB) | peak PSS (GB) |\n|---|---|---|---|")
        for r in runs:
            print(f"| {r.name} | {r.seconds:.1f} | {r.peak_rss / 1e9:.2f} | {r.peak_pss / 1e9:.2f} |"
                  + (f" FAILED: {r.failed}" if r.failed else ""))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
