"""Source → MaxText, the generic part: what a mapping rule is, what a transform is, and the pure kernels.

A *family* (:mod:`rayconv.families`, e.g. ``families/llama.py``) owns its table: one :class:`Rule` per target leaf
(its MaxText path; each source format's name for the tensor, templated with the rule's indices ``{layer}``,
``{expert}``; the source's split axis; its :class:`Transform`; whether it is int8-quantized and its contraction
axes). A transform says everything about one kind of tensor that is not its name: G's shape, the per-layer shape,
the function (``apply``) and its inverse (``invert``), the axis G's rows land on, whether rows come in heads and
whether Meta shards repeat them. Planning, writing and verification read these columns and never branch on names.

Every source tensor is treated as one *global matrix* G, the concatenation of its shards along the
split axis (after kv-head de-duplication). Work is done on row blocks of G, and a row block always
spans G's full width, so:

* a block of a dim-0-split tensor (Llama's wq, wk, wv, w1, w3, output, llama-3 tok_embeddings) lies in one
  shard and is one contiguous byte range of that shard;
* a block of a dim-1-split tensor (wo, w2, llama-2 tok_embeddings) is the same rows of every shard,
  concatenated;
* every block holds whole contraction axes of its output kernel, so int8 per-channel scales are
  computed exactly within the block (wo/w2 contract over the split axis, hence blocks across shards).

``to_layer_block`` turns a block into the matching block of the *per-layer* MaxText array
(``plan.block_region`` says where it lands); the scanned layout is the same region with the layer
axis inserted at position 1. ``from_layer_block`` is its inverse.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Callable, Mapping

import ml_dtypes
import numpy as np

from rayconv.models import ModelSpec

BF16 = np.dtype(ml_dtypes.bfloat16)

Shape = Callable[[ModelSpec], tuple[int, ...]]
Function = Callable[[np.ndarray, ModelSpec], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Transform:
    """Everything about one kind of tensor that is not its name: one row of a family's transform table.

    A new tensor kind (or a layout that shapes one differently) is a new row; planning, writing and
    verification read these columns and never branch on the transform's name.
    """

    name: str
    global_shape: Shape  # G: all shards concatenated, kv heads once
    layer_shape: Shape  # the per-layer MaxText array
    apply: Function  # row block of G → block of the per-layer array
    invert: Function  # block of the per-layer array → the row block of G it came from (MaxText → source)
    row_axis: int | None = None  # axis of the per-layer array that G's rows map to; None = never cut
    per_head: bool = False  # G's rows come in heads of head_dim (cut only between heads; index = row // head_dim)
    kv_heads: bool = False  # Meta shards repeat these heads when n_kv_heads < shards
    takes_parts: bool = False  # ``apply`` takes a :class:`SideBySide` block as it is (it transposes part by part)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of a family's mapping table, keyed by its target leaf.

    ``sources`` names the tensor in each source format, templated with the rule's indices (``{layer}``, and
    ``{expert}`` for a mixture-of-experts family); ``target`` is the leaf's path under the tree's root, where
    ``layers`` stands for the layer stack (``layers_{i}`` unscanned, axis 1 scanned, see rayconv.trees).
    """

    target: tuple[str, ...]
    sources: Mapping[str, str] = dataclasses.field(hash=False)
    split: int | None  # shard split axis of the source tensor; None = replicated (take shard 0)
    transform: Transform
    quantized: bool = False  # an int8-quantized DenseGeneral kernel
    contraction: tuple[int, ...] = (0,)  # kernel axes DenseGeneral contracts (per-layer array)

    @property
    def name(self) -> str:
        """The rule's key: its target leaf."""
        return "/".join(self.target)

    @property
    def indices(self) -> tuple[str, ...]:
        """The named indices of the rule's source names (``layer``, ``expert``), in order of appearance."""
        found: dict[str, None] = {}
        for template in self.sources.values():
            for _, field, _, _ in string.Formatter().parse(template):
                if field:
                    found[field] = None
        return tuple(found)

    @property
    def per_layer(self) -> bool:
        return "layer" in self.indices

    def source_key(self, source: str, layer: int | None = None, **index: int) -> str:
        """The tensor's name in a checkpoint of the given source format, for these index values."""
        template = self.sources[source]
        return template.format(layer=layer, **index) if self.indices else template


#: The per-layer leaf axis a rule's ``{expert}`` index stacks its tensors on (``moe_block/wi_0`` ``[X, E, I]``;
#: scanned ``[X, L, E, I]``): a piece of such a rule holds a range of experts, placed on this axis.
EXPERT_AXIS = 0


