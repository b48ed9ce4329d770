"""`rayconv plan`: the same command line as `convert`, the plan convert runs, and the estimate's model.

No Ray here: `convert` runs with ``--executor local`` on a tiny checkpoint; the 405B is simulated.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from conftest import synthetic_checkpoint
from rayconv.synthetic import SyntheticModel

TINY = SyntheticModel(family="llama-3.1", dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512,
                      multiple_of=64, ffn_dim_multiplier=1.3, n_shards=2, seed=16)
BF16_405B = "Llama3.1-405B-Instruct:bf16-mp16"


def rayconv(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rayconv.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_plan_takes_every_flag_convert_takes():
    """Shared option decorators: a flag added to convert is a flag of plan, with the same spellings."""
    from rayconv.cli import convert, plan

    plan_opts = {p.name: set(p.opts) for p in plan.params}
    for param in convert.params:
        assert param.name in plan_opts, f"rayconv plan lacks convert's --{param.name}"
        assert set(param.opts) <= plan_opts[param.name]


def test_plan_with_convert_command_line_plans_what_convert_runs(tmp_path):
    src = synthetic_checkpoint(TINY)
    out = tmp_path / "out"
    line = ["--input_directory", str(src), "--output_directory", str(out), "--model_name", "llama-3.1",
            "--quantize_type", "int8", "--quantize_weights", "True", "--worker_memory_gb", "0.5", "--executor",
            "local", "--num_workers", "3", "--compression", "zstd", "--restart", "--no_progress"]
    planned = rayconv("plan", "--json", *line)
    assert planned.returncode == 0, planned.stderr[-2000:]
    report = json.loads(planned.stdout)
    converted = rayconv("convert", *line)
    assert converted.returncode == 0, converted.stderr[-2000:]
    ran = json.loads((out / ".rayconv/plan.json").read_text())
    assert report["plan"]["fingerprint"] == ran["fingerprint"]
    assert report["plan"]["outputs"] == ["scanned", "unscanned", "int8"]
    assert [e["workers"] for e in report["estimates"]] == [3, 8, 16, 32]  # --num_workers joins the table
    assert report["environment"]["source"] == "local"
    assert set(report["outputs"]) == {"scanned", "unscanned", "int8"}
    assert report["bytes_written"] == sum(o["bytes"] for o in report["outputs"].values())
    # The closing line of convert reports each phase.
    done = next(line for line in converted.stderr.splitlines() if "Done in" in line)
    for phase in ("index", "plan", "ray start", "convert", "verify", "commit", "shutdown"):
        assert f"{phase} " in done, done


def test_plan_prints_a_table_by_default(tmp_path):
    # A local output: 16 MiB commit batches, no batch reserve (a simulated plan without one writes to gs://).
    result = rayconv("plan", "--simulate", "--model_path", BF16_405B, "--quantize_type", "int8", "--num_workers", "12",
                     "--worker_memory_gb", "4",
                     "--output_directory", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    for needle in ("units / pieces", "914 / 9,105", "memory per worker", "smallest worker", "estimated wall time",
                   "bottleneck", "the tutorial reports 9–10 hours", "unscanned"):
        assert needle in result.stdout, (needle, result.stdout)
    with pytest.raises(json.JSONDecodeError):
        json.loads(result.stdout)
    assert not (tmp_path / "out").exists()  # planning writes nothing


def test_plan_refuses_rates_that_are_not_positive():
    for flag in ("--vm_gbps", "--throughput_mb_s", "--meta_mb_s"):
        result = rayconv("plan", "--simulate", "--model_path", BF16_405B, flag, "0")
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [f"rayconv: error: {flag} must be a positive number, got 0.0"]


def _simulated(model_path: str, gb: float, output: str = ""):
    from rayconv.engine.driver import ConvertOptions, make_plan
    from rayconv.simulated import simulated_checkpoint

    options = ConvertOptions(files={}, input_display="", output=output, model_path=model_path, worker_memory_gb=gb,
                             kinds=("scanned", "unscanned", "int8"), quantize_type="int8")
    checkpoint = simulated_checkpoint(None, model_path)
    return checkpoint, make_plan(checkpoint, options), options


@pytest.mark.parametrize("output", ["", "gs://bucket/out"])  # gs:// workers also hold two commit batches
def test_smallest_worker_budget_is_the_planners_boundary(output):
    """At the reported budget the planner's largest piece fits a worker; one step below it does not."""
    from rayconv import forecast
    from rayconv.job import batch_reserve_bytes, piece_budget

    model_path = "Llama3.1-8B-Instruct"
    checkpoint, _, _ = _simulated(model_path, 4.0)
    smallest = forecast.smallest_worker_memory_gb(checkpoint.spec, output=output)
    for gb in (4.0, 1.0, smallest, smallest - 0.01):
        _, plan, options = _simulated(model_path, gb, output)
        largest = forecast.largest_piece(plan)
        assert largest == forecast.largest_piece_for(checkpoint.spec, piece_budget(options))
        fits = forecast.worker_memory_bytes(largest, batch_reserve_bytes(options)) <= gb * forecast.GiB
        assert fits == (gb >= smallest), (gb, largest)


