"""Qwen3, dense and MoE (``Qwen3ForCausalLM``, ``Qwen3MoeForCausalLM``) → MaxText, as data: rules, transforms, sizes.

What MaxText 0.2.5's ``checkpoint_conversion/to_maxtext.py`` does to each tensor (``param_mapping.py``'s
``QWEN_MAXTEXT_TO_HF_PARAM_MAPPING`` and ``…_HOOK_FN``, confirmed leaf by leaf, bit for bit, on its output for
transformers-written checkpoints: tests/test_qwen3_mapping.py, docs/qwen3.md):

* kernels are the HF matrix transposed, then reshaped into heads (q/k/v ``[E, heads, D]``, out ``[heads, D, E]``);
  no rope permutation (HF's Qwen3 and MaxText both rotate half-split pairs) and no query scaling (unlike Llama);
* norms, QK-norm scales and the embedding are copied as they are (the embedding would be zero-padded to MaxText's
  vocabulary: never needed, the spec takes MaxText's vocab from config.json);
* the router ``mlp.gate.weight`` ``[X, E]`` is an ordinary kernel ``[E, X]``; expert ``e``'s
  ``gate_proj``/``up_proj``/``down_proj`` is transposed into slot ``e`` of ``moe_block/wi_0|wi_1|wo``
  (``[X, E, I]``, ``[X, I, E]``): the expert axis is the leaf's first, the scanned layer axis its second, as for
  every other leaf (``[X, L, E, I]``).

Rules are keyed by the target leaf, with named indices ``{layer}`` and ``{expert}`` in each source format's name.
A transform's ``apply`` maps a row block of one source tensor (for an expert rule: the same rows of a range of
experts, stacked ``[experts, rows, cols]``) to the matching block of the per-layer leaf; ``invert`` maps it back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from rayconv import mapping
from rayconv.errors import SpecError
from rayconv.mapping import Rule, Transform
from rayconv.models import (MAX_DIM, MAX_FFN_DIM, MAX_HEADS, MAX_LAYERS, MAX_NORM_EPS, MAX_ROPE_THETA, MAX_VOCAB,
                            KnownSize, float_field, int_field)

NAME = "qwen3"
#: ``--model_name`` (``spec.family``, the string in plan.json) → MaxText model-name prefix (the Family seam's).
MODEL_NAMES = {NAME: "qwen3"}
#: config.json ``model_type`` → whether the model is MoE.
MODEL_TYPES = {"qwen3": False, "qwen3_moe": True}
HF_MODEL_TYPES = tuple(MODEL_TYPES)
ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
#: The tree layout written by default (rayconv.trees.TO_MAXTEXT): what MaxText 0.2.5's to_maxtext.py writes for Qwen3.
DEFAULT_LAYOUT = "to_maxtext"
#: Why there is no int8 Qwen3 (Family.no_quantized_output): to_maxtext.py writes bf16 only, and MaxText 0.2.5's
#: layerwise_quantization.py says "Currently, it supports DeepSeek-family models only" — nothing to be equal to.
NO_QUANTIZED_OUTPUT = ("MaxText 0.2.5 writes no quantized Qwen3 checkpoint (to_maxtext.py writes bf16; "
                       "layerwise_quantization supports DeepSeek models only): convert without --quantize_type")
#: Far above the largest published Qwen3 MoE (Qwen3-Coder-480B: 160 experts); MaxText's mapping needs ≥ 2.
MAX_EXPERTS = 1 << 12


@dataclasses.dataclass(frozen=True)
class Qwen3Spec:
    """One Qwen3 checkpoint's dimensions, as config.json gives them (field names as rayconv's ``ModelSpec``).

    ``n_experts == 0``: dense (``mlp/wi_0…``); else every layer is an MoE block (``moe_block/…``), as in MaxText.
    """

    maxtext_name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    tie_embeddings: bool
    norm_eps: float
    rope_theta: float
    n_experts: int = 0
    experts_per_token: int = 0
    moe_ffn_dim: int = 0
    family: str = NAME
    n_shards: int = 1
    source_format: str = "hf"

    @property
    def moe(self) -> bool:
        return self.n_experts > 0

    @property
    def mlp_summary(self) -> str:
        """The feed-forward shape as the convert log prints it: an MoE model's experts, not its unused dense width."""
        if self.moe:
            return f"{self.n_experts} experts of {self.moe_ffn_dim}, {self.experts_per_token} per token"
        return f"ffn {self.ffn_dim}"

    @property
    def params_kv_heads(self) -> int:
        """``ModelSpec``'s field for Meta's params.json kv heads (the convert log compares it): no params.json here."""
        return self.n_kv_heads

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Qwen3Spec":
        return cls(**data)


