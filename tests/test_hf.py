"""Hugging Face checkpoints as a source: written by transformers, converted bit-equal to the Meta route and MaxText's.

Every HF checkpoint here is ``LlamaForCausalLM.save_pretrained(max_shard_size=…)`` of the synthetic Meta
weights (tests/hf_checkpoints.py), so several safetensors files, an index and a real config.json. The
outputs must equal, leaf for leaf and byte for byte, the conversion of the same weights from Meta's
``.pth`` shards (which tests/test_parity.py holds equal to MaxText's own converters), for llama-3.1 in
8B-, 70B- and 405B-like shapes and for llama-3 and llama-2, whose rope handling differs; the scanned
output must also equal MaxText's own HF route (``llama_or_mistral_ckpt --huggingface-checkpoint true``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from conftest import CACHE, MODELS, run_convert, synthetic_checkpoint
from helpers import assert_same_leaves as leaves_equal
from helpers import copy_down, run_cli
from hf_checkpoints import ensure_hf_checkpoint, hf_permute, merged_meta
from rayconv import families, fp8, mapping
from rayconv.errors import ConversionError
from rayconv.source.bytesource import open_source
from rayconv.source.safetensors import index_safetensors
from rayconv.synthetic import SyntheticModel

KINDS = ("scanned", "unscanned", "int8")
SUBDIRS = ("bf16/scanned/0/items", "bf16/unscanned/checkpoints/0/items", "int8")

#: name → Meta-side synthetic model. Head counts as conftest's: kv heads < heads where the real model has it.
HF_MODELS: dict[str, SyntheticModel] = {
    # 8B: one Meta shard, 4 query heads per kv head.
    "llama31-8b": SyntheticModel(family="llama-3.1", dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512,
                                 multiple_of=64, ffn_dim_multiplier=1.3, n_shards=1, seed=21),
    # 70B: 8 query heads per kv head, one kv head per Meta shard.
    "llama31-70b": SyntheticModel(family="llama-3.1", dim=512, n_layers=2, n_heads=16, n_kv_heads=2, vocab_size=512,
                                  multiple_of=64, ffn_dim_multiplier=1.3, n_shards=2, seed=22),
    # 405B MP16: Meta repeats each kv head on two shards; HF stores it once.
    "llama31-405b": MODELS["llama31-405b-mp16"][0],
    "llama3": MODELS["llama3-mp1"][0],
    # Llama 2's own rope_theta (10000): with no rope scaling and a small vocabulary, config.json says llama-2.
    "llama2": dataclasses.replace(MODELS["llama2-mp2"][0], rope_theta=10000.0),
}


def hf_checkpoint(name: str) -> Path:
    return ensure_hf_checkpoint(HF_MODELS[name], CACHE / "synthetic-hf", max_shard_size="300KB")


@pytest.fixture(scope="module")
def converted_pair(tmp_path_factory):
    """name → (HF-source output, Meta-source output), each with all three outputs, converted once."""
    done = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in done:
            model = HF_MODELS[name]
            root = tmp_path_factory.mktemp(name)
            run_convert(hf_checkpoint(name), root / "hf", kinds=KINDS, quantize_type="int8", executor="local")
            run_convert(synthetic_checkpoint(model), root / "meta", model_name=model.family, kinds=KINDS,
                        quantize_type="int8", executor="local", kv_heads=model.n_kv_heads)
            done[name] = root / "hf", root / "meta"
        return done[name]

    return get


def test_the_fixture_is_a_real_multi_file_hub_layout():
    path = hf_checkpoint("llama31-405b")
    files = sorted(p.name for p in path.iterdir())
    shards = [n for n in files if n.endswith(".safetensors")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in files and "config.json" in files, files
    assert all(n.startswith("model-") and f"-of-{len(shards):05d}" in n for n in shards)


def test_header_index_matches_the_safetensors_library():
    """Every tensor read through our header index + one range read equals safetensors' own load."""
    from safetensors.numpy import load_file

    path = hf_checkpoint("llama31-70b")
    for file in sorted(path.glob("*.safetensors")):
        source = open_source(str(file))
        index = index_safetensors(source)
        theirs = load_file(str(file))
        assert sorted(index) == sorted(theirs)
        for key, info in index.items():
            ours = np.frombuffer(source.read(info.offset, info.nbytes), dtype=ml_dtypes.bfloat16).reshape(info.shape)
            assert info.dtype == "bfloat16" and ours.tobytes() == theirs[key].view(np.uint16).tobytes(), key