def test_estimate_names_the_bottleneck():
    from rayconv import forecast

    _, plan, _ = _simulated(BF16_405B, 4.0)
    written = sum(o["bytes"] for o in forecast.output_bytes(plan).values())
    env = forecast.Environment(worker_mb_s=100.0, workers_per_vm=8, destination="local")
    batch = 16 << 20  # the local rule's commit batch
    compute = forecast.estimate(plan, written, 16, env, batch)
    assert compute["bottleneck"] == "compute"
    largest_unit = max(u.read_bytes for u in plan.units)
    assert compute["compute_seconds"] == pytest.approx((plan.input_bytes / 16 + largest_unit) / 100e6, abs=0.1)
    assert compute["estimated_seconds"] == pytest.approx(compute["compute_seconds"] + compute["fixed_seconds"], abs=0.2)

    slow_url = forecast.estimate(plan, written, 16, dataclasses.replace(env, source="meta", meta_mb_s=1.0), batch)
    assert slow_url["bottleneck"] == "read"
    assert slow_url["read_seconds"] == pytest.approx(plan.input_bytes / (16 * 8 * 1e6), abs=0.1)

    to_gcs = dataclasses.replace(env, destination="gcs", gcs_object_writes_per_s=0.5)
    manifests = forecast.estimate(plan, written, 16, to_gcs, batch)  # 0.5 write/s to each unit database's manifests
    assert manifests["bottleneck"] == "manifest writes"
    commits = forecast.unit_commits(plan, written, batch)
    assert manifests["manifest_seconds"] == pytest.approx((sum(commits) / 16 + max(commits)) / 0.5, abs=0.1)

    thin_network = forecast.estimate(plan, written, 16, dataclasses.replace(to_gcs, vm_gbps=1.0,
                                                                            gcs_object_writes_per_s=100.0), batch)
    assert thin_network["bottleneck"] == "write" and thin_network["vms"] == 2
    assert thin_network["write_seconds"] == pytest.approx(written / (2 * 1e9 / 8), abs=0.1)


def test_compute_term_is_the_cpu_rate_and_network_saturation_is_reported():
    """Issue 24 item 4: the compute term is the measured MB per CPU-second × cores per worker, and the report
    says how many such workers fill one VM's network at 32 and 100 Gbit/s (and at --vm_gbps)."""
    from rayconv import forecast

    _, plan, _ = _simulated(BF16_405B, 4.0)
    written = sum(o["bytes"] for o in forecast.output_bytes(plan).values())
    env = forecast.Environment()
    rate = forecast.MB_PER_CPU_SECOND * forecast.CORES_PER_WORKER * 1e6
    assert env.worker_mb_s * 1e6 == rate
    local = dataclasses.replace(env, source="local", destination="local")
    largest_unit = max(u.read_bytes for u in plan.units)
    compute = forecast.estimate(plan, written, 16, local, 16 << 20)
    assert compute["compute_seconds"] == pytest.approx((plan.input_bytes / 16 + largest_unit) / rate, abs=0.1)

    # To GCS the outputs (~2.5x the input) leave the VM: writing fills it first; from GCS to a local disk, reading.
    to_gcs = {s["vm_gbps"]: s for s in forecast.network_saturation(plan.input_bytes, written, env)}
    assert set(to_gcs) == {32.0, 100.0} and to_gcs[32.0]["direction"] == "write"
    for gbps in (32.0, 100.0):
        assert to_gcs[gbps]["workers"] == pytest.approx(gbps * 1e9 / 8 / (rate * written / plan.input_bytes), abs=0.05)
    reading = forecast.network_saturation(plan.input_bytes, written, dataclasses.replace(env, destination="local"))
    assert [(s["direction"], s["workers"]) for s in reading] == [("read", round(g * 1e9 / 8 / rate, 1))
                                                                 for g in (32.0, 100.0)]
    assert {s["workers"] for s in forecast.network_saturation(plan.input_bytes, written, local)} == {None}

    result = rayconv("plan", "--simulate", "--model_path", BF16_405B, "--quantize_type", "int8", "--json",
                     "--vm_gbps", "50")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert [s["vm_gbps"] for s in report["network_saturation"]] == [32.0, 50.0, 100.0]
    assert report["compute_model"]["mb_per_cpu_second"] == forecast.MB_PER_CPU_SECOND
    table = rayconv("plan", "--simulate", "--model_path", BF16_405B, "--quantize_type", "int8")
    assert table.returncode == 0, table.stderr[-2000:]
    text = " ".join(table.stdout.split())
    for needle in (f"{to_gcs[32.0]['workers']:g} workers fill 32 Gbit/s", "fill 100 Gbit/s",
                   f"{forecast.MB_PER_CPU_SECOND:g} MB of input per CPU-second"):
        assert needle in text, (needle, table.stdout)
