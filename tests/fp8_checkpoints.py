"""The bf16 twin of a synthetic FP8 checkpoint, written by torch independently of rayconv.

Meta's FP8 SKU stores the FFN weights of layers 1..n-2 as float8_e4m3fn with one float32 scale per row in
``fp8_scales_{r}.pt``. Its dequantized twin is what "converted exactly" is measured against: every FP8 tensor
becomes ``(q.float() * s[row]).to(bfloat16)`` (a float32 product, rounded to nearest even), every other tensor is
copied, and the result is saved as a plain bf16 MP-n checkpoint (``Llama3.1-405B-Instruct:bf16-mp8`` for the
405B). The tests convert both and compare; ``scripts/bench_sources.py`` times both.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from rayconv import fp8


def torch_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The formula in torch, independently of rayconv: float32 product, then bf16 (round to nearest even)."""
    return (q.to(torch.float32) * scale.to(torch.float32).reshape(-1, 1)).to(torch.bfloat16)


def write_dequantized(src: Path, dst: Path) -> Path:
    """Write the FP8 checkpoint ``src``'s bf16 twin to ``dst`` (which must not exist)."""
    dst.mkdir(parents=True)
    for name in ("params.json", "tokenizer.model"):
        shutil.copy(src / name, dst / name)
    for path in sorted(src.glob("consolidated.*.pth")):
        shard = int(path.name.split(".")[1])
        state = torch.load(path, weights_only=True, map_location="cpu")
        scales = torch.load(src / f"fp8_scales_{shard}.pt", weights_only=True, map_location="cpu")
        for key, tensor in state.items():
            if tensor.dtype == torch.float8_e4m3fn:
                state[key] = torch_dequantize(tensor, scales[fp8.scale_key(key, shard)])
        torch.save(state, dst / path.name)
    return dst


def ensure_dequantized(src: Path, root: Path) -> Path:
    """Cached :func:`write_dequantized` of ``src`` under ``root`` (built in a temp dir, renamed into place)."""
    from hf_checkpoints import cached_checkpoint

    return cached_checkpoint(Path(root) / f"deq-{src.name}", lambda tmp: write_dequantized(src, tmp),
                             marker="params.json")