# ------------------------------------------------------------------------------------------------ sizes


@dataclasses.dataclass(frozen=True)
class Size:
    """A MaxText Qwen3 model (``configs/models/<name>.yml``, HF config ``HF_MODEL_CONFIGS[name]``)."""

    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int  # MaxText's base_mlp_dim (dense) / base_moe_mlp_dim (MoE)
    tie: bool
    rope_theta: float
    n_experts: int = 0


#: Every MaxText 0.2.5 Qwen3 text model: head_dim 128, vocab 151936, top-8 routing for the MoE ones. Identical
#: dims under two names (``-base``) convert identically; the first is named. Qwen3-30B-A3B's two releases differ
#: only in rope_theta, which picks the name.
SIZES: tuple[Size, ...] = (
    Size("qwen3-0.6b", 1024, 28, 16, 8, 3072, True, 1e6),
    Size("qwen3-1.7b", 2048, 28, 16, 8, 6144, True, 1e6),
    Size("qwen3-4b", 2560, 36, 32, 8, 9728, True, 1e6),
    Size("qwen3-4b-thinking-2507", 2560, 36, 32, 8, 9728, True, 5e6),
    Size("qwen3-8b", 4096, 36, 32, 8, 12288, False, 1e6),
    Size("qwen3-14b", 5120, 40, 40, 8, 17408, False, 1e6),
    Size("qwen3-32b", 5120, 64, 64, 8, 25600, False, 1e6),
    Size("qwen3-30b-a3b", 2048, 48, 32, 4, 768, False, 1e7, 128),
    Size("qwen3-30b-a3b-base", 2048, 48, 32, 4, 768, False, 1e6, 128),
    Size("qwen3-235b-a22b", 4096, 94, 64, 4, 1536, False, 5e6, 128),
    Size("qwen3-480b-a35b", 6144, 62, 96, 8, 2560, False, 1e7, 160),
)

#: The family seam's view (``Family.known_sizes``): model name → (size, dim, layers, heads, kv heads).
KNOWN_SIZES: dict[str, tuple[KnownSize, ...]] = {
    NAME: tuple(KnownSize(k.name.removeprefix("qwen3-"), k.dim, k.n_layers, k.n_heads, k.n_kv_heads) for k in SIZES)}

#: For dims no MaxText model has: the model whose other settings (tied logits, the MoE decoder) MaxText applies,
#: i.e. the name to load it under with the dims as overrides (and what to_maxtext.py is run with in the tests).
SETTINGS_NAMES = {(False, True): "qwen3-0.6b", (False, False): "qwen3-8b", (True, False): "qwen3-30b-a3b"}


def known_size(spec: Qwen3Spec) -> Size | None:
    """The MaxText model with exactly these dims (and rope_theta), if any."""
    mlp = spec.moe_ffn_dim if spec.moe else spec.ffn_dim
    return next((k for k in SIZES
                 if (k.dim, k.n_layers, k.n_heads, k.n_kv_heads, k.ffn_dim, k.tie, k.n_experts)
                 == (spec.dim, spec.n_layers, spec.n_heads, spec.n_kv_heads, mlp, spec.tie_embeddings, spec.n_experts)
                 and k.rope_theta == spec.rope_theta and spec.head_dim == 128 and spec.vocab_size == 151936
                 and spec.experts_per_token in (0, 8)), None)


#: Other names of a MaxText size (the Hub's Qwen3-Coder is MaxText's ``qwen3-480b-a35b``).
ALIASES = {"qwen3-coder-480b-a35b": "qwen3-480b-a35b"}


