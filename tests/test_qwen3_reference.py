"""MaxText 0.2.5 serves what its to_maxtext.py wrote for the Qwen3 fixtures, as the model transformers runs.

The reference every Qwen3 output of rayconv is held to (tests/test_qwen3_mapping.py: leaf by leaf) must itself be
the checkpoint's model in MaxText: MaxEngine (0.2.5, default flags) loads to_maxtext's scanned and unscanned
outputs, registered as the MaxText model whose settings apply with config.json's dims, rope base and epsilon as
overrides, and its prefill logits match transformers' own float32 forward of the HF files within bf16 noise
(measured 0.5-0.8 % relative; the same model with another rope base is 6 % off, so the bound tells them apart).
"""

from __future__ import annotations


import numpy as np
import pytest

from conftest import qwen3_checkpoint, qwen3_spec
from qwen3_checkpoints import FIXTURES
from reference import DEFAULT_TOKENS

#: Relative L2 error bound of MaxText's bf16 logits against transformers' float32 ones.
BOUND = 0.02


def hf_logits(path, **config_changes) -> np.ndarray:
    """transformers' float32 logits of the HF checkpoint for the harness's tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    for key, value in config_changes.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([list(DEFAULT_TOKENS)])).logits[0].numpy()


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", list(FIXTURES))
def test_maxtext_serves_its_own_qwen3_conversion_as_transformers_runs_it(name, reference_025):
    path, spec = qwen3_checkpoint(name), qwen3_spec(name)
    theirs = hf_logits(path)
    for scanned in (False, True):
        items = reference_025.to_maxtext(path, spec.maxtext_name, scanned=scanned)
        logits = reference_025.logits_hf(path, spec.maxtext_name, items, "scanned" if scanned else "unscanned")
        assert logits.shape == (len(DEFAULT_TOKENS), spec.vocab_size) and np.isfinite(logits).all()
        assert relative(logits, theirs) < BOUND, (scanned, relative(logits, theirs))
        assert (logits.argmax(-1) == theirs.argmax(-1)).all()
    # The bound separates models: the settings name's own rope base (what MaxText would use without the override).
    other = hf_logits(path, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert relative(logits, other) > 2 * BOUND