def test_unpermute_inverts_transformers_rope_permutation():
    rng = np.random.default_rng(0)
    heads, d, e = 3, 8, 5
    meta = rng.standard_normal((heads * d, e)).astype(np.float32)
    hf = hf_permute(meta, heads)
    assert not np.array_equal(hf, meta)
    # Kernel layout [E, heads, D]: HF's rows per head are Meta's, half-split.
    as_kernel = lambda g: g.T.reshape(e, heads, d)  # noqa: E731
    assert np.array_equal(mapping.permute_rope(as_kernel(meta)), as_kernel(hf))
    assert np.array_equal(mapping.unpermute_rope(as_kernel(hf)), as_kernel(meta))


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hf_source_is_bit_equal_to_meta_source(name, converted_pair):
    hf, meta = converted_pair(name)
    model = HF_MODELS[name]
    counts = [leaves_equal(hf / sub, meta / sub) for sub in SUBDIRS]
    assert counts == [13, 4 + 9 * model.n_layers, 3 + (2 + 7 * 2) * model.n_layers]


def test_hf_source_in_the_nnx_layout(tmp_path):
    """The MaxText 0.2.5 (nnx) trees from HF files equal those from Meta's shards too: the layout is orthogonal."""
    model = HF_MODELS["llama31-405b"]
    run_convert(hf_checkpoint("llama31-405b"), tmp_path / "hf", kinds=KINDS, quantize_type="int8", executor="local",
                maxtext_layout="nnx")
    run_convert(synthetic_checkpoint(model), tmp_path / "meta", model_name=model.family, kinds=KINDS,
                quantize_type="int8", executor="local", kv_heads=model.n_kv_heads, maxtext_layout="nnx")
    for sub in SUBDIRS:
        leaves_equal(tmp_path / "hf" / sub, tmp_path / "meta" / sub)


def test_rope_inverse_only_for_the_families_stored_interleaved():
    """llama-3.1 stores Meta's interleaved order (HF needs the inverse); llama-2/3 store HF's half-split as is."""
    for name, model in HF_MODELS.items():
        wq = merged_meta(model)["layers.0.attention.wq.weight"]
        from rayconv.source.hf import spec_from_config

        spec = spec_from_config(json.loads((hf_checkpoint(name) / "config.json").read_text()), model_name=None,
                                model_path=None)
        assert spec.family == model.family, name  # family from config.json alone
        kernel = mapping.to_layer_block(families.rules(spec)[1], hf_permute(wq, model.n_heads), spec)
        meta_kernel = wq.T.reshape(model.dim, model.n_heads, model.head_dim)
        want = meta_kernel if model.family == "llama-3.1" else mapping.permute_rope(meta_kernel)
        assert kernel.tobytes() == mapping.scale_query(want, spec.query_scale_divisor).tobytes(), name


@pytest.mark.parametrize("name", ["llama31-405b", "llama3", "llama2"])
def test_scanned_bit_equal_to_maxtext_huggingface_route(name, converted_pair, reference):
    hf, _ = converted_pair(name)
    theirs = reference.scanned_hf(HF_MODELS[name], hf_checkpoint(name))
    assert leaves_equal(hf / "bf16/scanned/0/items", theirs) == 13


# ------------------------------------------------------------------------------------------------
# Detection, Hub snapshot layout


def _options(path: Path, **kw):
    from rayconv.job import ConvertOptions
    from rayconv.source.checkpoint import list_input

    return ConvertOptions(files=list_input(str(path)), input_display=str(path), output="", input_directory=str(path),
                          **kw)


