"""Hugging Face Llama checkpoints for the tests, written by ``transformers`` itself from the synthetic Meta weights.

The Meta shards of a :class:`rayconv.synthetic.SyntheticModel` are merged into whole tensors the way Meta's
model-parallel layout defines them (dim-0 / dim-1 splits, repeated kv heads taken once, norms from shard 0),
renamed to HF's names, and q/k are permuted exactly as transformers' ``convert_llama_weights_to_hf.py`` does
(``view(heads, D // 2, 2, dim).transpose(1, 2)``). ``LlamaForCausalLM`` is built on the meta device, the
weights are assigned, and ``save_pretrained(max_shard_size=…)`` writes several safetensors files plus
``model.safetensors.index.json`` and ``config.json``: the same files a Hub download holds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np

from rayconv.synthetic import SyntheticModel, cached_directory, shard_tensors

#: Meta key → (HF key, split axis of Meta's shards, None = replicated).
_META_TO_HF = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", "emb"),
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", "kv"),
    "attention.wv.weight": ("self_attn.v_proj.weight", "kv"),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}


def merged_meta(model: SyntheticModel) -> dict[str, np.ndarray]:
    """{Meta key: whole bf16 tensor} of the synthetic checkpoint (what Meta's MP1 would hold)."""
    shards = [dict(shard_tensors(model, s)) for s in range(model.n_shards)]
    kv_step = max(1, model.n_shards // model.n_kv_heads)
    out = {}
    for key in shards[0]:
        suffix = key.split(".", 2)[2] if key.startswith("layers.") else key
        split = _META_TO_HF[suffix][1]
        if split == "emb":
            split = 1 if model.family == "llama-2" else 0
        if split is None:
            out[key] = shards[0][key]
        elif split == "kv":
            out[key] = np.concatenate([s[key] for s in shards[::kv_step]], axis=0)
        else:
            out[key] = np.concatenate([s[key] for s in shards], axis=split)
    return out


def hf_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' convert_llama_weights_to_hf.permute: Meta's interleaved rope rows → half-split."""
    rows, dim = w.shape
    return w.reshape(heads, rows // heads // 2, 2, dim).transpose(0, 2, 1, 3).reshape(rows, dim)


def hf_state(model: SyntheticModel) -> dict[str, np.ndarray]:
    """{HF name: bf16 array} for the synthetic weights."""
    state = {}
    for key, value in merged_meta(model).items():
        if key.startswith("layers."):
            _, layer, suffix = key.split(".", 2)
            name = f"model.layers.{layer}.{_META_TO_HF[suffix][0]}"
            if suffix == "attention.wq.weight":
                value = hf_permute(value, model.n_heads)
            elif suffix == "attention.wk.weight":
                value = hf_permute(value, model.n_kv_heads)
        else:
            name = _META_TO_HF[key][0]
        state[name] = value
    return state


def hf_config(model: SyntheticModel):
    from transformers import LlamaConfig

    if model.family in ("llama-3.1", "llama-3.3"):
        rope = {"rope_type": "llama3", "rope_theta": model.rope_theta, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    else:
        rope = {"rope_type": "default", "rope_theta": model.rope_theta}
    return LlamaConfig(vocab_size=model.vocab_size, hidden_size=model.dim, intermediate_size=model.ffn_dim,
                       num_hidden_layers=model.n_layers, num_attention_heads=model.n_heads,
                       num_key_value_heads=model.n_kv_heads, head_dim=model.head_dim, rms_norm_eps=model.norm_eps,
                       max_position_embeddings=131072, rope_parameters=rope, tie_word_embeddings=False,
                       dtype="bfloat16")


def write_hf_checkpoint(model: SyntheticModel, out: str | Path, max_shard_size: str = "200KB") -> Path:
    """save_pretrained of LlamaForCausalLM holding the synthetic weights, in several safetensors files."""
    import torch
    from transformers import LlamaForCausalLM

    config = hf_config(model)
    with torch.device("meta"):
        hf_model = LlamaForCausalLM(config)
    state = {k: torch.from_numpy(np.ascontiguousarray(v).view(np.int16)).view(torch.bfloat16)
             for k, v in hf_state(model).items()}
    hf_model.load_state_dict(state, strict=True, assign=True)
    hf_model = hf_model.to(torch.bfloat16)
    out = Path(out)
    hf_model.save_pretrained(out, max_shard_size=max_shard_size)
    return out


def ensure_hf_checkpoint(model: SyntheticModel, root: str | Path, max_shard_size: str = "200KB") -> Path:
    """Cached :func:`write_hf_checkpoint` under ``root/<hash>`` (built in a temp dir, renamed into place)."""
    key = hashlib.sha256(repr((model, max_shard_size)).encode()).hexdigest()[:12]
    return cached_checkpoint(Path(root) / f"hf-{key}", lambda tmp: write_hf_checkpoint(model, tmp, max_shard_size))


def cached_checkpoint(out: Path, write: Callable[[Path], object], marker: str = "config.json") -> Path:
    """``out`` once it holds ``marker``; else ``write(tmp)`` builds it (rayconv.synthetic.cached_directory: built
    once under a lock, so parallel test workers share it)."""
    return cached_directory(out, marker, write)
