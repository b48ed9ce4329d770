"""``rayconv export`` of Qwen3 (dense and MoE) against MaxText 0.2.5's own ``to_huggingface.py``, and the round trip.

The inputs are rayconv's own convert outputs (scanned and unscanned) of the transformers-written fixtures
(tests/qwen3_checkpoints.py: dense, tied, head_dim ≠ hidden/heads; MoE, 8 experts, untied), converted once per
module, and to_maxtext.py's outputs of the same files. The reference is ``to_huggingface.py`` run on the same
checkpoint with the fixture's config.json registered as its model (tools/maxtext_ref/to_hf_hf.py, cached).

What is compared:
* against MaxText: every safetensors file and the index byte for byte (tensor names, dtypes, shapes, bytes, the
  split); config.json is the user's (``--config``), and differs from MaxText's in one field only, see
  :func:`test_export_equals_to_huggingface`;
* the round trip HF → convert → export: every tensor of the original files, bit for bit, and no other;
* transformers loads the export, its logits on fixed tokens are array-equal to the original model's, and
  re-saving it writes the same config.json and generation_config.json;
* ``--model_name`` configs (families/qwen3_hf.py) against MaxText's ``hf_model_configs`` and transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import qwen3_checkpoint, qwen3_spec
from helpers import ITEMS, one_error, run_cli
from qwen3_checkpoints import FIXTURES, hf_tensors
from rayconv.exporting import model as export_model
from rayconv.exporting.driver import ExportOptions, export
from rayconv.families import QWEN3, qwen3
from rayconv.targets.safetensors_files import INDEX_FILE

KINDS = {True: "scanned", False: "unscanned"}
#: Bytes per file for the split cases (the MoE fixture's 314 KB in 8 files, the dense one's in 5).
SPLIT = 40_000
TOKENS = [1, 17, 42, 99, 200, 255, 3, 128]


checkpoint, spec_of = qwen3_checkpoint, qwen3_spec  # conftest: the fixtures both Qwen3 test files use


@pytest.fixture
def converted(qwen3_converted):
    return qwen3_converted  # conftest: each fixture converted once per run


def run_export(items: Path, out: Path, name: str, **kwargs):
    options = dict(executor="local", progress=False, config=str(checkpoint(name) / "config.json"))
    options.update(kwargs)
    return export(ExportOptions(input=str(items), output=str(out), **options))


def assert_same_files(ours: Path, theirs: Path) -> list[str]:
    """Every safetensors file and the index byte-equal, the same files (plus generation_config.json)."""
    names = sorted(p.name for p in theirs.iterdir())
    assert sorted(p.name for p in ours.iterdir() if not p.name.startswith(".")) == sorted(
        names + ["generation_config.json"])
    for file in names:
        if file != "config.json":
            assert (ours / file).read_bytes() == (theirs / file).read_bytes(), file
    return names


#: One form per fixture against MaxText's exporter (each is a ~70 s MaxText run from a cold cache): the dense model
#: scanned in one file, the MoE unscanned and split; every other form is checked by the round trip below.
CASES = [("qwen3-dense", True, None), ("qwen3-moe", False, SPLIT)]


@pytest.mark.parametrize("name,scanned,split", CASES,
                         ids=[f"{n}-{KINDS[s]}{'-split' if p else ''}" for n, s, p in CASES])
def test_export_equals_to_huggingface(name, scanned, split, converted, reference_025, tmp_path):
    """rayconv's export of rayconv's convert output = to_huggingface.py's of it, file for file; the same export of
    to_maxtext.py's output of the same HF files is the same bytes again."""
    spec = spec_of(name)
    items = converted(name) / ITEMS[KINDS[scanned]]
    theirs = reference_025.to_huggingface_hf(checkpoint(name), spec.maxtext_name, items, scanned=scanned,
                                             max_shard_size=split)
    extra = {} if split is None else {"max_shard_size": split}
    result = run_export(items, tmp_path / "hf", name, **extra)
    names = assert_same_files(tmp_path / "hf", theirs)
    assert (INDEX_FILE in names) == (split is not None) and len(result.files) > (1 if split else 0)
    assert ("lm_head.weight" in hf_tensors(theirs)) != spec.tie_embeddings  # tied: MaxText writes no lm_head
    # config.json: the fixture's (--config), which MaxText's differs from in intermediate_size only: its Qwen3-MoE
    # architecture check overwrites it with moe_intermediate_size × num_experts_per_tok.
    mine, maxtext = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "hf", theirs))
    assert mine == json.loads((checkpoint(name) / "config.json").read_text())
    differ = {k for k in mine.keys() | maxtext.keys() if mine.get(k) != maxtext.get(k)}
    assert differ == ({"intermediate_size"} if spec.moe else set())
    if spec.moe:
        assert maxtext["intermediate_size"] == spec.moe_ffn_dim * spec.experts_per_token
    to_maxtext = reference_025.to_maxtext(checkpoint(name), spec.maxtext_name, scanned=scanned)
    run_export(to_maxtext, tmp_path / "from_to_maxtext", name, **extra)
    assert_same_files(tmp_path / "from_to_maxtext", theirs)


