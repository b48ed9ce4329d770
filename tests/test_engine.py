"""The Ray engine: same bytes on 1 node, several nodes and in-process; plans not tensors through
Ray; per-worker memory under budget; faults (killed worker, killed driver) and resume.

Every conversion here is checked with ``rayconv verify`` (re-read the source, recompute, compare)
and, where two paths are compared, leaf by leaf.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import run_convert, synthetic_checkpoint
from helpers import output_leaves as leaves
from helpers import run_cli
from rayconv.synthetic import PRESETS, SyntheticModel

MODEL = SyntheticModel(family="llama-3.1", dim=512, n_layers=3, n_heads=16, n_kv_heads=8, vocab_size=1024,
                       multiple_of=64, ffn_dim_multiplier=1.2, n_shards=16, seed=21)
DESCRIPTOR = "Llama3.1-405B-Instruct:bf16-mp16"
KINDS = ("scanned", "unscanned", "int8")
GiB = 1 << 30


def verify(src: Path, out: Path, model_path: str = DESCRIPTOR, model_name: str | None = None) -> str:
    args = [sys.executable, "-m", "rayconv.cli", "verify", str(src), str(out)]
    args += ["--model_path", model_path] if model_path else ["--model_name", model_name]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def receipts(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / ".rayconv/receipts").glob("*.json"))]


def cli(*args: str, timeout: int = 600, **popen) -> subprocess.CompletedProcess:
    return run_cli("convert", "--no_progress", *args, timeout=timeout, **popen)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The reference path: the local executor, one unit at a time in one process."""
    out = tmp_path_factory.mktemp("local")
    run_convert(synthetic_checkpoint(MODEL), out, model_path=DESCRIPTOR, kinds=KINDS, quantize_type="int8",
                executor="local")
    return out


def test_multi_node_cluster_is_bit_equal_to_single_process(tmp_path, single_process):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "include_dashboard": False,
                                      "object_store_memory": 128 * 1024 * 1024})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, memory=3 * GiB, object_store_memory=128 * 1024 * 1024)
        cluster.wait_for_nodes()
        out = tmp_path / "out"
        result = cli("--input_directory", str(synthetic_checkpoint(MODEL)), "--output_directory", str(out),
                     "--model_path", DESCRIPTOR, "--quantize_type", "int8", "--quantize_weights", "True",
                     "--address", cluster.address, "--worker_memory_gb", "1", "--restart")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "3 nodes; starting 2 workers" in result.stderr
    finally:
        cluster.shutdown()
    nodes = {r["node"] for r in receipts(out)}
    assert len(nodes) == 2, f"units ran on {len(nodes)} node(s)"
    assert leaves(out) == leaves(single_process)
    verify(synthetic_checkpoint(MODEL), out)


