"""Llama's Hugging Face config.json facts: what ``rayconv export`` writes for a model MaxText names.

MaxText model name → the HF config fields that are not transformers' ``LlamaConfig`` defaults, and those defaults
as ``to_json_file`` writes them. llama3.1-8b/70b/405b are MaxText 0.2.5's ``hf_model_configs`` (``to_huggingface.py``
writes these) except that 405b gets Llama 3.1's rope (MaxText's entry omits ``rope_scaling``, which would describe
another model); the others are the Hub's config.json of the same model.
"""

from __future__ import annotations

from typing import Any

_LLAMA3_ROPE = {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0, "rope_type": "llama3"}
_LLAMA31_EOS = [128001, 128008, 128009]


def _llama(vocab: int, dim: int, ffn: int, layers: int, heads: int, kv: int, positions: int, bos: int,
           eos: int | list[int], rope: dict[str, Any], eps: float = 1e-5) -> dict[str, Any]:
    return {"vocab_size": vocab, "hidden_size": dim, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": dim // heads,
            "max_position_embeddings": positions, "rms_norm_eps": eps, "bos_token_id": bos, "eos_token_id": eos,
            "rope_parameters": rope, "model_type": "llama"}


def _rope(theta: float) -> dict[str, Any]:
    return {"rope_theta": theta, "rope_type": "default"}


_FIELDS_OF: dict[str, dict[str, Any]] = {
    "llama2-7b": _llama(32000, 4096, 11008, 32, 32, 32, 4096, 1, 2, _rope(10000.0)),
    "llama2-13b": _llama(32000, 5120, 13824, 40, 40, 40, 4096, 1, 2, _rope(10000.0)),
    "llama2-70b": _llama(32000, 8192, 28672, 80, 64, 8, 4096, 1, 2, _rope(10000.0)),
    "llama3-8b": _llama(128256, 4096, 14336, 32, 32, 8, 8192, 128000, 128001, _rope(500000.0)),
    "llama3-70b": _llama(128256, 8192, 28672, 80, 64, 8, 8192, 128000, 128001, _rope(500000.0)),
    "llama3.1-8b": _llama(128256, 4096, 14336, 32, 32, 8, 131072, 128000, 128001, _LLAMA3_ROPE),
    "llama3.1-70b": _llama(128256, 8192, 28672, 80, 64, 8, 131072, 128000, _LLAMA31_EOS, _LLAMA3_ROPE),
    "llama3.1-405b": _llama(128256, 16384, 53248, 126, 128, 8, 131072, 128000, 128001, _LLAMA3_ROPE),
    "llama3.3-70b": _llama(128256, 8192, 28672, 80, 64, 8, 131072, 128000, _LLAMA31_EOS, _LLAMA3_ROPE),
}

#: transformers' ``LlamaConfig`` defaults as ``to_json_file`` writes them (the fields every config.json has).
HF_CONFIG_DEFAULTS: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu",
    "initializer_range": 0.02, "mlp_bias": False, "pad_token_id": None, "pretraining_tp": 1,
    "tie_word_embeddings": False, "use_cache": True,
}

#: MaxText model name → its whole HF config (the defaults under the model's own fields).
HF_CONFIGS: dict[str, dict[str, Any]] = {name: {**HF_CONFIG_DEFAULTS, **fields} for name, fields in _FIELDS_OF.items()}
