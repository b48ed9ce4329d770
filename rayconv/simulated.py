"""A checkpoint with a descriptor's published dimensions and torch.save-shaped shard indexes, no file read:
what ``rayconv plan --simulate`` plans (rayconv.forecast), so the 405B plan can be inspected on a laptop."""

from __future__ import annotations

import math
from typing import Any

from rayconv import families, fp8, mapping
from rayconv.families import Descriptor, family_of_name, resolve_spec
from rayconv.models import ModelSpec
from rayconv.source.checkpoint import MetaCheckpoint
from rayconv.source.hf import HFCheckpoint, spec_from_config
from rayconv.leaves import TensorInfo


def simulated_indexes(spec: ModelSpec, fp8_sku: bool = False) -> list[dict[str, TensorInfo]]:
    """Shard indexes as torch.save lays them out; ``fp8_sku``: FFN weights of layers 1..n-2 as float8 (1 byte)."""
    indexes = []
    for shard in range(spec.n_shards):
        offset, index = 64, {}
        for rule in families.rules(spec):
            shape = mapping.shard_shape(rule, spec)
            for layer in (range(spec.n_layers) if rule.per_layer else (None,)):
                key = rule.source_key("meta", layer)
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
    known = next(k for k in family_of_name(descriptor.family).known_sizes[descriptor.family] if k.size == descriptor.size)
    ffn = {"405b": (1.2, 4096), "70b": (1.3, 4096), "8b": (1.3, 1024)}.get(descriptor.size, (None, 256))
    return {"dim": known.dim, "n_layers": known.n_layers, "n_heads": known.n_heads,
            "n_kv_heads": max(known.n_kv_heads, descriptor.shards or 1), "vocab_size": 128256,
            "ffn_dim_multiplier": ffn[0], "multiple_of": ffn[1]}


def simulated_hf_checkpoint(spec: ModelSpec) -> HFCheckpoint:
    """Hugging Face files of the spec's tensors, laid out one after the other in one safetensors file (the plan does
    not depend on how tensors are spread over files: a piece reads one tensor's rows)."""
    offset, index = 8 + 4096, {}
    for key, shape in families.expected_tensors(spec, "hf"):
        nbytes = math.prod(shape) * 2
        index[key] = TensorInfo(key, "bfloat16", shape, offset, nbytes)
        offset += nbytes
    return HFCheckpoint(spec=spec, tensor_files=["model.safetensors"], indexes=[index], files={},
                        where={key: (0, info) for key, info in index.items()})


def simulated_checkpoint(model_name: str | None, model_path: str | None) -> MetaCheckpoint | HFCheckpoint:
    """A checkpoint with the descriptor's (or a published HF model's, e.g. ``qwen3-235b-a22b``) published dimensions
    and its files' indexes (no file read)."""
    if not model_path:
        from rayconv.errors import SpecError

        raise SpecError("--simulate needs --model_path (e.g. Llama3.1-405B-Instruct:bf16-mp16 or qwen3-235b-a22b)")
    for family in families.FAMILIES.values():
        config = family.published_config(model_path)
        if config is not None:
            return simulated_hf_checkpoint(spec_from_config(config, model_name=model_name, model_path=None,
                                                            source=f"{model_path} (published config)"))
    descriptor = Descriptor.parse(model_path)
    spec = resolve_spec(_published_params(descriptor), n_shards=descriptor.shards or 1, vocab_size=None,
                        model_name=model_name, descriptor=descriptor)
    fp8_sku = descriptor.sku == "fp8"
    indexes = simulated_indexes(spec, fp8_sku)
    return MetaCheckpoint(spec=spec, tensor_files=[f"consolidated.{i:02d}.pth" for i in range(spec.n_shards)],
                          indexes=indexes, files={},
                          scales=simulated_scales(indexes, spec.n_layers) if fp8_sku else None)