def test_hub_snapshot_root_hf_by_default_original_with_meta(tmp_path):
    """A snapshot holding both model-*.safetensors and original/consolidated.NN.pth (as meta-llama repos do)."""
    from rayconv.job import open_checkpoint
    from rayconv.source.checkpoint import MetaCheckpoint
    from rayconv.source.hf import HFCheckpoint

    model = HF_MODELS["llama31-8b"]
    snap = tmp_path / "snapshot"
    shutil.copytree(hf_checkpoint("llama31-8b"), snap)
    shutil.copytree(synthetic_checkpoint(model), snap / "original")
    assert isinstance(open_checkpoint(_options(snap)), HFCheckpoint)
    # The Hub cache's snapshots/<commit>/ holds symlinks into ../../blobs/.
    cached = tmp_path / "snapshots" / "abc123"
    cached.mkdir(parents=True)
    for f in hf_checkpoint("llama31-8b").iterdir():
        (cached / f.name).symlink_to(f)
    assert open_checkpoint(_options(cached)).nbytes == open_checkpoint(_options(snap)).nbytes
    meta = open_checkpoint(_options(snap, source_format="meta", model_name="llama-3.1"))
    assert isinstance(meta, MetaCheckpoint) and meta.tensor_files[0].endswith("original/consolidated.00.pth")
    # `huggingface-cli download --include "original/*"`: only original/ is there.
    only = tmp_path / "only-original"
    shutil.copytree(synthetic_checkpoint(model), only / "original")
    assert isinstance(open_checkpoint(_options(only, model_name="llama-3.1")), MetaCheckpoint)
    # Both formats side by side in one folder: refuse to guess.
    both = tmp_path / "both"
    shutil.copytree(hf_checkpoint("llama31-8b"), both)
    for f in synthetic_checkpoint(model).iterdir():
        shutil.copy(f, both / f.name)
    with pytest.raises(ConversionError, match="--source_format meta or --source_format hf"):
        open_checkpoint(_options(both, model_name="llama-3.1"))
    assert isinstance(open_checkpoint(_options(both, source_format="hf")), HFCheckpoint)


def test_snapshot_original_through_the_cli_checks_its_md5(tmp_path, converted_pair):
    """`--source_format meta` at a snapshot root converts original/ (md5-checked against original/checklist.chk)
    to the same bytes as the safetensors beside it."""
    model = HF_MODELS["llama31-8b"]
    snap = tmp_path / "snapshot"
    shutil.copytree(hf_checkpoint("llama31-8b"), snap)
    shutil.copytree(synthetic_checkpoint(model), snap / "original")
    out = tmp_path / "out"
    result = run_cli("convert", "--no_progress", "--executor", "local", "--input_directory", str(snap), "--source_format",
                 "meta", "--model_name", "llama-3.1", "--output_directory", str(out), "--quantize_type", "int8",
                 "--quantize_weights", "True")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "md5 of 2 files matches checklist.chk" in result.stderr, result.stderr[-3000:]
    hf, _ = converted_pair("llama31-8b")
    for sub in SUBDIRS:
        leaves_equal(out / sub, hf / sub)


def test_405b_snapshot_original_holds_two_layouts(tmp_path):
    """meta-llama/Llama-3.1-405B* keep Meta's MP16 and MP8 copies in original/mp16 and original/mp8."""
    from rayconv.job import open_checkpoint

    model, descriptor = MODELS["llama31-405b-mp16"]
    snap = tmp_path / "snapshot"
    shutil.copytree(hf_checkpoint("llama31-405b"), snap)
    for layout in ("mp16", "mp8"):
        (snap / "original").mkdir(exist_ok=True)
        (snap / "original" / layout).symlink_to(synthetic_checkpoint(model), target_is_directory=True)
    meta = open_checkpoint(_options(snap, source_format="meta", model_path=descriptor))
    assert meta.spec.n_shards == 16 and "/original/mp16/" in meta.tensor_files[0]
    with pytest.raises(ConversionError, match="original holds Meta checkpoints in mp16, mp8"):
        open_checkpoint(_options(snap, source_format="meta", model_name="llama-3.1"))


