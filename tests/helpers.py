"""Helpers shared by the test modules: run the CLI as a user does, judge its failures, compare outputs.

Test modules import from here (and from conftest.py's fixtures), never from each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

#: Where each kind's Orbax item lives under an --output_directory (the MaxText tutorial's layout).
ITEMS = {"scanned": "bf16/scanned/0/items", "unscanned": "bf16/unscanned/checkpoints/0/items", "int8": "int8"}


# ------------------------------------------------------------------------------------------------
# The CLI in a subprocess


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment for a rayconv subprocess: CPU JAX, no usage stats, no stray RAY_ADDRESS."""
    full = dict(os.environ, JAX_PLATFORMS="cpu", RAY_USAGE_STATS_ENABLED="0")
    full.pop("RAY_ADDRESS", None)
    full.update(env or {})
    return full


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """``python -m rayconv.cli ARGS`` (the worktree's rayconv via PYTHONPATH), output captured as text."""
    return subprocess.run([sys.executable, "-m", "rayconv.cli", *args], capture_output=True, text=True,
                          env=cli_env(env), timeout=timeout, **popen)


def run_convert_cli(*args: str, executor: str = "local", env: dict[str, str] | None = None,
                    timeout: float = 300) -> subprocess.CompletedProcess:
    """``rayconv convert --no_progress --executor EXECUTOR ARGS``."""
    return run_cli("convert", "--no_progress", "--executor", executor, *args, env=env, timeout=timeout)


# ------------------------------------------------------------------------------------------------
# Failures: one line, exit 1, no traceback, nothing that looks finished