def published_config(name: str | None) -> dict[str, Any] | None:
    """The config.json of a published Qwen3 (``qwen3-235b-a22b``, ``Qwen/Qwen3-235B-A22B``, ``qwen3-coder-480b-a35b``),
    from MaxText's dims: what ``rayconv plan --simulate`` plans; None for a name that is no Qwen3 size."""
    key = (name or "").rsplit("/", 1)[-1].lower().removesuffix("-instruct")
    size = next((k for k in SIZES if k.name == ALIASES.get(key, key)), None)
    if size is None:
        return None
    moe = size.n_experts > 0
    config: dict[str, Any] = {
        "model_type": "qwen3_moe" if moe else "qwen3", "hidden_size": size.dim, "num_hidden_layers": size.n_layers,
        "num_attention_heads": size.n_heads, "num_key_value_heads": size.n_kv_heads, "head_dim": 128,
        "vocab_size": 151936, "tie_word_embeddings": size.tie, "rope_theta": size.rope_theta, "rms_norm_eps": 1e-6}
    if moe:
        config.update(num_experts=size.n_experts, num_experts_per_tok=8, moe_intermediate_size=size.ffn_dim,
                      norm_topk_prob=True, intermediate_size=size.ffn_dim * 8)
    else:
        config["intermediate_size"] = size.ffn_dim
    return config


# ------------------------------------------------------------------------------------------------ spec


def _refuse_if(condition: bool, message: str) -> None:
    if condition:
        raise SpecError(message)


def embedding_split_axis(model_name: str) -> int:
    """The Family seam's (Meta shards only): Qwen3 comes as HF files, whose embedding is whole."""
    return 0


def spec_from_params(params: Mapping[str, Any], **_: Any) -> Qwen3Spec:
    """The Family seam's params.json reader: Qwen3 has no Meta-format release."""
    raise SpecError("Qwen3 is converted from Hugging Face files (config.json + *.safetensors), not params.json")


