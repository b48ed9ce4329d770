"""Llama 2, 3, 3.1 and 3.3: the rules and transforms that map their tensors onto MaxText's leaves, their published
sizes and MaxText names, and how their specs read (params.json in :mod:`.llama_spec`).

The tables, top to bottom:

* ``RULES``: one row per target leaf: each source format's name for the tensor (Meta's ``consolidated.NN.pth``
  and Hugging Face's names, transformers' ``convert_llama_weights_to_hf``: same [out, in] orientation, never
  split across files, each kv head once; only the q/k row order differs, ``SOURCE_ROPE_ORDER``), Meta's split
  axis, the transform, whether it is int8-quantized and its contraction axes.
* ``TRANSFORMS``: one row per kind of tensor (E = dim, D = head_dim, M = ffn_dim, V = vocab_size).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rayconv import mapping
from rayconv.mapping import Rule, Transform
from rayconv.models import KnownSize, ModelSpec

#: ``--model_name`` values (the tutorial's spelling) → MaxText model-name prefix.
MODEL_NAMES: dict[str, str] = {
    "llama-2": "llama2",
    "llama-3": "llama3",
    "llama-3.1": "llama3.1",
    "llama-3.3": "llama3.3",
}

#: Families whose Meta .pth q/k weights are reordered (even head_dim indices, then odd) to match
#: MaxText's default half-split rope. llama3.1/3.3 keep Meta's interleaved order: MaxText uses its
#: LLaMA rotary embedding for them (maxtext-format.md §1.4).
ROPE_PERMUTED_FAMILIES = frozenset({"llama-2", "llama-3"})

#: Families whose rope is Llama 3.1's scaled rope (params.json ``use_scaled_rope: true``, config.json
#: ``rope_type: llama3``): MaxText builds llama3.1/3.3 with it, and no other family.
SCALED_ROPE_FAMILIES = frozenset({"llama-3.1", "llama-3.3"})

#: family → published sizes (MaxText ``configs/models/*.yml``; Meta's release layouts).
KNOWN_SIZES: dict[str, tuple[KnownSize, ...]] = {
    "llama-2": (
        KnownSize("7b", 4096, 32, 32, 32),
        KnownSize("13b", 5120, 40, 40, 40),
        KnownSize("70b", 8192, 80, 64, 8),
    ),
    "llama-3": (
        KnownSize("8b", 4096, 32, 32, 8),
        KnownSize("70b", 8192, 80, 64, 8),
    ),
    "llama-3.1": (
        KnownSize("8b", 4096, 32, 32, 8),
        KnownSize("70b", 8192, 80, 64, 8),
        KnownSize("405b", 16384, 126, 128, 8),
    ),
    "llama-3.3": (KnownSize("70b", 8192, 80, 64, 8),),
}

#: transformers' ``model_type`` of a Llama config.json.
HF_MODEL_TYPES = ("llama",)

#: Order of the rows of each q/k head in a source format. Meta stores rope pairs interleaved
#: (d0, d1 rotate together); HF's conversion permuted each head to halves (even indices, then odd),
#: which is also MaxText's default rope layout.
SOURCE_ROPE_ORDER: dict[str, str] = {"meta": "interleaved", "hf": "half"}


def embedding_split_axis(model_name: str) -> int:
    """llama-2 shards tok_embeddings on dim 1 (ParallelEmbedding); llama-3+ on the vocab axis."""
    return 1 if model_name == "llama-2" else 0


def rope_permuted(spec: ModelSpec) -> bool:
    """MaxText wants the q/k head rows half-split for llama-2/-3, Meta's interleaved pairs for llama-3.1/3.3."""
    return spec.family in ROPE_PERMUTED_FAMILIES


def ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward width: int(2/3 · 4·dim), times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# ------------------------------------------------------------------------------------------------
# Transforms: row block of G → block of the per-layer MaxText array, and back


def _rope_orders(spec: ModelSpec) -> tuple[str, str]:
    """(the source's rope order, the one MaxText uses for the family); a permutation, so no value changes."""
    return SOURCE_ROPE_ORDER[mapping.source_format(spec)], "half" if rope_permuted(spec) else "interleaved"


def _reorder(kernel: np.ndarray, have: str, want: str) -> np.ndarray:
    if have == want:
        return kernel
    return mapping.permute_rope(kernel) if want == "half" else mapping.unpermute_rope(kernel)