def test_model_flags_and_config_json(tmp_path):
    from rayconv.job import open_checkpoint

    path = hf_checkpoint("llama31-405b")
    spec = open_checkpoint(_options(path)).spec
    assert (spec.family, spec.maxtext_name, spec.n_kv_heads, spec.n_shards) == ("llama-3.1", "llama3.1-custom", 8, 1)
    # A Hub repo id (or a Meta descriptor) names the family and the MaxText size, as on the Meta path.
    spec = open_checkpoint(_options(path, model_path="meta-llama/Llama-3.3-70B-Instruct", model_name="llama-3.3")).spec
    assert (spec.family, spec.maxtext_name) == ("llama-3.3", "llama3.3-70b")
    spec = open_checkpoint(_options(path, model_path="Llama3.1-405B-Instruct:bf16-mp16")).spec
    assert (spec.maxtext_name, spec.n_shards) == ("llama3.1-405b", 1)
    with pytest.raises(ConversionError, match="disagrees with model llama-3"):
        open_checkpoint(_options(path, model_name="llama-3"))
    with pytest.raises(ConversionError, match="disagrees with .*num_key_value_heads 8"):
        open_checkpoint(_options(path, kv_heads=16))
    from rayconv.source.hf import spec_from_config

    config = json.loads((path / "config.json").read_text())
    rope = config["rope_parameters"]
    for key, value, needle in (("rope_parameters", dict(rope, rope_theta="big"), 'rope_theta must be a number, got "big"'),
                               ("rms_norm_eps", None, "rms_norm_eps must be a number, got null"),
                               ("num_attention_heads", 7.5, "num_attention_heads must be an integer, got 7.5"),
                               ("head_dim", 64, "head_dim 64 is not hidden_size / num_attention_heads"),
                               ("model_type", "qwen2", "is not a model rayconv converts")):
        with pytest.raises(ConversionError, match=needle):
            spec_from_config(dict(config, **{key: value}), model_name=None, model_path=None)


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit 1, nothing that looks finished


def _header(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), n


def _rewrite_header(path: Path, header: dict) -> None:
    """Write a new header in place of the old one, keeping the data section byte for byte."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _first_shard(src: Path) -> Path:
    return sorted(src.glob("model-*.safetensors"))[0]


def _missing_file(src: Path) -> None:
    sorted(src.glob("model-*.safetensors"))[-1].unlink()


def _offsets_out_of_range(src: Path) -> None:
    path = _first_shard(src)
    header, _ = _header(path)
    key = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [begin + 1024, end + 1024]
    _rewrite_header(path, header)


def _offsets_overlap(src: Path) -> None:
    """A file's second tensor starts 2 bytes inside its first (same length: only the layout check sees it)."""
    path, header = next((p, h) for p in sorted(src.glob("model-*.safetensors")) for h in [_header(p)[0]]
                        if len(h.keys() - {"__metadata__"}) > 1)
    second = sorted(header.keys() - {"__metadata__"}, key=lambda k: header[k]["data_offsets"][0])[1]
    begin, end = header[second]["data_offsets"]
    header[second]["data_offsets"] = [begin - 2, end - 2]
    _rewrite_header(path, header)


def _listed_twice(src: Path) -> None:
    """The second file's header also claims a tensor of the first (a stale or mixed-up shard)."""
    files = sorted(src.glob("model-*.safetensors"))
    headers = [_header(f)[0] for f in files]
    key, victim, j = next((k, v, j) for i in range(len(files)) for j in range(i + 1, len(files))
                          for k in headers[i] for v in headers[j] if "__metadata__" not in (k, v)
                          and headers[i][k]["shape"] == headers[j][v]["shape"])
    headers[j][key] = headers[j].pop(victim)
    _rewrite_header(files[j], headers[j])


def _wrong_dtype(src: Path) -> None:
    """One tensor stored as float16 (same byte count): a checkpoint saved in the wrong dtype."""
    path = _first_shard(src)
    header, _ = _header(path)
    key = next(k for k in header if k != "__metadata__")
    header[key]["dtype"] = "F16"
    _rewrite_header(path, header)


def _config_disagrees(src: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] += 64
    (src / "config.json").write_text(json.dumps(config))


def _truncated(src: Path) -> None:
    path = sorted(src.glob("model-*.safetensors"))[-1]
    os.truncate(path, path.stat().st_size - 4096)