@pytest.mark.parametrize("scanned", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("name", list(FIXTURES))
def test_round_trip_is_bit_equal(name, scanned, converted, tmp_path):
    """HF (transformers) → rayconv convert → rayconv export: every tensor back, bit for bit, and no other (the tied
    model writes no lm_head.weight, as transformers did not). Pieces smaller than one expert's tensor (row blocks
    of one expert's slot) give the same bytes; ``rayconv verify`` recomputes the export from the checkpoint."""
    original = hf_tensors(checkpoint(name))
    assert ("lm_head.weight" in original) != spec_of(name).tie_embeddings
    run_export(converted(name) / ITEMS[KINDS[scanned]], tmp_path / "hf", name, piece_budget=1024)
    back = hf_tensors(tmp_path / "hf")
    assert sorted(back) == sorted(original)
    for key, value in original.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert back[key].tobytes() == value.tobytes(), key
    if spec_of(name).moe:
        assert "model.layers.1.mlp.experts.7.down_proj.weight" in back and "model.layers.0.mlp.gate.weight" in back
    result = run_cli("verify", str(converted(name) / ITEMS[KINDS[scanned]]), str(tmp_path / "hf"))
    assert result.returncode == 0 and f"verified {len(original)} tensors" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("name", list(FIXTURES))
def test_transformers_loads_the_export(name, converted, tmp_path):
    """Qwen3ForCausalLM / Qwen3MoeForCausalLM load the export; logits on fixed tokens equal the original model's
    exactly; save_pretrained of the loaded model writes our config.json and generation_config.json byte for byte."""
    import torch
    from transformers import AutoModelForCausalLM

    run_export(converted(name) / ITEMS["scanned"], tmp_path / "hf", name)
    logits = []
    for directory in (checkpoint(name), tmp_path / "hf"):
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
        assert type(model).__name__ == qwen3.ARCHITECTURES[model.config.model_type]
        with torch.no_grad():
            logits.append(model(torch.tensor([TOKENS])).logits.numpy())
    assert logits[0].shape == (1, len(TOKENS), spec_of(name).vocab_size) and np.isfinite(logits[0]).all()
    assert np.array_equal(logits[0], logits[1])
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).save_pretrained(str(tmp_path / "resaved"))  # its dtype
    for file in ("config.json", "generation_config.json"):
        assert (tmp_path / "hf" / file).read_bytes() == (tmp_path / "resaved" / file).read_bytes(), file


def test_model_name_configs_are_maxtexts_and_transformers(reference_025):
    """--model_name qwen3-…: the config.json written is transformers' own serialisation of MaxText 0.2.5's
    ``hf_model_configs`` entry of that name (its fields equal, save_pretrained's form); its spec is the name's size.
    The one departure: qwen3-4b-thinking-2507's rope θ (MaxText's entry copies qwen3-4b's 1e6; the model is 5e6)."""
    import transformers

    theirs = {name: entry["hf"] for name, entry in reference_025.model_configs("qwen3-").items()
              if entry["hf"] is not None and entry["hf"].get("model_type") in qwen3.MODEL_TYPES}
    assert sorted(QWEN3.hf_configs) == sorted(theirs)
    for name, config in QWEN3.hf_configs.items():
        model = export_model.from_model_name(name)
        text = export_model.config_json(model, "bfloat16")
        fields = json.loads(text)
        cls = transformers.AutoConfig.for_model(fields.pop("model_type"), **{k: v for k, v in fields.items()
                                                                            if k != "transformers_version"})
        assert cls.to_json_string() == text.decode(), name
        rope = fields["rope_parameters"]["rope_theta"]
        assert rope == (5e6 if name == "qwen3-4b-thinking-2507" else theirs[name]["rope_parameters"]["rope_theta"])
        for key in set(config) - {"architectures", "rope_parameters", "layer_types"}:
            assert theirs[name][key] == config[key], (name, key)
        size = qwen3.known_size(model.spec)
        assert size is not None and (size.name == name or QWEN3.hf_configs[size.name] == config), name
        assert json.loads(export_model.generation_config_json(model)).get("eos_token_id") == config["eos_token_id"]


@pytest.mark.parametrize("model,needle", [
    (["--model_name", "qwen3-0.6b"], "has 2 decoder layers, qwen3-0.6b has 28"),
    (["--model_name", "qwen3-9b"], "--model_name qwen3-9b: no published size"),
    (["--config", "dense"], "lacks decoder/layers/mlp/wi_0/kernel"),
    (["--config", "experts"], "num_experts 8 (checkpoint) vs 4"),
])
def test_wrong_model_is_one_line(model, needle, converted, tmp_path):
    """The MoE checkpoint exported as another model: one line, nothing written."""
    if model[0] == "--config":
        config = json.loads((checkpoint("qwen3-dense" if model[1] == "dense" else "qwen3-moe") / "config.json")
                            .read_text())
        config.update(num_hidden_layers=2) if model[1] == "dense" else config.update(num_local_experts=4)
        (tmp_path / "config.json").write_text(json.dumps(config))
        model = ["--config", str(tmp_path / "config.json")]
    result = run_cli("export", "--executor", "local", "--no_progress", "--input_directory",
                     str(converted("qwen3-moe") / ITEMS["scanned"]), "--output_directory", str(tmp_path / "hf"), *model)
    assert needle in one_error(result)
    assert not (tmp_path / "hf").exists()
