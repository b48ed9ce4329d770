"""A finished output is re-checked against today's source (issue 21, items 1 and 2).

Each output's commit record carries the content identity of every file it was made from (CRC-32 directories of
``.pth`` files, a Hub blob's sha256, else size + mtime + inode): a rerun whose input is other bytes refuses in one
line naming the file and recommending ``--restart``, never reporting old outputs as the new conversion; a rerun
with the same bytes (a resume, a re-downloaded Meta shard, a copied Hub cache) keeps them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from conftest import MODELS, run_convert, synthetic_checkpoint
from helpers import leaf_bytes, one_error, run_convert_cli
from rayconv.engine.identity import content_identity, hub_blob
from rayconv.errors import OutputError
from rayconv.sink.commit import STOP_EXIT_CODE
from rayconv.source.bytesource import open_source
from rayconv.source.safetensors import index_safetensors
from test_hf import hf_checkpoint

KINDS = ("scanned", "unscanned")
ITEMS = {"scanned": "bf16/scanned/0/items", "unscanned": "bf16/unscanned/checkpoints/0/items"}


def _other_weights(a: Path, b: Path) -> str:
    """B: a copy of HF checkpoint A with one weight changed, every header (and config.json) the same."""
    shutil.copytree(a, b)
    path = sorted(b.glob("model-*.safetensors"))[0]
    index = index_safetensors(open_source(str(path)), path.name)
    info = max(index.values(), key=lambda i: i.nbytes)  # a weight matrix, not a norm
    data = bytearray(path.read_bytes())
    data[info.offset:info.offset + 2] = b"\x80\x3f" if data[info.offset:info.offset + 2] != b"\x80\x3f" else b"\x00\x40"
    path.write_bytes(bytes(data))
    return path.name


def _cli(src: Path, out: Path, *extra: str, stop: str | None = None):
    return run_convert_cli("--input_directory", str(src), "--output_directory", str(out), *extra,
                           env={"RAYCONV_TEST_STOP_AFTER": stop} if stop else None)


def _leaves(out: Path) -> dict:
    return {kind: leaf_bytes(out / ITEMS[kind]) for kind in KINDS}


def test_finished_output_from_other_weights_is_refused_not_completed(tmp_path):
    """The issue's case: A converted into OUT, then B (same config.json and headers, other weights) into OUT."""
    a, b, out = hf_checkpoint("llama31-8b"), tmp_path / "b", tmp_path / "out"
    changed = _other_weights(a, b)
    run_convert(a, out, kinds=KINDS, executor="local")
    before = _leaves(out)
    error = one_error(_cli(b, out))
    assert f"{out}/bf16/" in error and "is not provably the bytes it was made from" in error, error
    assert changed in error and "--restart" in error, error
    assert _leaves(out) == before  # nothing finished was touched
    # What the message recommends converts B, and rayconv verify (inside run_convert) proves it is B's.
    run_convert(b, out, kinds=KINDS, executor="local", restart=True)
    assert _leaves(out) != before


def test_interrupted_between_outputs_never_ends_half_a_half_b(tmp_path):
    """Stopped after the scanned output was recorded (unscanned visible, not yet recorded): B is refused for both;
    A itself still resumes and finishes."""
    a, b, out = hf_checkpoint("llama31-8b"), tmp_path / "b", tmp_path / "out"
    _other_weights(a, b)
    stopped = _cli(a, out, stop="ledger:scanned")
    assert stopped.returncode == STOP_EXIT_CODE, stopped.stderr[-3000:]
    error = one_error(_cli(b, out))
    assert "is not provably the bytes it was made from" in error and "--restart" in error, error
    result = run_convert(a, out, kinds=KINDS, executor="local")  # verified against A
    assert result.units_run == 0 and set(result.outputs) == set(KINDS)


