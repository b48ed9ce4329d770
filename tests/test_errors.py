"""Bad input and bad destinations: one clear line on stderr, non-zero exit, nothing that looks done.

These run the real ``rayconv`` CLI in a subprocess (with a real local Ray where the failure happens
inside a worker) against damaged copies of a synthetic 405B-layout checkpoint.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import synthetic_checkpoint
from helpers import MP16_DESCRIPTOR, assert_clean_failure, mp16_convert_args, mp16_model, run_convert_cli, small_filesystem
from rayconv.source.bytesource import open_source
from rayconv.source.pth import index_pth

MODEL = mp16_model()
DESCRIPTOR = MP16_DESCRIPTOR


@pytest.fixture()
def damaged(tmp_path):
    """A private copy of the checkpoint to damage, without its checklist.chk: these tests exercise the checks
    that remain when there is none (index, CRC-32, kv-head copies); with it, the md5 check catches the damage
    first (tests/test_input_safety.py)."""
    src = synthetic_checkpoint(MODEL)
    dst = tmp_path / "in"
    shutil.copytree(src, dst)
    (dst / "checklist.chk").unlink()
    return dst


def test_missing_shard(damaged, tmp_path):
    (damaged / "consolidated.05.pth").unlink()
    out = tmp_path / "out"
    assert_clean_failure(run_convert_cli(*mp16_convert_args(damaged, out)), out, "missing shard consolidated.05.pth")


@pytest.mark.parametrize("fraction", [0.3, 0.97])
def test_truncated_shard(damaged, tmp_path, fraction):
    shard = damaged / "consolidated.03.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * fraction)])
    out = tmp_path / "out"
    assert_clean_failure(run_convert_cli(*mp16_convert_args(damaged, out)), out, "consolidated.03.pth")


@pytest.mark.parametrize("field,value,needle", [("n_layers", 2, "has no tensor layers.1"),
                                                ("dim", 512, "params.json disagrees with the shards"),
                                                ("vocab_size", 1000, "vocab_size 1000")])
def test_params_json_disagrees_with_shards(damaged, tmp_path, field, value, needle):
    params = json.loads((damaged / "params.json").read_text())
    params[field] = value
    (damaged / "params.json").write_text(json.dumps(params))
    out = tmp_path / "out"
    assert_clean_failure(run_convert_cli(*mp16_convert_args(damaged, out)), out, needle)


def test_unequal_duplicated_kv_heads(damaged, tmp_path):
    """Shard 1 must repeat shard 0's kv head (405B MP16); a differing copy is refused, through Ray."""
    path = damaged / "consolidated.01.pth"
    state = torch.load(path, weights_only=True)
    state["layers.0.attention.wk.weight"] = state["layers.0.attention.wk.weight"] * 2
    torch.save(state, path)
    out = tmp_path / "out"
    assert_clean_failure(run_convert_cli(*mp16_convert_args(damaged, out), executor="ray"), out,
                         "kv-head copy in shard 01 differs from shard 00")


def test_flipped_bytes_fail_the_crc_before_commit(damaged, tmp_path):
    path = damaged / "consolidated.07.pth"
    info = index_pth(open_source(str(path)))["layers.0.feed_forward.w2.weight"]
    with open(path, "r+b") as f:
        f.seek(info.offset + info.nbytes // 2)
        byte = f.read(1)
        f.seek(info.offset + info.nbytes // 2)
        f.write(bytes([byte[0] ^ 0x40]))
    out = tmp_path / "out"
    assert_clean_failure(run_convert_cli(*mp16_convert_args(damaged, out), executor="ray"), out,
                         "layers.0.feed_forward.w2.weight fails its CRC-32 check")


@pytest.mark.parametrize("args,needle", [
    (["--model_name", "llama-9"], "unknown --model_name 'llama-9'"),
    (["--model_path", "Llama3.1-405B"], "implies 8 shards"),  # the FP8 SKU, given a 16-shard checkpoint
    (["--quantize_type", "fp8", "--quantize_weights", "True"], "unsupported --quantize_type 'fp8'"),
    (["--inference_server", "vllm"], "unsupported --inference_server"),
])
def test_bad_flags(tmp_path, args, needle):
    out = tmp_path / "out"
    src = synthetic_checkpoint(MODEL)
    base = ["--input_directory", str(src), "--output_directory", str(out)]
    if "--model_path" not in args and "--model_name" not in args:
        base += ["--model_path", DESCRIPTOR]
    assert_clean_failure(run_convert_cli(*base, *args), out, needle)


@pytest.mark.parametrize("args,needle", [
    (["--output_directory", ""], "--output_directory is empty"),
    (["--output_directory", " "], "--output_directory is empty"),
    (["--bucket_name", ""], "--bucket_name is empty"),
    (["--input_directory", "", "--output_directory", "out"], "--input_directory is empty"),
    (["--output_directory", "out", "--address", "auto"], "--executor local does not use"),
])
def test_flags_that_would_be_ignored_are_refused(tmp_path, args, needle):
    """An empty place or an --address the local executor cannot use: one line, not a run somewhere else."""
    from helpers import run_cli

    src = ["--input_directory", str(synthetic_checkpoint(MODEL))] if "--input_directory" not in args else []
    result = run_cli("convert", "--no_progress", "--executor", "local", "--model_path", DESCRIPTOR, *src, *args,
                     cwd=tmp_path)
    assert_clean_failure(result, tmp_path, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither ./rayconv-output nor ./out


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "out"
    result = run_convert_cli(*mp16_convert_args(synthetic_checkpoint(MODEL), out))
    assert result.returncode == 1 and f"cannot write to {out}" in result.stderr


def test_existing_foreign_output_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    (out / "bf16/scanned/0/items").mkdir(parents=True)
    marker = out / "bf16/scanned/0/items/precious"
    marker.write_text("x")
    result = run_convert_cli(*mp16_convert_args(synthetic_checkpoint(MODEL), out))
    assert result.returncode == 1 and "--restart" in result.stderr and marker.exists()


@pytest.fixture()
def small_disk(tmp_path):
    """A 3 MiB tmpfs: the outputs of MODEL (5.2 MB) do not fit."""
    with small_filesystem(tmp_path / "disk", "3M") as mount:
        yield mount


def test_out_of_disk(small_disk):
    out = small_disk / "out"
    result = run_convert_cli(*mp16_convert_args(synthetic_checkpoint(MODEL), out), executor="ray")
    assert_clean_failure(result, out, "No space left on device")


def test_demo_names_the_output_it_converted_into(tmp_path):
    """`scripts/demo.sh --output_directory X` converts into X, and its last line says X (it said ./rayconv-output)."""
    import os
    import subprocess

    from helpers import cli_env

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "elsewhere"
    result = subprocess.run(
        ["bash", os.path.join(repo, "scripts", "demo.sh"), "--input_directory", str(synthetic_checkpoint(MODEL)),
         "--model_path", DESCRIPTOR, "--executor", "local", "--no_progress", "--skip_scanned",
         "--output_directory", str(out)],
        capture_output=True, text=True, timeout=600, env=cli_env({"RAYCONV_DEMO_SETUP": "0"}))
    assert result.returncode == 0, result.stderr[-3000:]
    items = out / "bf16" / "unscanned" / "checkpoints" / "0" / "items"
    assert result.stdout.strip().splitlines()[-1] == f"Output: {out} (load_parameters_path={items})", result.stdout
    assert (items.parent / "commit_success.txt").exists()
