"""Qwen3's Hugging Face config.json facts: what ``rayconv export`` writes for a Qwen3 model MaxText names.

MaxText model name → the config.json ``save_pretrained`` writes for MaxText 0.2.5's ``hf_model_configs`` entry of
that name (``to_huggingface.py``'s model config): ``transformers.Qwen3Config`` / ``Qwen3MoeConfig`` built from the
entry's arguments, with transformers 5's field names (``rope_parameters``, ``num_local_experts``, the dense
``layer_types``) and the architecture ``save_pretrained`` adds. One departure, as for Llama 3.1 405B: MaxText's entry
of qwen3-4b-thinking-2507 is a copy of qwen3-4b's (rope θ 1e6) where its model yml and the Hub's config.json say
5e6; the export writes 5e6, the model the checkpoint is.
"""

from __future__ import annotations

from typing import Any

#: Fields every Qwen3 and Qwen3-MoE config.json has (``to_json_file`` of the config classes' defaults), put under a
#: user's ``--config``.
HF_CONFIG_DEFAULTS: dict[str, Any] = {
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": None,
    "hidden_act": "silu", "initializer_range": 0.02, "pad_token_id": None, "rms_norm_eps": 1e-06,
    "sliding_window": None, "tie_word_embeddings": False, "use_cache": True, "use_sliding_window": False,
}
_MOE_DEFAULTS: dict[str, Any] = {
    "decoder_sparse_step": 1, "mlp_only_layers": [], "output_router_logits": False, "router_aux_loss_coef": 0.001,
}


def _dense(hidden: int, ffn: int, layers: int, heads: int, tie: bool, theta: float = 1000000.0) -> dict[str, Any]:
    """MaxText's ``transformers.Qwen3Config(...)`` of a dense model (head_dim 128, 8 kv heads, 40960 positions)."""
    return {**HF_CONFIG_DEFAULTS, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "vocab_size": 151936, "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
            "max_window_layers": 28, "layer_types": ["full_attention"] * layers, "tie_word_embeddings": tie,
            "rope_parameters": {"rope_theta": theta, "rope_type": "default"}}


def _moe(hidden: int, ffn: int, moe_ffn: int, layers: int, heads: int, kv: int, experts: int, positions: int,
         theta: float, eos: int, **extra: Any) -> dict[str, Any]:
    """MaxText's ``transformers.Qwen3MoeConfig(...)`` of an MoE model (head_dim 128, top 8, max_window_layers = L)."""
    return {**HF_CONFIG_DEFAULTS, **_MOE_DEFAULTS, "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": hidden, "intermediate_size": ffn,
            "moe_intermediate_size": moe_ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": 128, "num_local_experts": experts, "num_experts_per_tok": 8,
            "norm_topk_prob": True, "max_position_embeddings": positions, "max_window_layers": layers,
            "bos_token_id": 151643, "eos_token_id": eos,
            "rope_parameters": {"rope_theta": theta, "rope_type": "default"}, **extra}


_QWEN3_4B = _dense(2560, 9728, 36, 32, True)
_QWEN3_8B = _dense(4096, 12288, 36, 32, False)
_QWEN3_14B = _dense(5120, 17408, 40, 40, False)

#: MaxText model name → its whole HF config (without ``dtype`` / ``transformers_version``, which the export sets).
HF_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": _dense(1024, 3072, 28, 16, True),
    "qwen3-1.7b": _dense(2048, 6144, 28, 16, True),
    "qwen3-1.7b-base": _dense(2048, 6144, 28, 16, True),
    "qwen3-4b": _QWEN3_4B,
    "qwen3-4b-base": _QWEN3_4B,
    "qwen3-4b-thinking-2507": _dense(2560, 9728, 36, 32, True, theta=5000000.0),
    "qwen3-8b": _QWEN3_8B,
    "qwen3-8b-base": _QWEN3_8B,
    "qwen3-14b": _QWEN3_14B,
    "qwen3-14b-base": _QWEN3_14B,
    "qwen3-32b": _dense(5120, 25600, 64, 64, False),
    "qwen3-30b-a3b": _moe(2048, 6144, 768, 48, 32, 4, 128, 262144, 10000000, 151645),
    "qwen3-30b-a3b-base": _moe(2048, 6144, 768, 48, 32, 4, 128, 32768, 1000000, 151643),
    "qwen3-235b-a22b": _moe(4096, 12288, 1536, 94, 64, 4, 128, 262144, 5000000.0, 151645),
    "qwen3-480b-a35b": _moe(6144, 8192, 2560, 62, 96, 8, 160, 262144, 10000000, 151645, bos_token_id=None,
                            router_aux_loss_coef=0.0, qkv_bias=False, shared_expert_intermediate_size=0,
                            use_qk_norm=True),
}