def rope_order(kernel: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Reorder each head's last axis from the source's rope order to the one MaxText uses for the family."""
    return _reorder(kernel, *_rope_orders(spec))


def rope_unorder(kernel: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """The inverse of :func:`rope_order`: MaxText's order back to the source's."""
    have, want = _rope_orders(spec)
    return _reorder(kernel, want, have)


def _key(block: np.ndarray, spec: ModelSpec) -> np.ndarray:
    return rope_order(mapping.heads_kernel(block, spec.head_dim), spec)


def _key_back(kernel: np.ndarray, spec: ModelSpec) -> np.ndarray:
    return mapping.kernel_rows(rope_unorder(kernel, spec))


def _query(block: np.ndarray, spec: ModelSpec) -> np.ndarray:
    return mapping.scale_query(_key(block, spec), spec.query_scale_divisor)


def _query_back(kernel: np.ndarray, spec: ModelSpec) -> np.ndarray:
    return _key_back(mapping.unscale_query(kernel, spec.head_dim), spec)


def _value(block: np.ndarray, spec: ModelSpec) -> np.ndarray:
    return mapping.heads_kernel(block, spec.head_dim)


def _value_back(kernel: np.ndarray, spec: ModelSpec) -> np.ndarray:
    return mapping.kernel_rows(kernel)


def _out(block: mapping.Block, spec: ModelSpec) -> np.ndarray:
    # G = wo [E, H·D]; out[h, d, e] = wo[e, h·D + d]
    return mapping.transpose(block).reshape(spec.n_heads, spec.head_dim, block.shape[0])


def _out_back(kernel: np.ndarray, spec: ModelSpec) -> np.ndarray:
    return mapping.transpose(np.ascontiguousarray(kernel).reshape(spec.n_heads * spec.head_dim, kernel.shape[2]))


TRANSFORMS: dict[str, Transform] = {t.name: t for t in (
    Transform("embedding", lambda s: (s.vocab_size, s.dim), lambda s: (s.vocab_size, s.dim), mapping.as_is,
              mapping.as_is, row_axis=0),
    Transform("logits", lambda s: (s.vocab_size, s.dim), lambda s: (s.dim, s.vocab_size), mapping.transposed,
              mapping.transposed, row_axis=1, takes_parts=True),
    Transform("query", lambda s: (s.n_heads * s.head_dim, s.dim), lambda s: (s.dim, s.n_heads, s.head_dim), _query,
              _query_back, row_axis=1, per_head=True),
    Transform("key", lambda s: (s.n_kv_heads * s.head_dim, s.dim), lambda s: (s.dim, s.n_kv_heads, s.head_dim),
              _key, _key_back, row_axis=1, per_head=True, kv_heads=True),
    Transform("value", lambda s: (s.n_kv_heads * s.head_dim, s.dim), lambda s: (s.dim, s.n_kv_heads, s.head_dim),
              _value, _value_back, row_axis=1, per_head=True, kv_heads=True),
    Transform("out", lambda s: (s.dim, s.n_heads * s.head_dim), lambda s: (s.n_heads, s.head_dim, s.dim), _out,
              _out_back, row_axis=2, takes_parts=True),
    Transform("wi", lambda s: (s.ffn_dim, s.dim), lambda s: (s.dim, s.ffn_dim), mapping.transposed,
              mapping.transposed, row_axis=1, takes_parts=True),
    Transform("wo", lambda s: (s.dim, s.ffn_dim), lambda s: (s.ffn_dim, s.dim), mapping.transposed,
              mapping.transposed, row_axis=1, takes_parts=True),
    Transform("norm", lambda s: (s.dim,), lambda s: (s.dim,), mapping.as_is, mapping.as_is),
)}


# ------------------------------------------------------------------------------------------------
# Rules: target leaf → each source format's name


ATTN = ("decoder", "layers", "self_attention")
MLP = ("decoder", "layers", "mlp")
_T = TRANSFORMS


def _names(meta: str, hf: str) -> dict[str, str]:
    return {"meta": meta, "hf": hf}


#: The mapping, top to bottom (the order is the plan's rule index). The embedding's split axis depends on the
#: model (``rules``).
RULES: tuple[Rule, ...] = (
    Rule(("token_embedder", "embedding"), _names("tok_embeddings.weight", "model.embed_tokens.weight"), 0,
         _T["embedding"]),
    Rule(ATTN + ("query", "kernel"), _names("layers.{layer}.attention.wq.weight",
                                            "model.layers.{layer}.self_attn.q_proj.weight"), 0, _T["query"], True),
    Rule(ATTN + ("key", "kernel"), _names("layers.{layer}.attention.wk.weight",
                                          "model.layers.{layer}.self_attn.k_proj.weight"), 0, _T["key"], True),
    Rule(ATTN + ("value", "kernel"), _names("layers.{layer}.attention.wv.weight",
                                            "model.layers.{layer}.self_attn.v_proj.weight"), 0, _T["value"], True),
    Rule(ATTN + ("out", "kernel"), _names("layers.{layer}.attention.wo.weight",
                                          "model.layers.{layer}.self_attn.o_proj.weight"), 1, _T["out"], True, (0, 1)),
    Rule(MLP + ("wi_0", "kernel"), _names("layers.{layer}.feed_forward.w1.weight",
                                          "model.layers.{layer}.mlp.gate_proj.weight"), 0, _T["wi"], True),
    Rule(MLP + ("wi_1", "kernel"), _names("layers.{layer}.feed_forward.w3.weight",
                                          "model.layers.{layer}.mlp.up_proj.weight"), 0, _T["wi"], True),
    Rule(MLP + ("wo", "kernel"), _names("layers.{layer}.feed_forward.w2.weight",
                                        "model.layers.{layer}.mlp.down_proj.weight"), 1, _T["wo"], True),
    Rule(("decoder", "layers", "pre_self_attention_layer_norm", "scale"),
         _names("layers.{layer}.attention_norm.weight", "model.layers.{layer}.input_layernorm.weight"), None,
         _T["norm"]),
    Rule(("decoder", "layers", "post_self_attention_layer_norm", "scale"),
         _names("layers.{layer}.ffn_norm.weight", "model.layers.{layer}.post_attention_layernorm.weight"), None,
         _T["norm"]),
    Rule(("decoder", "decoder_norm", "scale"), _names("norm.weight", "model.norm.weight"), None, _T["norm"]),
    Rule(("decoder", "logits_dense", "kernel"), _names("output.weight", "lm_head.weight"), 0, _T["logits"]),
)


def rules(spec: ModelSpec) -> tuple[Rule, ...]:
    """The rules for one model: the embedding's split axis is the model's (a Hugging Face file holds it whole)."""
    axis = embedding_split_axis(spec.family)
    return tuple(dataclasses.replace(r, split=axis) if r.transform is _T["embedding"] else r for r in RULES)