def _fp8_variant(src: Path) -> None:
    """The layout of the Hub's -FP8 repos (fbgemm_fp8): float8 MLP weights of the middle layers with a float32
    ``weight_scale`` [out, 1] each, quantization_config in config.json."""
    import torch
    from safetensors.torch import load_file, save_file

    index = json.loads((src / "model.safetensors.index.json").read_text())
    layer = "model.layers.1.mlp."
    for path in sorted(src.glob("model-*.safetensors")):
        tensors = load_file(path)
        if not any(key.startswith(layer) for key in tensors):
            continue
        for key in [k for k in tensors if k.startswith(layer) and k.endswith(".weight")]:
            q, scale = fp8.quantize_rows(tensors[key].float().numpy().astype(ml_dtypes.bfloat16))
            tensors[key] = torch.from_numpy(q.view(np.uint8)).view(torch.float8_e4m3fn)
            tensors[key.replace(".weight", ".weight_scale")] = torch.from_numpy(scale.reshape(-1, 1))
            index["weight_map"][key.replace(".weight", ".weight_scale")] = path.name
        save_file(tensors, path, metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"activation_scale_ub": 1200.0, "quant_method": "fbgemm_fp8",
                                     "modules_to_not_convert": ["lm_head"]}
    (src / "config.json").write_text(json.dumps(config))


BAD = {
    "missing file": (_missing_file, "is missing from"),
    "offsets out of range": (_offsets_out_of_range, "gap at byte"),
    "offsets overlap": (_offsets_overlap, "overlaps the tensor before it"),
    "tensor listed twice": (_listed_twice, "is listed twice"),
    "wrong dtype": (_wrong_dtype, "is float16; rayconv converts bf16 checkpoints"),
    "config disagrees": (_config_disagrees, "config.json disagrees with the tensors"),
    "truncated file": (_truncated, "is truncated"),
    "the -FP8 variant": (_fp8_variant, "quantization_config 'fbgemm_fp8' (a quantized Hugging Face variant"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_hf_input_is_one_line(case, tmp_path):
    damage, needle = BAD[case]
    src = tmp_path / "in"
    shutil.copytree(hf_checkpoint("llama31-8b"), src)
    damage(src)
    out = tmp_path / "out"
    result = run_cli("convert", "--no_progress", "--executor", "local", "--input_directory", str(src),
                 "--output_directory", str(out), "--quantize_type", "int8", "--quantize_weights", "True")
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("rayconv: error:")]
    assert len(errors) == 1 and needle in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not list(out.rglob("commit_success.txt")) if out.exists() else True
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))[:5]


def test_tensor_listed_twice_in_one_header_is_rejected(tmp_path):
    """JSON would keep the last of two equal keys silently; the header reader must not."""
    path = tmp_path / "model.safetensors"
    raw = _first_shard(hf_checkpoint("llama31-8b")).read_bytes()
    header, n = _header(_first_shard(hf_checkpoint("llama31-8b")))
    key = next(k for k in header if k != "__metadata__")
    body = (json.dumps(header)[:-1] + ", " + json.dumps({key: header[key]})[1:]).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    with pytest.raises(ConversionError, match=f"tensor {key} is listed twice"):
        index_safetensors(open_source(str(path)))


# ------------------------------------------------------------------------------------------------
# gs:// in and out, through the CLI and Ray; plan and verify on the same source


def test_hf_from_fake_gcs_through_ray(tmp_path, fake_gcs, gcs_prefix, converted_pair):

    src = hf_checkpoint("llama31-405b")
    bucket_src = gcs_prefix.join("hub/Llama-3.1-405B-Instruct")
    for f in sorted(src.iterdir()):
        bucket_src.write_bytes(f.name, f.read_bytes())
    out = gcs_prefix.join("out")
    planned = run_cli("plan", "--json", "--input_directory", bucket_src.uri)
    assert planned.returncode == 0, planned.stderr[-2000:]
    plan = json.loads(planned.stdout)["plan"]
    assert plan["model"] == "llama3.1-custom" and plan["shards"] == len(list(src.glob("*.safetensors")))
    result = run_cli("convert", "--no_progress", "--input_directory", bucket_src.uri, "--output_directory", out.uri,
                 "--quantize_type", "int8", "--quantize_weights", "True", "--num_workers", "2",
                 "--worker_memory_gb", "0.5", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Completed conversion of llama3.1-custom" in result.stderr
    verified = run_cli("verify", bucket_src.uri, out.uri)
    assert verified.returncode == 0 and "identical to the mapping" in verified.stdout, verified.stderr[-2000:]
    copy_down(out, tmp_path / "down")
    _, meta = converted_pair("llama31-405b")
    for sub in SUBDIRS:
        leaves_equal(tmp_path / "down" / sub, meta / sub)
