"""Source → MaxText: where each tensor goes and how it is changed, as two tables and small pure functions.

* ``RULES``: one row per tensor — its Meta name (other formats' names in ``SOURCE_KEYS``), its MaxText leaf,
  the source's split axis, its transform, whether it is int8-quantized and its contraction axes.
* ``TRANSFORMS``: one row per transform — G's shape, the per-layer MaxText shape, the function, the axis G's
  rows land on, whether rows come in heads, whether Meta shards repeat its kv heads.

A new source adds a ``SOURCE_KEYS`` column; a new tensor adds rows; nothing downstream branches on names.

Every Meta tensor is treated as one *global matrix* G, the concatenation of its shards along the
split axis (after kv-head de-duplication). Work is done on row blocks of G, and a row block always
spans G's full width, so:

* a block of a dim-0-split tensor (wq, wk, wv, w1, w3, output, llama-3 tok_embeddings) lies in one
  shard and is one contiguous byte range of that shard;
* a block of a dim-1-split tensor (wo, w2, llama-2 tok_embeddings) is the same rows of every shard,
  concatenated;
* every block holds whole contraction axes of its output kernel, so int8 per-channel scales are
  computed exactly within the block (wo/w2 contract over the split axis, hence blocks across shards).

``to_layer_block`` turns a block into the matching block of the *per-layer* MaxText array
(``plan.block_region`` says where it lands); the scanned layout is the same region with the layer
axis inserted at position 1.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import ml_dtypes
import numpy as np

from rayconv.models import ModelSpec

BF16 = np.dtype(ml_dtypes.bfloat16)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of the mapping table."""

    meta: str  # Meta key; "{}" is the layer index
    target: tuple[str, ...]  # path under params/params/decoder (or top level), "layers" for per-layer
    split: int | None  # shard split axis of the Meta tensor; None = replicated (take shard 0)
    transform: str  # name in TRANSFORMS
    quantized: bool = False  # an int8-quantized DenseGeneral kernel
    contraction: tuple[int, ...] = (0,)  # kernel axes DenseGeneral contracts (per-layer array)

    @property
    def per_layer(self) -> bool:
        return "{}" in self.meta

    def key(self, layer: int | None) -> str:
        return self.meta.format(layer) if self.per_layer else self.meta

    def source_key(self, layer: int | None, source: str = "meta") -> str:
        """The tensor's name in a checkpoint of the given source format (``SOURCE_KEYS``)."""
        template = self.meta if source == "meta" else SOURCE_KEYS[source][self.meta]
        return template.format(layer) if self.per_layer else template


ATTN = ("decoder", "layers", "self_attention")
MLP = ("decoder", "layers", "mlp")

#: The mapping, top to bottom. Embedding split axis depends on the family (see ``rules``).
RULES: tuple[Rule, ...] = (
    Rule("tok_embeddings.weight", ("token_embedder", "embedding"), 0, "embedding"),
    Rule("layers.{}.attention.wq.weight", ATTN + ("query", "kernel"), 0, "query", True),
    Rule("layers.{}.attention.wk.weight", ATTN + ("key", "kernel"), 0, "key", True),
    Rule("layers.{}.attention.wv.weight", ATTN + ("value", "kernel"), 0, "value", True),
    Rule("layers.{}.attention.wo.weight", ATTN + ("out", "kernel"), 1, "out", True, (0, 1)),
    Rule("layers.{}.feed_forward.w1.weight", MLP + ("wi_0", "kernel"), 0, "wi", True),
    Rule("layers.{}.feed_forward.w3.weight", MLP + ("wi_1", "kernel"), 0, "wi", True),
    Rule("layers.{}.feed_forward.w2.weight", MLP + ("wo", "kernel"), 1, "wo", True),
    Rule("layers.{}.attention_norm.weight", ("decoder", "layers", "pre_self_attention_layer_norm", "scale"), None,
         "norm"),
    Rule("layers.{}.ffn_norm.weight", ("decoder", "layers", "post_self_attention_layer_norm", "scale"), None, "norm"),
    Rule("norm.weight", ("decoder", "decoder_norm", "scale"), None, "norm"),
    Rule("output.weight", ("decoder", "logits_dense", "kernel"), 0, "logits"),
)