def test_interrupted_before_any_output_is_visible_is_rebuilt_from_the_new_bytes(tmp_path):
    """Stopped with the output complete in its staging directory (not renamed, not visible): B's rerun redoes
    the units and rebuilds it, instead of renaming A's into place."""
    a, b, out = hf_checkpoint("llama31-8b"), tmp_path / "b", tmp_path / "out"
    _other_weights(a, b)
    stopped = _cli(a, out, "--skip_scanned", stop="step_marker:unscanned")
    assert stopped.returncode == STOP_EXIT_CODE, stopped.stderr[-3000:]
    assert (out / "bf16/unscanned/checkpoints/0.orbax-checkpoint-tmp-rayconv/commit_success.txt").exists()
    result = run_convert(b, out, kinds=("unscanned",), executor="local")  # rayconv verify B OUT passes
    assert result.units_run > 0


def _hub_cache(src: Path, root: Path) -> Path:
    """``src`` laid out as the Hub cache does: blobs named by their sha256, a snapshot of relative symlinks."""
    snapshot = root / "snapshots" / "rev"
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in src.iterdir():
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, root / "blobs" / sha)
        (snapshot / f.name).symlink_to(f"../../blobs/{sha}")
    return snapshot


def test_a_copied_hub_cache_keeps_a_finished_output_a_plain_copy_cannot_prove_it(tmp_path):
    a, out = hf_checkpoint("llama31-8b"), tmp_path / "out"
    snapshot = _hub_cache(a, tmp_path / "cache")
    run_convert(snapshot, out, kinds=KINDS, executor="local")
    copied = tmp_path / "cache2"
    shutil.copytree(tmp_path / "cache", copied, symlinks=True)  # new inodes and mtimes, the same blob names
    again = run_convert(copied / "snapshots" / "rev", out, kinds=KINDS, executor="local")
    assert again.units_run == 0 and set(again.outputs) == set(KINDS)
    # The same bytes without the Hub's names: size, mtime and inode are all there is, and they changed.
    plain = tmp_path / "plain"
    shutil.copytree(snapshot, plain)
    with pytest.raises(OutputError, match="not provably the bytes it was made from"):
        run_convert(plain, out, kinds=KINDS, executor="local", verify=False)


def test_a_redownloaded_identical_meta_shard_keeps_a_finished_output(tmp_path):
    model = MODELS["llama2-mp2"][0]
    src, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(synthetic_checkpoint(model), src)
    run_convert(src, out, model_name=model.family, kinds=KINDS, executor="local")
    shard = src / "consolidated.01.pth"
    shutil.copy(shard, tmp_path / "fresh.pth")
    (tmp_path / "fresh.pth").replace(shard)  # the same bytes, another file
    again = run_convert(src, out, model_name=model.family, kinds=KINDS, executor="local")
    assert again.units_run == 0 and set(again.outputs) == set(KINDS)


def test_content_identity_kinds(tmp_path):
    """CRC-covered indexes are identified by their directory, Hub blobs by name, other files by their bytes' identity."""
    from rayconv.leaves import TensorInfo

    crc = {"w": TensorInfo("w", "bfloat16", (2,), 64, 4, crc32=7)}
    view = {"w": TensorInfo("w", "bfloat16", (2,), 64, 4, record=(64, 8, 9))}
    bare = {"w": TensorInfo("w", "bfloat16", (2,), 64, 4)}
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"x")
    link = tmp_path / "model.safetensors"
    link.symlink_to(os.path.relpath(blob, tmp_path))
    assert content_identity(str(link), crc, "1:2:3").startswith("crc:")
    assert content_identity(str(link), view, "1:2:3").startswith("crc:")
    assert content_identity(str(link), bare, "1:2:3") == hub_blob(str(link)) == f"sha256:{'ab' * 32}"
    assert content_identity(str(blob), bare, "1:2:3").endswith("/1:2:3")
    assert content_identity(str(blob), bare, "") == ""  # nothing to prove it by