class _PlasmaWatch(threading.Thread):
    """Samples the object store's used bytes while a conversion runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        import ray
        from ray._private.internal_api import memory_summary

        address = ray.get_runtime_context().gcs_address
        while not self.stop.is_set():
            text = memory_summary(address=address, stats_only=True)
            match = re.search(r"Plasma memory usage (\d+) MiB", text)
            self.samples.append(int(match.group(1)) << 20 if match else -1)
            self.stop.wait(0.5)


def test_budget_bounds_worker_memory_and_nothing_goes_through_the_object_store(tmp_path, ray_session):
    """A ~2 GB 405B-layout checkpoint through 0.6 GiB workers: >3x the budget per worker."""
    model = PRESETS["405b-2gb"]
    src = synthetic_checkpoint(model)
    budget_gb = 0.6
    watch = _PlasmaWatch()
    watch.start()
    try:
        result = run_convert(src, tmp_path / "out", model_path=model.descriptor, kinds=KINDS,
                             quantize_type="int8", worker_memory_gb=budget_gb)
    finally:
        watch.stop.set()
        watch.join()
    assert result.bytes_read >= 2e9 and result.bytes_read > 3 * budget_gb * GiB
    peaks = [r["peak_rss"] for r in receipts(tmp_path / "out")]
    assert max(peaks) < budget_gb * GiB, f"worker peak RSS {max(peaks) / GiB:.2f} GiB over the budget"
    assert watch.samples and min(watch.samples) >= 0, "could not read plasma usage"
    assert max(watch.samples) < 2 << 20, f"object store held {max(watch.samples)} bytes"
    print(f"\nworker peak RSS {max(peaks) / 2**20:.0f} MiB for budget {budget_gb} GiB; "
          f"plasma max {max(watch.samples)} B over {len(watch.samples)} samples; {result.seconds:.1f}s")


def _converter_worker_pids() -> list[int]:
    """Ray worker processes (descendants of this test process) that host a ConverterWorker actor."""
    import psutil

    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "ConverterWorker" in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


def test_killed_worker_is_replaced_and_output_is_bit_equal(tmp_path, ray_session, single_process):
    out = tmp_path / "out"
    errors: list[BaseException] = []
    kills: list[int] = []

    def killer() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not kills:
            done = len(list((out / ".rayconv/receipts").glob("*.json"))) if out.exists() else 0
            pids = _converter_worker_pids()
            if done >= 2 and pids:
                os.kill(pids[0], signal.SIGKILL)
                kills.append(pids[0])
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        run_convert(synthetic_checkpoint(MODEL), out, model_path=DESCRIPTOR, kinds=KINDS, quantize_type="int8",
                    num_workers=2, unit_budget=1 << 16)
    except BaseException as exc:  # noqa: BLE001 - reported below with context
        errors.append(exc)
    thread.join()
    assert not errors, errors
    assert kills, "no worker was killed (conversion finished too fast?)"
    assert leaves(out) == leaves(single_process)


def test_killed_driver_resumes_without_redoing_units(tmp_path):
    src = synthetic_checkpoint(PRESETS["demo"])
    out = tmp_path / "out"
    args = ["--input_directory", str(src), "--output_directory", str(out), "--model_path", DESCRIPTOR,
            "--quantize_type", "int8", "--quantize_weights", "True", "--num_workers", "1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen([sys.executable, "-m", "rayconv.cli", "convert", "--no_progress", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(receipts(out) if (out / ".rayconv/receipts").exists() else []) < 4:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {r["unit"] for r in receipts(out)}
    assert 4 <= len(done_before)
    assert not (out / "bf16/scanned/0").exists() and not (out / "int8").exists()

    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    total = int(re.search(r"Resuming: \d+ of (\d+) units already done", resumed.stderr).group(1))
    match = re.search(r"(\d+) units \((\d+) resumed\)", resumed.stderr)
    assert int(match.group(2)) >= len(done_before) and int(match.group(1)) + int(match.group(2)) == total
    after = {r["unit"]: r for r in receipts(out)}
    assert done_before <= set(after)
    verify(src, out)

    again = cli(*args, "--restart")
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(rf"{total} units \(0 resumed\)", again.stderr), again.stderr[-2000:]
    verify(src, out)


def test_verify_names_the_first_differing_leaf(tmp_path, single_process):
    import shutil

    import numpy as np
    import tensorstore as ts

    out = tmp_path / "out"
    shutil.copytree(single_process, out)
    item = out / "bf16/unscanned/checkpoints/0/items"
    spec = {"driver": "zarr3", "kvstore": {"driver": "ocdbt", "base": f"file://{item}/",
                                           "path": "params.params.decoder.layers_1.mlp.wo.kernel/"}}
    store = ts.open(spec, open=True).result()
    value = store[0, 0].read().result()
    store[0, 0].write(np.asarray(value.astype(np.float32) + 1).astype(value.dtype)).result()
    result = subprocess.run([sys.executable, "-m", "rayconv.cli", "verify", str(synthetic_checkpoint(MODEL)), str(out),
                             "--model_path", DESCRIPTOR], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert "unscanned leaf params/params/decoder/layers_1/mlp/wo/kernel differs" in result.stderr


def test_verify_refuses_an_output_missing_one_of_its_recorded_checkpoints(tmp_path, single_process):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(single_process, out)
    (out / "int8").rename(tmp_path / "int8-moved-away")  # the other two outputs are intact
    result = subprocess.run([sys.executable, "-m", "rayconv.cli", "verify", str(synthetic_checkpoint(MODEL)), str(out),
                             "--model_path", DESCRIPTOR], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rayconv: error: ") and "int8 checkpoint" in lines[0], lines
    assert "plan.json" in lines[0] and str(out / "int8") in lines[0], lines


def test_plan_prints_the_plan_convert_ran(single_process):
    """`rayconv plan` and `rayconv convert` build the plan with the same code: same fingerprint."""
    result = subprocess.run([sys.executable, "-m", "rayconv.cli", "plan", "--json", "--input_directory",
                             str(synthetic_checkpoint(MODEL)), "--model_path", DESCRIPTOR, "--quantize_type", "int8"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    ran = json.loads((single_process / ".rayconv/plan.json").read_text())
    assert report["plan"]["fingerprint"] == ran["fingerprint"]
    assert [e["workers"] for e in report["estimates"]] == [8, 16, 32]

    simulated = subprocess.run([sys.executable, "-m", "rayconv.cli", "plan", "--json", "--simulate", "--model_path",
                                "Llama3.1-405B-Instruct:bf16-mp16", "--quantize_type", "int8"],
                               capture_output=True, text=True, timeout=300)
    assert simulated.returncode == 0, simulated.stderr[-2000:]
    plan = json.loads(simulated.stdout)["plan"]
    assert plan["model"] == "llama3.1-405b" and plan["shards"] == 16 and plan["input_bytes"] > 8e11