#: The key column of other source formats: Meta key template → that format's name for the same tensor.
#: Hugging Face's Llama names (transformers' ``convert_llama_weights_to_hf``): same [out, in] orientation,
#: never split across files, each kv head once; only the q/k row order differs (``SOURCE_ROPE_ORDER``).
SOURCE_KEYS: dict[str, dict[str, str]] = {
    "hf": {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
        "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
        "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
        "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
        "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
        "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
        "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
        "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
        "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    },
}

#: Order of the rows of each q/k head in a source format. Meta stores rope pairs interleaved
#: (d0, d1 rotate together); HF's conversion permuted each head to halves (even indices, then odd),
#: which is also MaxText's default rope layout.
SOURCE_ROPE_ORDER: dict[str, str] = {"meta": "interleaved", "hf": "half"}


def source_format(spec: ModelSpec) -> str:
    """The source format a spec was read from ("meta" unless the spec says otherwise, see source/hf.py)."""
    return getattr(spec, "source_format", "meta")


def rules(spec: ModelSpec) -> tuple[Rule, ...]:
    return tuple(
        dataclasses.replace(r, split=spec.embedding_split_axis) if r.transform == "embedding" else r for r in RULES
    )


def global_shape(rule: Rule, spec: ModelSpec) -> tuple[int, ...]:
    """Shape of G: the Meta tensor with all shards concatenated and kv heads de-duplicated."""
    return TRANSFORMS[rule.transform].global_shape(spec)


def layer_shape(rule: Rule, spec: ModelSpec) -> tuple[int, ...]:
    """Shape of the MaxText array for one layer (the unscanned leaf)."""
    return TRANSFORMS[rule.transform].layer_shape(spec)


def row_quantum(rule: Rule, spec: ModelSpec) -> int:
    """Row blocks of G must be multiples of this (whole heads for q/k/v, so chunks hold whole heads)."""
    return spec.head_dim if TRANSFORMS[rule.transform].per_head else 1


def repeats_kv(rule: Rule) -> bool:
    """Whether shards repeat this tensor's heads when kv heads < shards (Meta's wk/wv)."""
    return TRANSFORMS[rule.transform].kv_heads


def shard_shape(rule: Rule, spec: ModelSpec) -> tuple[int, ...]:
    """Shape of the tensor as stored in each consolidated.NN.pth."""
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


def rope_order(kernel: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Reorder each head's last axis from the source's rope order to the one MaxText uses for the family.

    MaxText wants half-split for llama-2/-3 (``rope_permuted``) and Meta's interleaved pairs for
    llama-3.1/3.3; a permutation, so no value changes.
    """
    have = SOURCE_ROPE_ORDER[source_format(spec)]
    want = "half" if spec.rope_permuted else "interleaved"
    if have == want:
        return kernel
    return permute_rope(kernel) if want == "half" else unpermute_rope(kernel)


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


def _heads(block: np.ndarray, spec: ModelSpec, *, rope: bool) -> np.ndarray:
    """G rows = (head, head_dim) → kernel [E, heads, D]; q/k (``rope``) in MaxText's rope order."""
    kernel = transpose(block).reshape(block.shape[1], block.shape[0] // spec.head_dim, spec.head_dim)
    return rope_order(kernel, spec) if rope else kernel


def _query(block: np.ndarray, spec: ModelSpec) -> np.ndarray:
    return scale_query(_heads(block, spec, rope=True), spec.query_scale_divisor)


def _key(block: np.ndarray, spec: ModelSpec) -> np.ndarray:
    return _heads(block, spec, rope=True)


def _value(block: np.ndarray, spec: ModelSpec) -> np.ndarray:
    return _heads(block, spec, rope=False)


def _out(block: np.ndarray, spec: ModelSpec) -> np.ndarray:
    # G = wo [E, H·D]; out[h, d, e] = wo[e, h·D + d]
    return transpose(block).reshape(spec.n_heads, spec.head_dim, block.shape[0])


def _transposed(block: np.ndarray, spec: ModelSpec) -> np.ndarray:
    # wi: G = w1 [M, E] → [E, M]; wo: G = w2 [E, M] → [M, E]; logits: G = output [V, E] → [E, V]
    return transpose(block)


def _as_is(block: np.ndarray, spec: ModelSpec) -> np.ndarray:
    return block


Shape = Callable[[ModelSpec], tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class Transform:
    """Everything about one kind of tensor that is not its name: one row of the transform table.

    A new tensor kind (or a layout that shapes one differently) is a new row here; planning, writing and
    verification read these columns and never branch on the transform's name.
    """

    global_shape: Shape  # G: all shards concatenated, kv heads once
    layer_shape: Shape  # the per-layer MaxText array
    apply: Callable[[np.ndarray, ModelSpec], np.ndarray]  # row block of G → block of the per-layer array
    row_axis: int | None = None  # axis of the per-layer array that G's rows map to; None = never cut
    per_head: bool = False  # G's rows come in heads of head_dim (cut only between heads; index = row // head_dim)
    kv_heads: bool = False  # Meta shards repeat these heads when n_kv_heads < shards


#: Transform name (``Rule.transform``) → its row. E = dim, D = head_dim, M = ffn_dim, V = vocab_size.
TRANSFORMS: dict[str, Transform] = {
    "embedding": Transform(lambda s: (s.vocab_size, s.dim), lambda s: (s.vocab_size, s.dim), _as_is, row_axis=0),
    "logits": Transform(lambda s: (s.vocab_size, s.dim), lambda s: (s.dim, s.vocab_size), _transposed, row_axis=1),
    "query": Transform(lambda s: (s.n_heads * s.head_dim, s.dim), lambda s: (s.dim, s.n_heads, s.head_dim), _query,
                       row_axis=1, per_head=True),
    "key": Transform(lambda s: (s.n_kv_heads * s.head_dim, s.dim), lambda s: (s.dim, s.n_kv_heads, s.head_dim), _key,
                     row_axis=1, per_head=True, kv_heads=True),
    "value": Transform(lambda s: (s.n_kv_heads * s.head_dim, s.dim), lambda s: (s.dim, s.n_kv_heads, s.head_dim),
                       _value, row_axis=1, per_head=True, kv_heads=True),
    "out": Transform(lambda s: (s.dim, s.n_heads * s.head_dim), lambda s: (s.n_heads, s.head_dim, s.dim), _out,
                     row_axis=2),
    "wi": Transform(lambda s: (s.ffn_dim, s.dim), lambda s: (s.dim, s.ffn_dim), _transposed, row_axis=1),
    "wo": Transform(lambda s: (s.dim, s.ffn_dim), lambda s: (s.ffn_dim, s.dim), _transposed, row_axis=1),
    "norm": Transform(lambda s: (s.dim,), lambda s: (s.dim,), _as_is),
}


#: Transforms whose ``apply`` takes a :class:`SideBySide` block as it is (they transpose it part by part).
TAKES_PARTS = frozenset({_out, _transposed})


def to_layer_block(rule: Rule, block: Block, spec: ModelSpec) -> np.ndarray:
    """A row block of G (or its shards' rows side by side) → the matching block of the per-layer MaxText array."""
    if block.dtype != BF16:
        raise ValueError(f"{rule.meta}: expected bfloat16, got {block.dtype}")
    apply = TRANSFORMS[rule.transform].apply
    if isinstance(block, SideBySide) and apply not in TAKES_PARTS:
        block = block.assemble()
    return apply(block, spec)


def scanned_shape(shape: tuple[int, ...], n_layers: int) -> tuple[int, ...]:
    return shape[:1] + (n_layers,) + shape[1:]