def one_error(result: subprocess.CompletedProcess) -> str:
    """The single ``rayconv: error:`` line of a run that exited 1 without a traceback."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("rayconv: error:")]
    assert result.returncode == 1 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def assert_nothing_committed(out: Path) -> None:
    """No commit marker and no step directory a user or Orbax would take for a finished checkpoint."""
    if not out.exists():
        return
    assert not list(out.rglob("commit_success.txt"))
    for step in ("bf16/scanned/0", "bf16/unscanned/checkpoints/0", "int8"):
        assert not (out / step).exists(), step


def assert_clean_failure(result: subprocess.CompletedProcess, out: Path, needle: str) -> str:
    """One error line containing ``needle``, and nothing under ``out`` that looks complete."""
    error = one_error(result)
    assert needle in error, error
    assert_nothing_committed(out)
    return error


def assert_one_line(result: subprocess.CompletedProcess, needle: str, out: Path | None = None) -> str:
    """The run failed with exit 1 and its LAST stderr line is the error (log lines may precede it)."""
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("rayconv: error:"), result.stderr[-3000:]
    assert needle in lines[-1], lines[-1]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    if out is not None and out.exists():
        assert not list(out.rglob("commit_success.txt"))
    return lines[-1]


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "3M") mounted at ``path``: a real filesystem that runs out of space."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ------------------------------------------------------------------------------------------------
# Comparing outputs leaf by leaf (tensorstore reads through the MaxText harness's reader)


def leaf_bytes(path) -> dict[str, tuple[str, bytes]]:
    """{leaf path: (stored dtype, bytes)} of one Orbax item."""
    from reference import read_leaves

    return {k: (str(v.dtype), v.tobytes()) for k, v in read_leaves(path).items()}


def output_leaves(out: Path, kinds=("scanned", "unscanned", "int8")) -> dict[str, bytes]:
    """Every leaf of every output under ``out``, keyed ``<item dir>:<leaf>``."""
    from reference import read_leaves

    found = {}
    for sub in (ITEMS[k] for k in kinds):
        for key, value in read_leaves(out / sub).items():
            found[f"{sub}:{key}"] = value.tobytes()
    return found


def assert_same_leaves(ours, theirs) -> int:
    """The two items hold the same leaves, byte for byte and dtype for dtype; returns how many."""
    from reference import read_leaves

    a, b = read_leaves(ours), read_leaves(theirs)
    assert b, f"{theirs} holds no leaves"
    assert sorted(a) == sorted(b), f"tree differs: only ours {sorted(set(a) - set(b))[:3]}, " \
                                   f"only theirs {sorted(set(b) - set(a))[:3]}"
    for key in b:
        x, y = a[key], b[key]
        assert (x.dtype, x.shape) == (y.dtype, y.shape), key
        assert x.tobytes() == y.tobytes(), f"{key}: {np.mean(x.view(np.uint8) != y.view(np.uint8)):.4%} bytes differ"
    return len(b)


#: _CHECKPOINT_METADATA fields that say when a checkpoint was written (never equal across two writers).
CHECKPOINT_TIMESTAMPS = ("init_timestamp_nsecs", "commit_timestamp_nsecs")


def _checkpoint_metadata(item: Path, step_dir: bool) -> dict:
    data = json.loads(((item.parent if step_dir else item) / "_CHECKPOINT_METADATA").read_text())
    assert all(isinstance(data.pop(key), int) for key in CHECKPOINT_TIMESTAMPS), data
    return data


def assert_same_checkpoint(ours: Path, theirs: Path, *, step_dir: bool) -> int:
    """Leaves bit-equal; _METADATA equal but for write_shape (the chunking, which follows MaxText's simulated
    devices there and rayconv's pieces here); _CHECKPOINT_METADATA equal but for its timestamps. Returns the
    number of leaves. ``step_dir``: the item sits in a step directory with its own metadata and marker."""
    from reference import read_leaves, read_metadata

    a, b = read_leaves(ours), read_leaves(theirs)
    assert sorted(a) == sorted(b), f"tree differs: only rayconv {sorted(set(a) - set(b))[:3]}, " \
                                   f"only MaxText {sorted(set(b) - set(a))[:3]}"
    for key in b:
        assert (a[key].dtype, a[key].shape) == (b[key].dtype, b[key].shape), key
        assert a[key].tobytes() == b[key].tobytes(), key

    def without_write_shape(meta: dict) -> dict:
        entries = {path: {"key_metadata": entry["key_metadata"],
                          "value_metadata": {k: v for k, v in entry["value_metadata"].items() if k != "write_shape"}}
                   for path, entry in meta["tree_metadata"].items()}
        return dict(meta, tree_metadata=entries)

    ma, mb = without_write_shape(read_metadata(ours)), without_write_shape(read_metadata(theirs))
    assert sorted(ma["tree_metadata"]) == sorted(mb["tree_metadata"])
    assert ma == mb
    assert _checkpoint_metadata(ours, step_dir) == _checkpoint_metadata(theirs, step_dir)
    assert (ours / "commit_success.txt").exists() and (not step_dir or (ours.parent / "commit_success.txt").exists())
    return len(b)


def assert_same_tree_metadata(ours, theirs) -> None:
    """Same tree paths, value types and skip_deserialize flags in the two items' _METADATA."""
    from reference import metadata_tree

    a, b = metadata_tree(ours), metadata_tree(theirs)
    assert sorted(a) == sorted(b)
    for key in b:
        assert a[key]["value_type"] == b[key]["value_type"], key
        assert a[key].get("skip_deserialize") == b[key].get("skip_deserialize"), key


def copy_down(location, target: Path) -> None:
    """Mirror a gs:// prefix (a rayconv.storage.Location) into a local directory, to read it locally."""
    for key in location.list_keys():
        path = target / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(location.read_bytes(key))


# ------------------------------------------------------------------------------------------------
# A small 405B-layout checkpoint (16 shards, 8 real kv heads repeated, params.json says 16) to damage


def mp16_model():
    """One layer of the 405B MP16 layout: the smallest input that exercises every shard-level check."""
    from rayconv.synthetic import SyntheticModel

    return SyntheticModel(family="llama-3.1", dim=256, n_layers=1, n_heads=16, n_kv_heads=8, vocab_size=256,
                          multiple_of=64, n_shards=16, seed=11)


MP16_DESCRIPTOR = "Llama3.1-405B-Instruct:bf16-mp16"


def mp16_convert_args(src: Path, out: Path, *extra: str) -> list[str]:
    """convert flags for :func:`mp16_model`'s checkpoint: every output, int8 included."""
    return ["--input_directory", str(src), "--output_directory", str(out), "--model_path", MP16_DESCRIPTOR,
            "--quantize_type", "int8", "--quantize_weights", "True", *extra]
