"""Hostile Hugging Face checkpoints (issue 21): shard counts, index values, header metadata, config.json numbers,
rope and tied embeddings. Each ends in one line and exit 1 (or, for tied embeddings, in what transformers loads);
crafted files from ``save_pretrained`` output, the real CLI where it is the user's path."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from conftest import CACHE, synthetic_checkpoint
from helpers import assert_one_line, output_leaves, run_convert_cli
from hf_checkpoints import ensure_hf_checkpoint
from rayconv.errors import ConversionError, SourceError
from rayconv.source.bytesource import open_source
from rayconv.source.hf import INDEX, _weight_files, spec_from_config
from rayconv.source.safetensors import index_safetensors
from rayconv.synthetic import SyntheticModel

MODEL = SyntheticModel(family="llama-3.1", dim=256, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=256,
                       multiple_of=64, n_shards=1, seed=51)


def hf_src(tmp_path: Path, name: str = "in") -> Path:
    src = tmp_path / name
    shutil.copytree(ensure_hf_checkpoint(MODEL, CACHE / "synthetic-hf", max_shard_size="100KB"), src)
    return src


def convert(src: Path, out: Path, *extra: str):
    return run_convert_cli("--input_directory", str(src), "--output_directory", str(out), *extra)


def edit_json(path: Path, **changes) -> dict:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return data


# -- item 3: a shard count in a file name is bounded by the files there ---------------------------------------


def _recount(src: Path, count: str, index: bool) -> str:
    """Rename ``model-0000k-of-0000n`` to ``…-of-<count>`` (in the index too, or with no index)."""
    renamed = {}
    for path in sorted(src.glob("model-*.safetensors")):
        new = path.name.rsplit("-of-", 1)[0] + f"-of-{count}.safetensors"
        path.rename(src / new)
        renamed[path.name] = new
    if index:
        data = json.loads((src / INDEX).read_text())
        data["weight_map"] = {k: renamed[v] for k, v in data["weight_map"].items()}
        (src / INDEX).write_text(json.dumps(data))
    else:
        (src / INDEX).unlink()
    return f"model-{len(renamed) + 1:05d}-of-{count}.safetensors is missing"


@pytest.mark.parametrize("index", [True, False], ids=["index", "no index"])
def test_a_huge_shard_count_is_bounded_by_the_files_there(index, tmp_path):
    src = hf_src(tmp_path)
    needle = _recount(src, "999999999999", index)
    out = tmp_path / "out"
    assert_one_line(convert(src, out), needle, out)


def test_shard_series_costs_what_is_listed():
    """The pure function: 10**15 implied names and 5000-digit counts are answered from the two files there."""
    files = {f"model-0000{k}-of-999999999999999.safetensors": f"/x/{k}" for k in (1, 2)}
    with pytest.raises(SourceError, match="model-00003-of-999999999999999.safetensors is missing"):
        _weight_files(files, None, "src")
    long_name = f"model-00001-of-{'9' * 5000}.safetensors"  # no shard series (no int() of 5000 digits): a file
    assert _weight_files({long_name: "/x"}, None, "src") == [long_name]
    complete = {f"model-{k:05d}-of-00003.safetensors": "/x" for k in (1, 2, 3)}
    assert _weight_files(complete, {"weight_map": {"a": "model-00002-of-00003.safetensors"}}, "src") == sorted(complete)


@pytest.mark.parametrize("value", [5, None, ["model-00001-of-00002.safetensors"], {"a": 1}, ""])
def test_weight_map_values_must_be_file_names(value, tmp_path):
    src = hf_src(tmp_path)
    data = json.loads((src / INDEX).read_text())
    key = sorted(data["weight_map"])[0]
    data["weight_map"][key] = value
    (src / INDEX).write_text(json.dumps(data))
    out = tmp_path / "out"
    assert_one_line(convert(src, out), f"weight_map places {key} in", out)


# -- item 10: __metadata__ as the safetensors library reads it -------------------------------------------------


@pytest.mark.parametrize("metadata", [
    None, {}, {"format": "pt"}, ["pt"], "pt", {"format": 1}, {"format": None},
    {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]},
], ids=["null", "empty", "str map", "list", "str", "int value", "null value", "tensor-like"])
def test_metadata_is_refused_where_the_safetensors_library_refuses_it(metadata, tmp_path):
    from safetensors import safe_open

    raw = sorted(ensure_hf_checkpoint(MODEL, CACHE / "synthetic-hf", max_shard_size="100KB")
                 .glob("model-*.safetensors"))[0].read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = metadata
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    try:
        with safe_open(str(path), "np"):
            library = True
    except Exception:  # the library's SafetensorError
        library = False
    try:
        index_safetensors(open_source(str(path)))
        ours = True
    except SourceError as exc:
        assert "__metadata__ must be a map of strings to strings" in str(exc), exc
        ours = False
    assert ours == library


# -- item 10: config.json's numbers, one check with params.json's -------------------------------------------


@pytest.mark.parametrize("change,needle", [
    (dict(rms_norm_eps=1e300), "rms_norm_eps 1e+300 must be a positive finite number at most 1"),
    (dict(rms_norm_eps=-1e-5), "rms_norm_eps -1e-05 must be a positive finite number"),
    (dict(hidden_size=10**12), "hidden_size 1000000000000 is out of range"),
    (dict(num_hidden_layers=10**9), "num_hidden_layers 1000000000 is out of range"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings is 'yes', expected true or false"),
    ({"rope": dict(factor=-8)}, "rope_parameters: factor -8.0 must be a positive finite number"),
    ({"rope": dict(low_freq_factor="x")}, 'rope_parameters: low_freq_factor must be a number, got "x"'),
    ({"rope": dict(factor=None)}, "rope_parameters has no factor"),
    ({"rope": dict(high_freq_factor=1.0)}, "high_freq_factor 1 must be above low_freq_factor 1"),
    ({"rope": dict(original_max_position_embeddings=8192.5)},
     "original_max_position_embeddings must be an integer, got 8192.5"),
    ({"rope": dict(rope_theta=float("inf"))}, "rope_theta inf must be a positive finite number"),
])
def test_config_numbers_are_checked(change, needle):
    config = json.loads((ensure_hf_checkpoint(MODEL, CACHE / "synthetic-hf", max_shard_size="100KB")
                         / "config.json").read_text())
    if "rope" in change:
        config["rope_parameters"] = dict(config["rope_parameters"], **change["rope"])
    else:
        config.update(change)
    with pytest.raises(ConversionError) as err:
        spec_from_config(config, model_name=None, model_path=None)
    assert needle in str(err.value), err.value


def test_config_numbers_through_the_cli(tmp_path):
    src = hf_src(tmp_path)
    config = json.loads((src / "config.json").read_text())
    edit_json(src / "config.json", rope_parameters=dict(config["rope_parameters"], factor=-8))
    out = tmp_path / "out"
    assert_one_line(convert(src, out), "config.json: rope_parameters: factor -8.0 must be a positive finite", out)


# -- item 8: one rope rule for params.json and config.json ----------------------------------------------------


def test_scaled_rope_disagreeing_with_the_family_is_refused_on_both_paths(tmp_path):
    meta = tmp_path / "meta"
    shutil.copytree(synthetic_checkpoint(MODEL), meta)  # llama-3.1: params.json says use_scaled_rope true
    out = tmp_path / "out"
    meta_error = assert_one_line(convert(meta, out, "--model_name", "llama-3"),
                                 "params.json has use_scaled_rope true (Llama 3.1/3.3's scaled rope), which "
                                 "disagrees with model llama-3", out)
    hf_error = assert_one_line(convert(hf_src(tmp_path), out, "--model_name", "llama-3"),
                               "config.json has rope type 'llama3' (Llama 3.1/3.3's scaled rope), which "
                               "disagrees with model llama-3", out)
    assert meta_error.split("has ", 1)[1].split(", which")[0].endswith("(Llama 3.1/3.3's scaled rope)")
    assert hf_error.split("has ", 1)[1].split(", which")[0].endswith("(Llama 3.1/3.3's scaled rope)")
    edit_json(meta / "params.json", use_scaled_rope=False)
    assert_one_line(convert(meta, out, "--model_name", "llama-3.1"),
                    "params.json has use_scaled_rope false (no scaled rope: Llama 2/3), which disagrees with model "
                    "llama-3.1", out)


# -- item 7: tie_word_embeddings with a stored lm_head.weight -------------------------------------------------


def _lm_head_file(src: Path) -> Path:
    return src / json.loads((src / INDEX).read_text())["weight_map"]["lm_head.weight"]


def _store_embedding_as_lm_head(src: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    embed_file = src / json.loads((src / INDEX).read_text())["weight_map"]["model.embed_tokens.weight"]
    embed = load_file(embed_file)["model.embed_tokens.weight"]
    tensors = load_file(_lm_head_file(src))
    tensors["lm_head.weight"] = embed.clone()
    save_file(tensors, _lm_head_file(src), metadata={"format": "pt"})
    assert torch.equal(load_file(_lm_head_file(src))["lm_head.weight"], embed)


@pytest.mark.parametrize("case", ["equal", "differs"])
def test_tied_embeddings_with_a_stored_lm_head_convert_as_transformers_loads_them(case, tmp_path):
    """transformers 5 ties the two when they are equal and keeps the stored lm_head.weight when they differ ("we
    will NOT tie them"): either way the model's lm_head is the stored one, and so is rayconv's logits kernel."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    untied = hf_src(tmp_path, "untied")
    if case == "equal":
        _store_embedding_as_lm_head(untied)
    tied = tmp_path / "tied"
    shutil.copytree(untied, tied)
    edit_json(tied / "config.json", tie_word_embeddings=True)

    stored = load_file(_lm_head_file(tied))["lm_head.weight"]
    model = LlamaForCausalLM.from_pretrained(str(tied), dtype=torch.bfloat16)
    assert torch.equal(model.lm_head.weight, stored)
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == (case == "equal")

    result = convert(tied, tmp_path / "out-tied")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sets tie_word_embeddings but also stores lm_head.weight" in result.stderr, result.stderr[-3000:]
    reference = convert(untied, tmp_path / "out-untied")
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "tie_word_embeddings" not in reference.stderr
    ours, theirs = output_leaves(tmp_path / "out-tied", ("scanned",)), output_leaves(tmp_path / "out-untied",
                                                                                     ("scanned",))
    assert ours == theirs and any("logits_dense" in k for k in ours), sorted(ours)[:5]