def per_expert(rule: Rule) -> bool:
    """Whether the rule's source tensor is one per expert (``{expert}`` in its names)."""
    return "expert" in rule.indices


def source_format(spec: ModelSpec) -> str:
    """The source format a spec was read from ("meta" unless the spec says otherwise, see source/hf.py)."""
    return getattr(spec, "source_format", "meta")


def global_shape(rule: Rule, spec: ModelSpec) -> tuple[int, ...]:
    """Shape of G: the source tensor with all shards concatenated and kv heads de-duplicated."""
    return rule.transform.global_shape(spec)


def layer_shape(rule: Rule, spec: ModelSpec) -> tuple[int, ...]:
    """Shape of the MaxText array for one layer (the unscanned leaf)."""
    return rule.transform.layer_shape(spec)


def row_quantum(rule: Rule, spec: ModelSpec) -> int:
    """Row blocks of G must be multiples of this (whole heads for q/k/v, so chunks hold whole heads)."""
    return spec.head_dim if rule.transform.per_head else 1


def repeats_kv(rule: Rule) -> bool:
    """Whether shards repeat this tensor's heads when kv heads < shards (Meta's wk/wv)."""
    return rule.transform.kv_heads


def shard_shape(rule: Rule, spec: ModelSpec) -> tuple[int, ...]:
    """Shape of the tensor as stored in each shard (each consolidated.NN.pth; the whole tensor for one shard)."""
    shape = list(global_shape(rule, spec))
    if rule.split is None:
        return tuple(shape)
    if repeats_kv(rule):
        shape[0] = max(spec.n_kv_heads // spec.n_shards, 1) * spec.head_dim
        return tuple(shape)
    shape[rule.split] //= spec.n_shards
    return tuple(shape)


def source_shards(rule: Rule, spec: ModelSpec) -> int:
    """How many distinct shards make up G (fewer than n_shards when kv heads are repeated)."""
    if rule.split is None:
        return 1
    if repeats_kv(rule):
        return spec.n_shards // spec.kv_step
    return spec.n_shards


@dataclasses.dataclass(frozen=True)
class SideBySide:
    """A row block of G held as the same rows of each shard, not concatenated: ``parts[i]`` is shard i's columns.

    A dim-1-split tensor's block (wo, w2) is read shard by shard, each range straight into its own slot; the
    transposing transforms put each slot's columns where they land (rows of the output), so the block is never
    concatenated. Other transforms call :meth:`assemble`.
    """

    parts: np.ndarray  # [shards, rows, columns per shard]

    @property
    def shape(self) -> tuple[int, int]:
        n, rows, width = self.parts.shape
        return rows, n * width

    @property
    def dtype(self) -> np.dtype:
        return self.parts.dtype

    def assemble(self) -> np.ndarray:
        """The block as one C-contiguous [rows, all columns] array."""
        return np.ascontiguousarray(self.parts.transpose(1, 0, 2)).reshape(self.shape)


Block = np.ndarray | SideBySide

#: Transpose tile, and the padding of its staging buffer's rows (see ``transpose``).
TILE, TILE_PAD = 128, 24


def _bits(array: np.ndarray) -> np.ndarray:
    """bf16 as uint16: numpy then copies plain words instead of calling ml_dtypes' element functions."""
    return array.view(np.uint16) if array.dtype == BF16 else array


def transpose(block: Block, out: np.ndarray | None = None) -> np.ndarray:
    """C-contiguous transpose of a 2-D block (``out``, if given, receives it), tile by tile through a small buffer.

    numpy copies a transposed tile by walking each source column at the row stride. Rows of 2048 or 4096 bf16
    are a multiple of 4 KiB apart, so a tile column's cache lines all map to one L1 set and evict each other:
    ~4x slower than the copy needs to be. Each tile is therefore first copied row by row (contiguous runs) into
    a buffer whose rows are ``TILE + TILE_PAD`` words apart, and transposed from there, in L1. A
    :class:`SideBySide` block is transposed part by part: part i's columns are rows i·width.. of the result.
    """
    parts = block.parts if isinstance(block, SideBySide) else block[None]
    n, rows, width = parts.shape
    if out is None:
        out = np.empty((n * width, rows), dtype=parts.dtype)
    src, dst = _bits(parts), _bits(out)
    buffer = np.empty((TILE, TILE + TILE_PAD), dtype=src.dtype)
    for i in range(n):
        for r in range(0, rows, TILE):
            nr = min(TILE, rows - r)
            for c in range(0, width, TILE):
                nc = min(TILE, width - c)
                tile = buffer[:nr, :nc]
                tile[...] = src[i, r:r + nr, c:c + nc]
                dst[i * width + c:i * width + c + nc, r:r + nr] = tile.T
    return out


def permute_rope(kernel: np.ndarray) -> np.ndarray:
    """Meta's interleaved rope pairs → MaxText's half-split layout: even head_dim indices, then odd."""
    return np.concatenate((kernel[..., 0::2], kernel[..., 1::2]), axis=-1)


def unpermute_rope(kernel: np.ndarray) -> np.ndarray:
    """The inverse of :func:`permute_rope`: half-split (HF) → interleaved pairs (Meta, MaxText's llama3.1)."""
    d = kernel.shape[-1]
    return np.ascontiguousarray(kernel.reshape(kernel.shape[:-1] + (2, d // 2)).swapaxes(-1, -2)).reshape(
        kernel.shape)


def scale_query(kernel: np.ndarray, divisor: float) -> np.ndarray:
    """bf16(float32(w) / float32(bf16(sqrt(head_dim)))), as llama_or_mistral_ckpt computes it."""
    from rayconv.quantize import bf16_bits_to_f32, round_to_bf16, slab_rows

    out = np.empty(kernel.shape, dtype=BF16)
    words, result = _bits(kernel), out.view(np.uint16)
    rows = slab_rows(kernel.shape)
    work, spare = (np.empty((rows,) + kernel.shape[1:], dtype=np.uint32) for _ in range(2))
    for r in range(0, kernel.shape[0], rows):  # in cache-sized slabs, on bit patterns, like quantize()
        n = min(rows, kernel.shape[0] - r)
        value = bf16_bits_to_f32(words[r:r + n], work[:n])
        np.divide(value, np.float32(divisor), out=value)
        round_to_bf16(work[:n], spare[:n])
        np.right_shift(work[:n], np.uint32(16), out=work[:n])
        np.copyto(result[r:r + n], work[:n], casting="unsafe")
    return out


def unscale_query(kernel: np.ndarray, head_dim: int) -> np.ndarray:
    """bf16(float32(w) · float32(sqrt(head_dim))): MaxText's to-Hugging-Face ``scale_query_layer`` (LLAMA31 hook).

    The inverse of :func:`scale_query` where sqrt(head_dim) is a power of two (head_dim 16, 64, 256: both
    scalings are exact); otherwise (head_dim 128) it multiplies by the unrounded root while the forward divided by
    its bf16 rounding, as MaxText's two directions do, so a value may come back one bf16 step off. A float32 kernel
    (an export with ``weight_dtype=float32``) stays float32.
    """
    scale = np.float32(math.sqrt(head_dim))
    scaled = np.asarray(kernel, dtype=np.float32) * scale
    return scaled if kernel.dtype == np.float32 else scaled.astype(BF16)


def heads_kernel(block: np.ndarray, head_dim: int) -> np.ndarray:
    """G rows = (head, head_dim) → kernel [E, heads, D] (transposed and split into heads)."""
    return transpose(block).reshape(block.shape[1], block.shape[0] // head_dim, head_dim)


def kernel_rows(kernel: np.ndarray) -> np.ndarray:
    """The inverse of :func:`heads_kernel`: [E, heads, D] → G rows [heads·D, E]."""
    return transpose(np.ascontiguousarray(kernel).reshape(kernel.shape[0], -1))


def as_is(block: np.ndarray, spec: ModelSpec) -> np.ndarray:
    return block


def transposed(block: Block, spec: ModelSpec) -> np.ndarray:
    """wi: G = w1 [M, E] → [E, M]; wo: G = w2 [E, M] → [M, E]; logits: G = output [V, E] → [E, V] (and back)."""
    return transpose(block)


def to_layer_block(rule: Rule, block: Block, spec: ModelSpec) -> np.ndarray:
    """A row block of G (or its shards' rows side by side) → the matching block of the per-layer MaxText array."""
    if block.dtype != BF16:
        raise ValueError(f"{rule.name}: expected bfloat16, got {block.dtype}")
    if isinstance(block, SideBySide) and not rule.transform.takes_parts:
        block = block.assemble()
    return rule.transform.apply(block, spec)


def from_layer_block(rule: Rule, block: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """The inverse of :func:`to_layer_block`: a block of the per-layer array → the row block of G (source order)."""
    return rule.transform.invert(block, spec)


def scanned_shape(shape: tuple[int, ...], n_layers: int) -> tuple[int, ...]:
    return shape[:1] + (n_layers,) + shape[1:]
