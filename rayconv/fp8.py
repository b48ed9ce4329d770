"""Meta's FP8 405B SKU: which tensors are float8, their row scales, and the exact dequantization.

The FP8 SKU (``Llama3.1-405B[-Instruct]`` with no variant) is the bf16 MP8 checkpoint with the FFN
weights ``layers.{i}.feed_forward.{w1,w3,w2}.weight`` of layers 1..n_layers-2 stored as
float8_e4m3fn, quantized per row by FBGEMM's ``quantize_fp8_per_row`` with the scale of every row in
``fp8_scales_{shard}.pt`` (a ``torch.save`` dict ``{f"{i}_feed_forward.{w}_{shard}": float32 [rows]}``).
See docs/architecture.md, "Meta's FP8 SKU".

rayconv converts it by dequantizing on the fly: ``bf16 = RNE_bf16(float32(float32(q) * float32(s[row])))``.
The plan carries, for each float8 read, the byte range of its rows' scales in the scale file (a
:class:`rayconv.leaves.ScaleRead`), found from the scale file's index; workers read both ranges and
dequantize, so neither weights nor scales pass through Ray, and the plan stays a few bytes per read
(the 405B scales are ~118 MB, too much to carry in the plan). The driver checks the scale files'
structure (files, keys, dtypes, row counts) from their indexes before anything runs; each worker checks
that the scales it reads are finite and positive.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

import ml_dtypes
import numpy as np

from rayconv.errors import SourceError
from rayconv.leaves import ScaleRead

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
BF16 = np.dtype(ml_dtypes.bfloat16)
FP8_DTYPE = "float8_e4m3fn"  # TensorInfo.dtype of a float8 tensor
#: Largest finite float8_e4m3fn, and FBGEMM's lower bound on a row scale (1 / (448 · 512)).
FP8_MAX = np.float32(448.0)
MIN_SCALE = np.float32(1.0 / (448.0 * 512.0))
#: The largest row scale FBGEMM's quantizer writes for bf16 weights: the row max it divides by 448 is at most the
#: largest finite bf16 (weights are quantized without a ``scale_ub`` clamp, so nothing lowers it), and the division
#: is in float32: 7.565918e35. No bf16 row gives a larger scale, and from 7.580753e35 on, 448 · s no longer rounds
#: to a finite bf16: the dequantized weight (and the int8 scale made from it) would be ±inf.
MAX_SCALE = np.float32(np.float32(ml_dtypes.finfo(ml_dtypes.bfloat16).max) / FP8_MAX)
SCALE_FILE = re.compile(r"^fp8_scales_(\d+)\.pt$")
_FFN = re.compile(r"^layers\.(\d+)\.feed_forward\.(w[123])\.weight$")
#: float32 temporaries of dequantization are bounded to this many bytes (row blocks).
_BLOCK_BYTES = 8 << 20
#: Every float8_e4m3fn code's float32 value (exact; the two NaN codes map to NaN).
_FP8_TO_F32 = np.arange(256, dtype=np.uint8).view(FP8).astype(np.float32)


def scale_file_name(shard: int) -> str:
    return f"fp8_scales_{shard}.pt"


def is_fp8_tensor(key: str, n_layers: int) -> bool:
    """Whether the FP8 SKU stores ``key`` as float8: the FFN weights of layers 1..n_layers-2."""
    match = _FFN.match(key)
    return bool(match) and 1 <= int(match.group(1)) <= n_layers - 2


def scale_key(tensor: str, shard: int) -> str:
    """Key of the scales in ``fp8_scales_{shard}.pt``: ``layers.5.feed_forward.w1.weight`` → ``5_feed_forward.w1_{shard}``."""
    match = _FFN.match(tensor)
    if not match:
        raise ValueError(f"{tensor} is not an FFN weight")
    return f"{match.group(1)}_feed_forward.{match.group(2)}_{shard}"


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FBGEMM ``quantize_fp8_per_row`` (no upper bound), emulated exactly: → (float8 [rows, cols], float32 [rows]).

    ``s = max(float32(max_k |w[n, k]|) / 448, 1 / (448 · 512))``; ``q = fp8_e4m3fn(float32(w) / s)``, rounded to
    nearest even and saturated at ±448 (``__NV_SATFINITE``).
    """
    w32 = np.asarray(w).astype(np.float32)
    rowmax = np.max(np.abs(w32), axis=1)
    scale = np.maximum(rowmax / FP8_MAX, MIN_SCALE).astype(np.float32)
    q = np.clip(w32 / scale[:, None], -FP8_MAX, FP8_MAX).astype(FP8)
    return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``bf16 = RNE_bf16(float32(float32(q) * float32(scale[row])))`` for a float8 [rows, cols] block.

    The product is formed in float32 (rounded to float32, as torch's ``q.float() * s`` does) and then rounded
    to bf16; rows are processed in blocks so the float32 temporaries stay small.
    """
    q = np.asarray(q)
    if q.dtype != FP8 or q.ndim != 2:
        raise ValueError(f"expected a 2-D float8_e4m3fn block, got {q.dtype} {q.shape}")
    scale = np.asarray(scale, dtype=np.float32).reshape(-1)
    if scale.shape[0] != q.shape[0]:
        raise ValueError(f"{scale.shape[0]} scales for {q.shape[0]} rows")
    if out is None:
        out = np.empty(q.shape, dtype=BF16)
    codes = q.view(np.uint8)
    step = max(1, _BLOCK_BYTES // max(1, 4 * q.shape[1]))
    block = np.empty((min(step, q.shape[0]), q.shape[1]), dtype=np.float32)
    for r0 in range(0, q.shape[0], step):
        part = block[:min(step, q.shape[0] - r0)]
        # float8 → float32 through a 256-entry table: the same values as the cast, 3-5x faster than ml_dtypes'.
        np.take(_FP8_TO_F32, codes[r0:r0 + step], out=part)
        part *= scale[r0:r0 + step, None]
        out[r0:r0 + step] = part.astype(BF16)
    return out


def check_scales(scale: np.ndarray, where: str, first_row: int = 0) -> None:
    """Scales must be what FBGEMM's per-row quantizer can write: finite, in [MIN_SCALE, MAX_SCALE] (see those). A
    scale outside is no FP8 checkpoint's, and above MAX_SCALE it dequantizes to ±inf. ``first_row``: the row of
    ``scale[0]`` in its tensor, so the message names the row as the file numbers it."""
    bad = ~(np.isfinite(scale) & (scale >= MIN_SCALE) & (scale <= MAX_SCALE))
    if bad.any():
        row = int(np.argmax(bad))
        raise SourceError(f"{where}: scale of row {first_row + row} is {float(scale[row]):.7g} (must be finite and "
                          f"within [{float(MIN_SCALE):.7g}, {float(MAX_SCALE):.7g}], the range FBGEMM's per-row "
                          "quantizer writes for bf16 weights: 1/(448·512) to the largest bf16 / 448)")


# ------------------------------------------------------------------------------------------------------------------
# Checkpoint-level structure


@dataclasses.dataclass(frozen=True)
class Scales:
    """The scale files of an FP8 checkpoint: uri per shard and each file's index ({key: TensorInfo})."""

    files: tuple[str, ...]
    indexes: tuple[dict, ...]


def detect(files: Mapping[str, str], indexes: Sequence[dict]) -> bool:
    """An FP8 checkpoint has fp8_scales_*.pt files or float8 tensors (either alone is an error caught later)."""
    return any(SCALE_FILE.match(name) for name in files) or any(
        info.dtype == FP8_DTYPE for index in indexes for info in index.values())


def open_scales(files: Mapping[str, str], shards: Sequence[str], display: str, n_layers: int,
                shard_indexes: Sequence[dict], threads: int = 8) -> Scales:
    """Index ``fp8_scales_{r}.pt`` for every shard and check their structure against the float8 tensors."""
    import concurrent.futures

    from rayconv.source.bytesource import open_source
    from rayconv.source.pth import index_pth

    found = {int(m.group(1)): name for name in files if (m := SCALE_FILE.match(name))}
    n = len(shards)
    missing = [r for r in range(n) if r not in found]
    if missing:
        raise SourceError(f"{scale_file_name(missing[0])} is missing from {display}: an FP8 checkpoint has one "
                          f"scale file per shard (fp8_scales_0.pt … fp8_scales_{n - 1}.pt)")
    extra = sorted(r for r in found if r >= n or found[r] != scale_file_name(r))
    if extra:
        raise SourceError(f"unexpected scale file {found[extra[0]]} in {display} ({n} shards)")
    uris = [files[scale_file_name(r)] for r in range(n)]

    def index(uri: str) -> dict:
        return index_pth(open_source(uri), uri.split("?", 1)[0])

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(threads, n))) as pool:
        indexes = list(pool.map(index, uris))
    for shard, (uri, index, shard_index) in enumerate(zip(uris, indexes, shard_indexes)):
        name = uri.split("?", 1)[0]
        expected = {scale_key(key, shard): info for key, info in shard_index.items() if is_fp8_tensor(key, n_layers)}
        for key in sorted(expected):
            if key not in index:
                raise SourceError(f"{name} has no scales {key} for {expected[key].name}")
        unexpected = sorted(set(index) - set(expected))
        if unexpected:
            raise SourceError(f"{name} holds unexpected scales {unexpected[0]} (expected keys "
                              f"{{layer}}_feed_forward.{{w1|w2|w3}}_{shard} for layers 1..{n_layers - 2})")
        for key, tensor in expected.items():
            info = index[key]
            rows = tensor.shape[0]
            if info.dtype != "float32":
                raise SourceError(f"{name}: scales {key} are {info.dtype}, expected float32")
            if tuple(info.shape) not in ((rows,), (rows, 1)):
                raise SourceError(f"{name}: scales {key} have shape {list(info.shape)}, but {tensor.name} has "
                                  f"{rows} rows (expected [{rows}] or [{rows}, 1])")
    return Scales(files=tuple(uris), indexes=tuple(indexes))


def attach_scales(pieces: list, scales: Scales) -> list:
    """Give every float8 read of the plan the byte range of its rows' scales."""
    def with_scale(read):  # noqa: ANN001, ANN202
        if not _FFN.match(read.tensor):
            return read
        key = scale_key(read.tensor, read.file)
        info = scales.indexes[read.file].get(key)
        if info is None:
            return read
        r0, r1 = read.rows
        scale = ScaleRead(file=read.file, key=key, offset=info.offset + 4 * r0, length=4 * (r1 - r0))
        return dataclasses.replace(read, scale=scale)

    out = []
    for piece in pieces:
        reads = tuple(with_scale(r) for r in piece.reads)
        out.append(piece if reads == piece.reads else dataclasses.replace(piece, reads=reads))
    return out
