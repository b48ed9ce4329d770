"""Synthetic Meta-format Llama checkpoints: any dims, seeded bf16 weights, sharded as Meta shards.

The shards are written with ``torch.save`` so they are the real container format (zip, 64-byte
aligned STORED records, pickle protocol 2). The split rules follow Meta's model-parallel layout
(llama-models ``checkpoint.py``): wq/wk/wv/w1/w3/output split on dim 0, wo/w2 on dim 1,
tok_embeddings on dim 0 (llama-3+) or dim 1 (llama-2), norms replicated. When there are more shards
than kv heads each kv head is repeated across ``n_shards // n_kv_heads`` consecutive shards and
params.json reports ``n_kv_heads = n_shards``, exactly like the 405B MP16 release.

Every slice is generated from its own seed, so a shard is produced without materialising the
model and generating a multi-GB checkpoint needs memory for one shard only.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import shutil
import zlib
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from rayconv.families.llama import SCALED_ROPE_FAMILIES, embedding_split_axis, ffn_dim

BF16 = ml_dtypes.bfloat16


@dataclasses.dataclass(frozen=True)
class SyntheticModel:
    """Dimensions of a synthetic checkpoint. ``n_kv_heads`` is the real (MaxText) kv-head count."""

    family: str = "llama-3.1"
    dim: int = 256
    n_layers: int = 2
    n_heads: int = 8
    n_kv_heads: int = 4
    vocab_size: int = 512
    multiple_of: int = 64
    ffn_dim_multiplier: float | None = 1.3
    n_shards: int = 1
    seed: int = 0
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    #: Norms in shards 1.. differ slightly from shard 0, as reported for real Llama 3 shards;
    #: converters must take shard 0's copy.
    norm_jitter: bool = True
    #: Meta descriptor whose layout this mimics (gives the MaxText model name and real kv heads).
    descriptor: str | None = None
    #: Meta's FP8 SKU layout: FFN weights of layers 1..n_layers-2 as float8_e4m3fn, quantized per row by
    #: FBGEMM's quantizer (rayconv.fp8.quantize_rows) from the bf16 weights, plus fp8_scales_{r}.pt.
    fp8: bool = False
    #: One all-zero output channel in every int8-quantized kernel of every layer (row ``(layer + 1) % rows`` of
    #: each shard's wq/wk/wv/wo/w1/w2/w3, see ``_zero_channel``): AQT stores a fixed scale for such a channel
    #: (absmax 0 -> 1), which only a checkpoint that has one can compare with MaxText's quantizer.
    zero_channel: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return ffn_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def params_kv_heads(self) -> int:
        return max(self.n_kv_heads, self.n_shards)

    def params_json(self) -> dict:
        params = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.params_kv_heads,
            "vocab_size": self.vocab_size,
            "multiple_of": self.multiple_of,
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "use_scaled_rope": self.family in SCALED_ROPE_FAMILIES,
        }
        if self.ffn_dim_multiplier is not None:
            params["ffn_dim_multiplier"] = self.ffn_dim_multiplier
        return params

    def validate(self) -> None:
        """Refuse dimensions that cannot be sharded like a Meta checkpoint (one line, as a SpecError)."""
        from rayconv.errors import SpecError
        from rayconv.models import MAX_DIM, MAX_HEADS, MAX_LAYERS, MAX_VOCAB

        bounds = {"dim": MAX_DIM, "n_layers": MAX_LAYERS, "n_heads": MAX_HEADS, "n_kv_heads": MAX_HEADS,
                  "vocab_size": MAX_VOCAB, "multiple_of": MAX_DIM, "n_shards": MAX_HEADS}
        for name, high in bounds.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise SpecError(f"synthetic model: {name} must be an integer from 1 to {high}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SpecError(f"synthetic model: seed must be a non-negative integer, got {self.seed!r}")
        mp = self.n_shards
        problems = []
        if self.dim % self.n_heads:
            problems.append("dim must be a multiple of n_heads")
        if self.n_heads % mp:
            problems.append("n_heads must be a multiple of n_shards")
        if self.n_kv_heads % mp and mp % self.n_kv_heads:
            problems.append("n_kv_heads and n_shards must divide one another")
        if self.ffn_dim % mp:
            problems.append(f"ffn dim {self.ffn_dim} must be a multiple of n_shards")
        split = self.dim if embedding_split_axis(self.family) == 1 else self.vocab_size
        if split % mp:
            problems.append("the embedding's split axis must be a multiple of n_shards")
        if problems:
            raise SpecError("synthetic model: " + "; ".join(problems))

    def nbytes(self) -> int:
        """Approximate total size of the shards (bf16, including repeated kv heads)."""
        e, m, d = self.dim, self.ffn_dim, self.head_dim
        kv_rows = max(self.n_kv_heads, self.n_shards) * d
        per_layer = 2 * e * e + 2 * kv_rows * e + 3 * e * m + 2 * e * self.n_shards
        total = 2 * (self.n_layers * per_layer + 2 * self.vocab_size * e + e * self.n_shards)
        if self.fp8:  # FFN weights of layers 1..n-2 at 1 byte per element, plus 4 bytes per row scale
            fp8_layers = max(0, self.n_layers - 2)
            total -= fp8_layers * (3 * e * m - 4 * (2 * m + e * self.n_shards))
        return total


#: Named shapes. ``demo`` is the embedded default input of ``rayconv convert``: Llama-3.1-shaped,
#: 16 shards with the 405B kv-head repetition, head_dim 128, a few hundred MB.
PRESETS: dict[str, SyntheticModel] = {
    "demo": SyntheticModel(family="llama-3.1", dim=2048, n_layers=4, n_heads=16, n_kv_heads=8,
                           vocab_size=16032, multiple_of=256, ffn_dim_multiplier=1.2, n_shards=16,
                           descriptor="Llama3.1-405B-Instruct:bf16-mp16"),
    # The 405B MP16 layout scaled down (16 shards, 128 heads, 8 kv heads) to ~2 GB, as in the
    # MaxText reference measurements (maxtext-reference-runs.md).
    "405b-2gb": SyntheticModel(family="llama-3.1", dim=2048, n_layers=18, n_heads=128, n_kv_heads=8,
                               vocab_size=32064, multiple_of=256, ffn_dim_multiplier=1.2, n_shards=16,
                               descriptor="Llama3.1-405B-Instruct:bf16-mp16"),
    # Meta's FP8 SKU layout (the default 405B download) at the demo's widths: 8 shards, one kv head each, the FFN
    # weights of layers 1..n-2 float8 with row scales in fp8_scales_{r}.pt (``scripts/demo.sh --synthetic demo-fp8``).
    "demo-fp8": SyntheticModel(family="llama-3.1", dim=2048, n_layers=4, n_heads=16, n_kv_heads=8,
                               vocab_size=16032, multiple_of=256, ffn_dim_multiplier=1.2, n_shards=8, fp8=True,
                               descriptor="Llama3.1-405B-Instruct"),
}


def ensure_checkpoint(model: SyntheticModel, root: str | Path) -> Path:
    """Write the checkpoint under ``root/<hash of the model>`` unless a complete copy is there."""
    # fp8=False and zero_channel=False are left out of the key so checkpoints cached before those fields existed
    # keep their names.
    text = repr(model).replace(", zero_channel=False)", ")").replace(", fp8=False)", ")")
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    return cached_directory(Path(root) / key, "checklist.chk", lambda tmp: write_checkpoint(model, tmp))


def cached_directory(out: Path, marker: str, write: Callable[[Path], object]) -> Path:
    """``out`` once it holds ``marker`` (the file written last); else ``write(tmp)`` fills a temporary directory
    beside it, renamed into place.

    Safe when several processes ask for the same entry at once (parallel test workers, two demos): one builds it
    under an exclusive ``flock`` on ``.<name>.lock`` beside it; the others wait for the lock and find it complete."""
    if (out / marker).exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (out / marker).exists():
            return out
        tmp = out.parent / f".{out.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def _rng(model: SyntheticModel, *key: object) -> np.random.Generator:
    digest = zlib.crc32(repr((model.seed,) + key).encode())
    return np.random.default_rng([model.seed, digest])


def _weights(model: SyntheticModel, shape: tuple[int, ...], *key: object) -> np.ndarray:
    values = _rng(model, *key).standard_normal(shape, dtype=np.float32)
    values *= 0.02
    return values.astype(BF16)


def _norm(model: SyntheticModel, shard: int, *key: object) -> np.ndarray:
    values = 1.0 + 0.1 * _rng(model, *key).standard_normal((model.dim,), dtype=np.float32)
    if model.norm_jitter and shard:
        values[shard % model.dim] += np.float32(0.25)
    return values.astype(BF16)


def _zero_channel(model: SyntheticModel, layer: int, kernel: np.ndarray) -> np.ndarray:
    """With ``model.zero_channel``, zero row ``(layer + 1) % rows`` of one shard's [out, in] layer kernel.

    A Meta row is an output channel of MaxText's per-layer kernel for every quantized rule of rayconv.families.llama: the
    kernels contract over Meta's input axis (query/key/value/wi_*: embed; out: heads x head_dim; mlp wo: mlp),
    and the transposes and the query's rope permutation only move whole rows. wo and w2 are split on their input
    axis, so each shard holds every row and the same local row zeroed in every shard is one all-zero channel;
    the row-split kernels get one zero channel per shard (repeated kv heads stay identical).
    """
    if model.zero_channel:
        kernel[(layer + 1) % kernel.shape[0]] = 0
    return kernel


def shard_tensors(model: SyntheticModel, shard: int) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (Meta key, bf16 array) for one shard, in Meta's key order."""
    mp, e, d = model.n_shards, model.dim, model.head_dim
    m, v = model.ffn_dim, model.vocab_size
    if embedding_split_axis(model.family) == 1:
        yield "tok_embeddings.weight", _weights(model, (v, e // mp), "tok", shard)
    else:
        yield "tok_embeddings.weight", _weights(model, (v // mp, e), "tok", shard)
    kv_step = max(1, mp // model.n_kv_heads)
    kv_rows = max(1, model.n_kv_heads // mp) * d
    for layer in range(model.n_layers):
        p = f"layers.{layer}."
        kernels = (
            ("attention.wq.weight", _weights(model, (model.n_heads // mp * d, e), "wq", layer, shard)),
            ("attention.wk.weight", _weights(model, (kv_rows, e), "wk", layer, shard // kv_step)),
            ("attention.wv.weight", _weights(model, (kv_rows, e), "wv", layer, shard // kv_step)),
            ("attention.wo.weight", _weights(model, (e, model.n_heads // mp * d), "wo", layer, shard)),
            ("feed_forward.w1.weight", _weights(model, (m // mp, e), "w1", layer, shard)),
            ("feed_forward.w2.weight", _weights(model, (e, m // mp), "w2", layer, shard)),
            ("feed_forward.w3.weight", _weights(model, (m // mp, e), "w3", layer, shard)),
        )
        for name, array in kernels:
            yield p + name, _zero_channel(model, layer, array)
        yield p + "attention_norm.weight", _norm(model, shard, "attention_norm", layer)
        yield p + "ffn_norm.weight", _norm(model, shard, "ffn_norm", layer)
    yield "norm.weight", _norm(model, shard, "norm")
    yield "output.weight", _weights(model, (v // mp, e), "output", shard)


def _fp8_state(model: SyntheticModel, shard: int) -> tuple[dict, dict]:
    """One FP8-SKU shard (torch tensors, Meta's key order) and its scale dict ``{i}_feed_forward.{w}_{shard}``."""
    import torch

    from rayconv import fp8

    state, scales = {}, {}
    for key, array in shard_tensors(model, shard):
        if fp8.is_fp8_tensor(key, model.n_layers):
            q, scale = fp8.quantize_rows(array)
            state[key] = torch.from_numpy(np.ascontiguousarray(q).view(np.uint8)).view(torch.float8_e4m3fn)
            scales[fp8.scale_key(key, shard)] = torch.from_numpy(scale)
        else:
            state[key] = torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    return state, scales


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checkpoint(model: SyntheticModel, out_dir: str | Path, *, checklist: bool = True) -> Path:
    """Write ``consolidated.NN.pth`` shards, ``params.json`` and ``checklist.chk`` into out_dir."""
    import torch

    model.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(model.params_json()))
    (out / "tokenizer.model").write_bytes(b"synthetic tokenizer placeholder\n")
    names = ["params.json", "tokenizer.model"]
    for shard in range(model.n_shards):
        if model.fp8:
            state, scales = _fp8_state(model, shard)
            torch.save(scales, out / f"fp8_scales_{shard}.pt")
            names.append(f"fp8_scales_{shard}.pt")
        else:
            state = {
                key: torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
                for key, array in shard_tensors(model, shard)
            }
        name = f"consolidated.{shard:02d}.pth"
        torch.save(state, out / name)
        names.append(name)
        del state
    if checklist:
        lines = [f"{_md5(out / name)}  {name}\n" for name in names]
        (out / "checklist.chk").write_text("".join(lines))
    return out
