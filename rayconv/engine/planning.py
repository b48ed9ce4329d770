"""``rayconv plan``: the plan convert would run, plus worker-count estimates.

``--simulate`` builds the same plan from a descriptor's published dimensions with synthetic shard
indexes (tensor byte ranges laid out as torch.save lays them), so the 405B plan can be inspected
on a laptop. Estimates scale a measured per-worker throughput; they are estimates, labelled so.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from rayconv import fp8, mapping
from rayconv.job import MEMORY_PER_PIECE_BYTE, WORKER_BASE_BYTES, ConvertOptions, make_plan, open_checkpoint
from rayconv.models import KNOWN_SIZES, Descriptor, ModelSpec, resolve_spec
from rayconv.plan import Plan, describe
from rayconv.source.checkpoint import MetaCheckpoint
from rayconv.source.pth import TensorInfo

GiB = 1 << 30
#: Per-worker conversion throughput (read + transform + write all outputs) measured on the 2-core
#: test machine with the benchmark (docs/benchmarks.md); override with --throughput_mb_s.
DEFAULT_WORKER_MB_S = 150.0


def simulated_indexes(spec: ModelSpec, fp8_sku: bool = False) -> list[dict[str, TensorInfo]]:
    """Shard indexes as torch.save lays them out; ``fp8_sku``: FFN weights of layers 1..n-2 as float8 (1 byte)."""
    indexes = []
    for shard in range(spec.n_shards):
        offset, index = 64, {}
        for rule in mapping.rules(spec):
            shape = mapping.shard_shape(rule, spec)
            for layer in (range(spec.n_layers) if rule.per_layer else (None,)):
                key = rule.key(layer)
                dtype = fp8.FP8_DTYPE if fp8_sku and fp8.is_fp8_tensor(key, spec.n_layers) else "bfloat16"
                nbytes = math.prod(shape) * (1 if dtype == fp8.FP8_DTYPE else 2)
                index[key] = TensorInfo(key, dtype, shape, offset, nbytes)
                offset += nbytes + 64
        indexes.append(index)
    return indexes


def simulated_scales(indexes: list[dict[str, TensorInfo]], n_layers: int) -> fp8.Scales:
    """fp8_scales_{r}.pt indexes for simulated FP8 shards: one float32 [rows] tensor per float8 tensor."""
    scale_indexes = []
    for shard, index in enumerate(indexes):
        offset, scales = 64, {}
        for key, info in index.items():
            if fp8.is_fp8_tensor(key, n_layers):
                name = fp8.scale_key(key, shard)
                scales[name] = TensorInfo(name, "float32", (info.shape[0],), offset, 4 * info.shape[0])
                offset += 4 * info.shape[0] + 64
        scale_indexes.append(scales)
    return fp8.Scales(files=tuple(fp8.scale_file_name(r) for r in range(len(indexes))), indexes=tuple(scale_indexes))


def _published_params(descriptor: Descriptor) -> dict[str, Any]:
    known = next(k for k in KNOWN_SIZES[descriptor.family] if k.size == descriptor.size)
    ffn = {"405b": (1.2, 4096), "70b": (1.3, 4096), "8b": (1.3, 1024)}.get(descriptor.size, (None, 256))
    return {"dim": known.dim, "n_layers": known.n_layers, "n_heads": known.n_heads,
            "n_kv_heads": max(known.n_kv_heads, descriptor.shards or 1), "vocab_size": 128256,
            "ffn_dim_multiplier": ffn[0], "multiple_of": ffn[1]}


def estimates(plan: Plan, worker_memory_gb: float, throughput_mb_s: float | None) -> dict[str, Any]:
    rate = (throughput_mb_s or DEFAULT_WORKER_MB_S) * 1e6
    largest = max(p.nbytes for u in plan.units for p in u.pieces)
    rows = []
    for workers in (8, 16, 32):
        # Units are dealt out dynamically; the slowest worker gets at most one unit more than average.
        per_worker = plan.input_bytes / workers + max(u.read_bytes for u in plan.units)
        rows.append({"workers": workers, "bytes_per_worker": int(per_worker),
                     "peak_memory_per_worker_gb": round((largest * MEMORY_PER_PIECE_BYTE + WORKER_BASE_BYTES) / GiB, 2),
                     "estimated_seconds": round(per_worker / rate, 1)})
    return {"per_worker_throughput_mb_s": rate / 1e6, "worker_memory_budget_gb": worker_memory_gb,
            "estimates": rows, "note": "estimates: measured per-worker throughput × plan sizes; storage "
                                       "bandwidth limits are not modelled"}


def simulate(model_name: str | None, model_path: str | None, kinds: Sequence[str], quantize_type: str | None,
             worker_memory_gb: float, throughput_mb_s: float | None) -> dict[str, Any]:
    if not model_path:
        from rayconv.errors import SpecError

        raise SpecError("--simulate needs --model_path (e.g. Llama3.1-405B-Instruct:bf16-mp16)")
    descriptor = Descriptor.parse(model_path)
    spec = resolve_spec(_published_params(descriptor), n_shards=descriptor.shards or 1, vocab_size=None,
                        model_name=model_name, descriptor=descriptor)
    options = ConvertOptions(files={}, input_display=model_path, output="", worker_memory_gb=worker_memory_gb,
                             kinds=tuple(kinds), quantize_type=quantize_type)
    # The same planner convert runs, over indexes laid out as torch.save would lay out these shards.
    fp8_sku = descriptor.sku == "fp8"
    indexes = simulated_indexes(spec, fp8_sku)
    checkpoint = MetaCheckpoint(spec=spec, shards=[f"consolidated.{i:02d}.pth" for i in range(spec.n_shards)],
                                indexes=indexes, files={},
                                scales=simulated_scales(indexes, spec.n_layers) if fp8_sku else None)
    plan = make_plan(checkpoint, options)
    source = {"source_sku": descriptor.sku} if fp8_sku else {}
    return {"simulated": True, **source, "plan": describe(plan), **estimates(plan, worker_memory_gb, throughput_mb_s)}


def report_for_files(files, display, model_name, model_path, kv_heads, kinds, quantize_type, worker_memory_gb,
                     throughput_mb_s, source_format: str = "auto", input_directory: str | None = None) -> dict[str, Any]:
    options = ConvertOptions(files=files, input_display=display, output="", model_name=model_name,
                             model_path=model_path, kv_heads=kv_heads, kinds=tuple(kinds),
                             quantize_type=quantize_type, worker_memory_gb=worker_memory_gb,
                             source_format=source_format, input_directory=input_directory)
    checkpoint = open_checkpoint(options)
    plan = make_plan(checkpoint, options)
    return {"simulated": False, "plan": describe(plan), **estimates(plan, worker_memory_gb, throughput_mb_s)}