def spec_from_config(config: Mapping[str, Any], *, model_name: str | None = None, model_path: str | None = None,
                     kv_heads: int | None = None, source: str = "config.json") -> Qwen3Spec:
    """The spec of a Qwen3 / Qwen3-MoE ``config.json``; anything that changes the weights and that MaxText's Qwen3
    models cannot hold is refused in one line (:class:`SpecError`). ``model_name`` may only say ``qwen3``;
    ``model_path`` (a Hub repo id or Meta descriptor) names nothing config.json does not, and is not used."""
    _refuse_if(model_name not in (None, NAME), f"--model_name {model_name} disagrees with {source} "
               f"(model_type {str(config.get('model_type'))[:40]!r}: {NAME})")
    model_type = config.get("model_type")
    _refuse_if(model_type not in MODEL_TYPES, f"{source}: model_type {str(model_type)[:40]!r} is not a Qwen3 model "
               f"({' or '.join(MODEL_TYPES)})")
    moe = MODEL_TYPES[model_type]
    archs = config.get("architectures")
    _refuse_if(archs is not None and archs != [ARCHITECTURES[model_type]],
               f"{source}: architectures {str(archs)[:60]} is not [{ARCHITECTURES[model_type]!r}]")
    quantization = config.get("quantization_config")
    if quantization is not None:  # e.g. Qwen/Qwen3-8B-FP8 (fp8 blocks with weight_scale_inv tensors)
        method = quantization.get("quant_method") if isinstance(quantization, Mapping) else quantization
        raise SpecError(f"{source}: quantization_config {str(method)[:40]!r} (a quantized variant such as the -FP8 "
                        "repos) is not supported; convert the bf16 repository")
    for flag, why in (("attention_bias", "Qwen3 has no q/k/v biases (MaxText's qwen3 attention has none)"),
                      ("use_sliding_window", "MaxText's Qwen3 models have no sliding-window attention")):
        _refuse_if(bool(config.get(flag)), f"{source}: {flag} is set; {why}")
    tie = config.get("tie_word_embeddings", False)
    _refuse_if(not isinstance(tie, bool), f"{source}: tie_word_embeddings is {str(tie)[:20]!r}, expected true or false")
    _refuse_if(tie and moe, f"{source}: tie_word_embeddings with qwen3_moe: MaxText's Qwen3 MoE models all have "
               "their own logits kernel")
    dim = int_field(config, "hidden_size", source, low=1, high=MAX_DIM)
    n_layers = int_field(config, "num_hidden_layers", source, low=1, high=MAX_LAYERS)
    n_heads = int_field(config, "num_attention_heads", source, low=1, high=MAX_HEADS)
    n_kv = int_field(config, "num_key_value_heads", source, low=1, high=n_heads, default=n_heads)
    _refuse_if(kv_heads is not None and kv_heads != n_kv,
               f"--num_kv_heads {kv_heads} disagrees with {source} (num_key_value_heads {n_kv})")
    _refuse_if(n_heads % n_kv != 0,
               f"{source}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    # transformers' Qwen3: head_dim defaults to hidden/heads; any value is legal (MaxText's head_dim is its own key).
    head_dim = int_field(config, "head_dim", source, low=1, high=MAX_DIM, default=dim // n_heads)
    _refuse_if(head_dim == 0, f"{source}: hidden_size {dim} < num_attention_heads {n_heads} and no head_dim")
    vocab = int_field(config, "vocab_size", source, low=1, high=MAX_VOCAB)
    ffn = int_field(config, "intermediate_size", source, low=1, high=MAX_FFN_DIM, default=0 if moe else ...)
    theta = dict(high=MAX_ROPE_THETA, null=False)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}  # transformers 5 / 4
    _refuse_if(not isinstance(rope, Mapping), f"{source}: rope parameters {str(rope)[:40]!r} are not an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _refuse_if(rope_type != "default", f"{source}: rope type {str(rope_type)[:40]!r} (e.g. YaRN) is not MaxText's "
               "Qwen3 rope; convert the checkpoint without rope scaling")
    rope_theta = float_field(config, "rope_theta", source,
                             float_field(rope, "rope_theta", f"{source}: rope parameters", 10000.0, **theta), **theta)
    norm_eps = float_field(config, "rms_norm_eps", source, 1e-6, high=MAX_NORM_EPS, null=False)
    experts = top_k = moe_ffn = 0
    if moe:
        # transformers ≥ 5 writes num_local_experts; the Hub's files say num_experts.
        key = "num_experts" if config.get("num_experts") is not None else "num_local_experts"
        experts = int_field(config, key, source, low=2, high=MAX_EXPERTS)
        top_k = int_field(config, "num_experts_per_tok", source, low=1, high=experts)
        moe_ffn = int_field(config, "moe_intermediate_size", source, low=1, high=MAX_FFN_DIM)
        _refuse_if(config.get("norm_topk_prob", False) is not True,
                   f"{source}: norm_topk_prob is {config.get('norm_topk_prob')!r}; every MaxText Qwen3 MoE model "
                   "renormalises the top-k router weights (norm_topk_prob: true), so this model would load as another")
        step = int_field(config, "decoder_sparse_step", source, low=1, high=MAX_LAYERS, default=1)
        _refuse_if(step != 1, f"{source}: decoder_sparse_step {step}: MaxText's Qwen3 MoE decoder makes every layer "
                   "an MoE layer (decoder_sparse_step 1)")
        dense_layers = config.get("mlp_only_layers") or []
        _refuse_if(dense_layers != [], f"{source}: mlp_only_layers {str(dense_layers)[:40]}: MaxText's Qwen3 MoE "
                   "decoder has no dense layers")
    spec = Qwen3Spec(maxtext_name="", dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                     head_dim=head_dim, ffn_dim=ffn, vocab_size=vocab, tie_embeddings=tie, norm_eps=norm_eps,
                     rope_theta=rope_theta, n_experts=experts, experts_per_token=top_k, moe_ffn_dim=moe_ffn)
    known = known_size(spec)
    name = known.name if known else SETTINGS_NAMES[(moe, tie)]
    return dataclasses.replace(spec, maxtext_name=name)


# ------------------------------------------------------------------------------------------------ transforms
# Row block of one source tensor (an expert rule: the same rows of a range of experts) → its block of the per-layer
# leaf, and back. ``mapping.Transform``'s ``global_shape`` is one source tensor (one expert's); an expert rule's
# ``layer_shape`` has the expert axis first (:data:`EXPERT_AXIS`) and ``row_axis`` counts it.

#: The per-layer leaf axis ``{expert}`` indexes (``moe_block/wi_0`` ``[X, E, I]``; scanned ``[X, L, E, I]``).
EXPERT_AXIS = mapping.EXPERT_AXIS


def _heads(block: np.ndarray, spec: Qwen3Spec) -> np.ndarray:
    return mapping.heads_kernel(block, spec.head_dim)  # [heads·D, E] → [E, heads, D]; no rope permutation


def _unheads(kernel: np.ndarray, spec: Qwen3Spec) -> np.ndarray:
    return mapping.kernel_rows(kernel)


def _out(block: mapping.Block, spec: Qwen3Spec) -> np.ndarray:
    # o_proj [E rows, H·D] → [H, D, E rows]
    return mapping.transpose(block).reshape(spec.n_heads, spec.head_dim, block.shape[0])


def _unout(kernel: np.ndarray, spec: Qwen3Spec) -> np.ndarray:
    return mapping.transpose(np.ascontiguousarray(kernel).reshape(-1, kernel.shape[-1]))


def _experts_t(block: np.ndarray, spec: Qwen3Spec) -> np.ndarray:
    # [experts, rows, cols] → [experts, cols, rows]: each expert's matrix transposed into its slot (and back)
    out = np.empty((block.shape[0], block.shape[2], block.shape[1]), dtype=block.dtype)
    for e in range(block.shape[0]):
        mapping.transpose(block[e], out=out[e])
    return out


_AS_IS, _T = mapping.as_is, mapping.transposed
#: E = dim, D = head_dim, H/K = q/kv heads, M = ffn_dim, V = vocab, X = experts, I = moe_ffn_dim.
TRANSFORMS: dict[str, Transform] = {t.name: t for t in (
    Transform("embedding", lambda s: (s.vocab_size, s.dim), lambda s: (s.vocab_size, s.dim), _AS_IS, _AS_IS,
              row_axis=0),
    Transform("logits", lambda s: (s.vocab_size, s.dim), lambda s: (s.dim, s.vocab_size), _T, _T, row_axis=1,
              takes_parts=True),
    Transform("query", lambda s: (s.n_heads * s.head_dim, s.dim), lambda s: (s.dim, s.n_heads, s.head_dim),
              _heads, _unheads, row_axis=1, per_head=True),
    Transform("kv", lambda s: (s.n_kv_heads * s.head_dim, s.dim), lambda s: (s.dim, s.n_kv_heads, s.head_dim),
              _heads, _unheads, row_axis=1, per_head=True),
    Transform("out", lambda s: (s.dim, s.n_heads * s.head_dim), lambda s: (s.n_heads, s.head_dim, s.dim),
              _out, _unout, row_axis=2, takes_parts=True),
    Transform("wi", lambda s: (s.ffn_dim, s.dim), lambda s: (s.dim, s.ffn_dim), _T, _T, row_axis=1, takes_parts=True),
    Transform("wo", lambda s: (s.dim, s.ffn_dim), lambda s: (s.ffn_dim, s.dim), _T, _T, row_axis=1, takes_parts=True),
    Transform("norm", lambda s: (s.dim,), lambda s: (s.dim,), _AS_IS, _AS_IS),
    Transform("qk_norm", lambda s: (s.head_dim,), lambda s: (s.head_dim,), _AS_IS, _AS_IS),
    Transform("router", lambda s: (s.n_experts, s.dim), lambda s: (s.dim, s.n_experts), _T, _T, row_axis=1,
              takes_parts=True),
    Transform("expert_wi", lambda s: (s.moe_ffn_dim, s.dim), lambda s: (s.n_experts, s.dim, s.moe_ffn_dim),
              _experts_t, _experts_t, row_axis=2),
    Transform("expert_wo", lambda s: (s.dim, s.moe_ffn_dim), lambda s: (s.n_experts, s.moe_ffn_dim, s.dim),
              _experts_t, _experts_t, row_axis=2),
)}


# ------------------------------------------------------------------------------------------------ rules


per_expert = mapping.per_expert  # whether the rule's tensor is one per expert (stacked on EXPERT_AXIS)


_L = "model.layers.{layer}."
ATTN, MLP, MOE = ("decoder", "layers", "self_attention"), ("decoder", "layers", "mlp"), ("decoder", "layers", "moe_block")


def _r(target: tuple[str, ...], hf: str, transform: str) -> Rule:
    # An HF file holds each tensor whole: one logical shard (n_shards 1), "split" on axis 0 wherever rows may be cut
    # (the planner cuts ``split is not None`` tensors into budget-sized row blocks; norms are never cut).
    row_cut = TRANSFORMS[transform].row_axis is not None
    return Rule(target, {"hf": hf}, 0 if row_cut else None, TRANSFORMS[transform])


COMMON: tuple[Rule, ...] = (
    _r(("token_embedder", "embedding"), "model.embed_tokens.weight", "embedding"),
    _r(ATTN + ("query", "kernel"), _L + "self_attn.q_proj.weight", "query"),
    _r(ATTN + ("key", "kernel"), _L + "self_attn.k_proj.weight", "kv"),
    _r(ATTN + ("value", "kernel"), _L + "self_attn.v_proj.weight", "kv"),
    _r(ATTN + ("out", "kernel"), _L + "self_attn.o_proj.weight", "out"),
    _r(ATTN + ("query_norm", "scale"), _L + "self_attn.q_norm.weight", "qk_norm"),
    _r(ATTN + ("key_norm", "scale"), _L + "self_attn.k_norm.weight", "qk_norm"),
    _r(("decoder", "layers", "pre_self_attention_layer_norm", "scale"), _L + "input_layernorm.weight", "norm"),
    _r(("decoder", "layers", "post_self_attention_layer_norm", "scale"), _L + "post_attention_layernorm.weight",
       "norm"),
    _r(("decoder", "decoder_norm", "scale"), "model.norm.weight", "norm"),
)
LOGITS = _r(("decoder", "logits_dense", "kernel"), "lm_head.weight", "logits")
DENSE_MLP: tuple[Rule, ...] = (
    _r(MLP + ("wi_0", "kernel"), _L + "mlp.gate_proj.weight", "wi"),
    _r(MLP + ("wi_1", "kernel"), _L + "mlp.up_proj.weight", "wi"),
    _r(MLP + ("wo", "kernel"), _L + "mlp.down_proj.weight", "wo"),
)
MOE_MLP: tuple[Rule, ...] = (
    _r(MOE + ("gate", "kernel"), _L + "mlp.gate.weight", "router"),
    _r(MOE + ("wi_0",), _L + "mlp.experts.{expert}.gate_proj.weight", "expert_wi"),
    _r(MOE + ("wi_1",), _L + "mlp.experts.{expert}.up_proj.weight", "expert_wi"),
    _r(MOE + ("wo",), _L + "mlp.experts.{expert}.down_proj.weight", "expert_wo"),
)


def rules(spec: Qwen3Spec) -> tuple[Rule, ...]:
    """The leaves of this checkpoint's MaxText tree: no logits kernel when tied (MaxText's logits_via_embedding)."""
    return COMMON + (() if spec.tie_embeddings else (LOGITS,)) + (MOE_MLP if spec.moe else DENSE_MLP)


def source_tensors(spec: Qwen3Spec, source: str = "hf") -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor the checkpoint must hold, and no other (the source cross-check's list)."""
    out = {}
    for rule in rules(spec):
        shape = rule.transform.global_shape(spec)
        for layer in range(spec.n_layers) if rule.per_layer else (None,):
            for expert in range(spec.n_experts) if per_expert(rule) else (None,):
                out[rule.source_key(source, layer, expert=expert)] = shape
    return out
