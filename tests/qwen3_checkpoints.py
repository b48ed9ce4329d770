"""Tiny Qwen3 checkpoints for the tests, written by ``transformers`` itself: dense and MoE, several files, bf16.

Each fixture is a ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM`` built from a real ``Qwen3Config`` /
``Qwen3MoeConfig`` whose every parameter (norm scales included: transformers initialises them to ones, which
would hide a mixed-up norm) is overwritten with seeded random bf16 values, in ``state_dict`` order, then
``save_pretrained(max_shard_size=…)``: the files, index and ``config.json`` a Hub download holds. transformers 5
keeps a MoE layer's experts fused in memory (``mlp.experts.gate_up_proj``) and splits them back to the Hub's
per-expert names (``mlp.experts.{e}.gate_proj.weight``) on save, so the files have the real checkpoints' names.

The two fixtures cover what changes the weights' shapes: ``head_dim`` ≠ hidden/heads and tied embeddings (no
``lm_head.weight``, as Qwen3-0.6B/1.7B/4B) in the dense one; experts, top-k, ``moe_intermediate_size`` and an
untied head (every Qwen3 MoE) in the MoE one.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import ml_dtypes
import numpy as np

from hf_checkpoints import cached_checkpoint

BF16 = np.dtype(ml_dtypes.bfloat16)


@dataclasses.dataclass(frozen=True)
class Qwen3Fixture:
    """The dims of one tiny Qwen3 checkpoint (``experts == 0``: dense)."""

    hidden: int = 64
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    intermediate: int = 96
    vocab: int = 256
    tie: bool = False
    experts: int = 0
    top_k: int = 0
    moe_intermediate: int = 0
    seed: int = 0
    max_shard_size: str = "40KB"

    @property
    def moe(self) -> bool:
        return self.experts > 0

    def hf_config(self):
        """The transformers config object (what ``config.json`` is written from)."""
        import transformers

        common = dict(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                      num_hidden_layers=self.layers, num_attention_heads=self.heads,
                      num_key_value_heads=self.kv_heads, head_dim=self.head_dim, rms_norm_eps=1e-6,
                      max_position_embeddings=4096, tie_word_embeddings=self.tie, dtype="bfloat16")
        if not self.moe:
            return transformers.Qwen3Config(**common)
        return transformers.Qwen3MoeConfig(**common, num_experts=self.experts, num_experts_per_tok=self.top_k,
                                           moe_intermediate_size=self.moe_intermediate, norm_topk_prob=True,
                                           decoder_sparse_step=1, mlp_only_layers=[])


FIXTURES: dict[str, Qwen3Fixture] = {
    # head_dim 32 ≠ 64 / 4; tied embeddings like Qwen3-0.6B; 3 layers.
    "qwen3-dense": Qwen3Fixture(hidden=64, layers=3, heads=4, kv_heads=2, head_dim=32, intermediate=96, vocab=256,
                                tie=True, seed=31),
    # 8 experts, top 2, experts 32 wide; head_dim 16 = 64 / 4; untied head like every Qwen3 MoE.
    "qwen3-moe": Qwen3Fixture(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=96, vocab=256,
                              tie=False, experts=8, top_k=2, moe_intermediate=32, seed=32),
}


def random_state(model, seed: int) -> dict:
    """{name: seeded random bf16 torch tensor} for every parameter of ``model`` (numpy's generator: the same
    values whatever torch's RNG does). Weights ~ N(0, 0.02²); norm scales ~ 1 + N(0, 0.1²), all distinct."""
    import torch

    rng = np.random.default_rng(seed)
    state = {}
    for name, param in model.state_dict().items():
        shape = tuple(param.shape)
        values = rng.standard_normal(shape, dtype=np.float32)
        values = 1 + 0.1 * values if name.endswith("norm.weight") else 0.02 * values
        state[name] = torch.from_numpy(values.astype(BF16).view(np.int16)).view(torch.bfloat16)
    return state


def write_qwen3_checkpoint(fixture: Qwen3Fixture, out: str | Path) -> Path:
    """save_pretrained of a Qwen3 (MoE) causal LM holding seeded random weights, in several safetensors files."""
    import torch
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    cls = Qwen3MoeForCausalLM if fixture.moe else Qwen3ForCausalLM
    with torch.device("meta"):
        model = cls(fixture.hf_config())
    model.load_state_dict(random_state(model, fixture.seed), strict=True, assign=True)
    if fixture.tie:
        model.tie_weights()
    out = Path(out)
    model.save_pretrained(out, max_shard_size=fixture.max_shard_size)
    return out


def ensure_qwen3_checkpoint(name: str, root: str | Path) -> Path:
    """The cached checkpoint of ``FIXTURES[name]`` under ``root`` (keyed by its dims and seed)."""
    fixture = FIXTURES[name]
    key = hashlib.sha256(repr(fixture).encode()).hexdigest()[:12]
    return cached_checkpoint(Path(root) / f"{name}-{key}", lambda tmp: write_qwen3_checkpoint(fixture, tmp))


def hf_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """{HF name: array} of every tensor in the checkpoint's safetensors files, read by the safetensors library."""
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        for key, value in load_file(str(file)).items():
            out[key] = value.view(BF16) if value.dtype == np.dtype("V2") else value
    return out
