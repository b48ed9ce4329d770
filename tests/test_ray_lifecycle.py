"""The Ray executor's life cycle: where it connects, how many workers it starts, how it stops.

* inside ``ray job submit`` (RAY_ADDRESS set, no ``--address``) it joins the job's cluster;
* more workers than a cluster fits: clamped on a local Ray, waited for (bounded, logged) on an existing one;
* SIGTERM mid-conversion: one line, exit 1, no Ray stack dump, nothing left running, a rerun resumes;
* SIGINT/SIGTERM while the committer commits or while ``ray.init`` runs: the same one line (not click's
  ``Aborted!``, not Ray's C++ stack dump and exit 134);
* SIGKILL of the driver: every process the run started (raylet's agents and workers included) dies too.

All real: a local Ray started by the CLI, ``ray.cluster_utils.Cluster`` and ``ray start --head`` clusters
whose processes the tests stop themselves (never ``ray stop``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import helpers
from conftest import synthetic_checkpoint
from rayconv.synthetic import SyntheticModel

# Many small units (one per layer and kind): a run lasts long enough to be interrupted between receipts.
MODEL = SyntheticModel(family="llama-3.1", dim=256, n_layers=24, n_heads=8, n_kv_heads=4, vocab_size=256,
                       multiple_of=64, n_shards=2, seed=31)
GiB = 1 << 30


def cli_env() -> dict[str, str]:
    return helpers.cli_env({"PYTHONUNBUFFERED": "1"})


def convert_argv(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rayconv.cli", "convert", "--no_progress", "--executor", "ray",
            "--input_directory", str(synthetic_checkpoint(MODEL)), "--output_directory", str(out),
            "--model_name", "llama-3.1", *extra]


def receipts(out: Path) -> int:
    folder = out / ".rayconv" / "receipts"
    return len(list(folder.glob("*.json"))) if folder.exists() else 0


def start_and_wait_for_receipts(out: Path, count: int, *extra: str) -> subprocess.Popen:
    """Start a conversion with one worker and return once ``count`` units are recorded (the run is mid-way)."""
    proc = subprocess.Popen(convert_argv(out, "--num_workers", "1", *extra), env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while receipts(out) < count:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no receipt within 300 s"
        time.sleep(0.05)
    return proc


def descendants(pid: int) -> dict[int, float]:
    """{pid: start time} of every process below ``pid`` (start time guards against pid reuse)."""
    found = {}
    for child in psutil.Process(pid).children(recursive=True):
        try:
            found[child.pid] = child.create_time()
        except psutil.Error:
            pass
    return found


def survivors(procs: dict[int, float]) -> list[str]:
    alive = []
    for pid, created in procs.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid} {proc.name()}")
        except psutil.Error:
            pass
    return alive


def wait_gone(procs: dict[int, float], seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    while (alive := survivors(procs)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def assert_one_line_error(returncode: int, stderr: str, out: Path, needle: str) -> None:
    assert returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("rayconv: error:") and needle in last, stderr[-3000:]
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr, stderr[-3000:]
    assert not list(out.rglob("commit_success.txt")) if out.exists() else True


def test_sigterm_stops_with_one_line_and_leaves_nothing_running(tmp_path):
    out = tmp_path / "out"
    proc = start_and_wait_for_receipts(out, 1)
    ray_procs = descendants(proc.pid)
    assert any(name.endswith("raylet") for name in survivors(ray_procs)), survivors(ray_procs)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    done = receipts(out)
    assert_one_line_error(proc.returncode, stderr, out, "interrupted (SIGTERM)")
    assert "rerun the same command to resume" in stderr
    assert 1 <= done < 48, f"{done} receipts: the run was not interrupted mid-way"
    assert not wait_gone(ray_procs, 30), "processes of the interrupted run still running"

    resumed = subprocess.run(convert_argv(out, "--num_workers", "1"), env=cli_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming: {done} of" in resumed.stderr
    assert (out / "bf16/scanned/0/items/commit_success.txt").exists()


# A run paused at a named step (RAYCONV_TEST_WAIT_AFTER, rayconv.sink.commit.stop_point) is signalled there.
SMALL = SyntheticModel(family="llama-3.1", dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=256,
                       multiple_of=64, n_shards=2, seed=32)


def paused_run(out: Path, step: str, release: Path) -> subprocess.Popen:
    """Start a one-worker conversion of SMALL and return once it waits at ``step`` (until ``release`` exists).

    Its own session, so a signal to its process group is a terminal's Ctrl-C and reaches nobody else."""
    argv = convert_argv(out, "--num_workers", "1", "--skip_scanned")
    argv[argv.index("--input_directory") + 1] = str(synthetic_checkpoint(SMALL))
    env = dict(cli_env(), RAYCONV_TEST_WAIT_AFTER=step, RAYCONV_TEST_WAIT_FILE=str(release))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    reached = Path(f"{release}.reached")
    deadline = time.monotonic() + 300
    while not reached.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{step} not reached within 300 s"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("step, sig", [("merge", signal.SIGINT), ("merge", signal.SIGTERM),
                                       ("ray_init", signal.SIGTERM)])
def test_a_signal_while_ray_commits_or_starts_is_one_line(tmp_path, step, sig):
    """merge: the driver waits in ray.get for the committer (Ray turns the handler's exception into a plain
    KeyboardInterrupt); ray_init: inside ray.init, the driver's core worker has just connected (Ray's C++
    failure handler would own SIGTERM from here until rayconv takes its signals back)."""
    out, release = tmp_path / "out", tmp_path / "release"
    proc = paused_run(out, step, release)
    started = descendants(proc.pid)
    proc.send_signal(sig)
    if step == "ray_init":
        release.touch()  # the signal is held until ray.init returns (the commit must not go on: no release)
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        release.touch()  # for anything the run left paused (nothing should be left)
        proc.kill()
    assert_one_line_error(proc.returncode, stderr, out, f"interrupted ({sig.name})")
    assert "Aborted!" not in stderr
    assert not wait_gone(started, 30), "processes of the interrupted run still running"


def test_sigkill_of_the_driver_takes_its_local_ray_along(tmp_path):
    out = tmp_path / "out"
    proc = start_and_wait_for_receipts(out, 1)
    started = descendants(proc.pid)
    names = {psutil.Process(p).name() for p in started if survivors({p: started[p]})}
    assert {"raylet", "gcs_server"} <= names and any(n.startswith("ray::") and "Agent" not in n for n in names), names
    proc.kill()  # only the driver, as the OOM killer would
    proc.communicate(timeout=60)
    alive = wait_gone(started, 20)
    assert not alive, f"still running 20 s after the driver was killed: {alive}"


def test_more_workers_than_a_local_ray_fits_are_clamped_not_waited_for(tmp_path):
    """--num_workers far above what the machine fits: a warning saying what fits, then a normal run."""
    out = tmp_path / "out"
    # One worker's memory is a third of the machine: at most two fit whatever the CPU count.
    memory_gb = round(psutil.virtual_memory().total / GiB / 3, 1)
    result = subprocess.run(convert_argv(out, "--num_workers", "64", "--worker_memory_gb", str(memory_gb),
                                         "--skip_scanned"),
                            env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--num_workers 64: this machine fits" in result.stderr
    assert (out / "bf16/unscanned/checkpoints/0/items/commit_success.txt").exists()


def test_workers_an_existing_cluster_cannot_schedule_are_waited_for_then_given_up(tmp_path, monkeypatch):
    """An existing cluster: a warning with what fits, a bounded wait, then the workers that did start, or one
    line when none can. And without --address, rayconv starts its own Ray instead of joining that cluster."""
    import tempfile

    from ray.cluster_utils import Cluster

    # Cluster() records its address in <RAY_TMPDIR>/ray/ray_current_cluster, where a bare ray.init() finds it:
    # a private RAY_TMPDIR (short: unix socket paths are limited) keeps other Ray users on this machine out.
    ray_tmp = tempfile.mkdtemp(prefix="rl-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "include_dashboard": False,
                                      "object_store_memory": 128 * 1024 * 1024})
    try:
        cluster.add_node(num_cpus=1, memory=2 * GiB, object_store_memory=128 * 1024 * 1024)
        cluster.wait_for_nodes()
        assert (Path(ray_tmp) / "ray" / "ray_current_cluster").exists()
        out = tmp_path / "partial"
        partial = subprocess.run(convert_argv(out, "--address", cluster.address, "--num_workers", "2",
                                              "--worker_memory_gb", "1", "--worker_start_timeout", "30",
                                              "--skip_scanned"),
                                 env=cli_env(), capture_output=True, text=True, timeout=600)
        assert partial.returncode == 0, partial.stderr[-3000:]
        assert "--num_workers 2: the Ray cluster fits 1 now" in partial.stderr
        # 30 s: the bound covers starting the worker process too, which takes seconds on a loaded machine.
        assert "1 of 2 workers could not be scheduled within 30 s" in partial.stderr
        assert (out / "bf16/unscanned/checkpoints/0/items/commit_success.txt").exists()

        out = tmp_path / "none"
        started = time.monotonic()
        none = subprocess.run(convert_argv(out, "--address", cluster.address, "--num_workers", "1",
                                           "--worker_memory_gb", "4", "--worker_start_timeout", "3",
                                           "--skip_scanned"),
                              env=cli_env(), capture_output=True, text=True, timeout=600)
        assert time.monotonic() - started < 120
        assert_one_line_error(none.returncode, none.stderr, out, "no worker could be scheduled within 3 s")
        assert "each needs 1 CPU and 4 GiB of memory on one node" in none.stderr

        out = tmp_path / "own"
        own = subprocess.run(convert_argv(out, "--num_workers", "1", "--skip_scanned"), env=cli_env(),
                             capture_output=True, text=True, timeout=600)
        assert own.returncode == 0, own.stderr[-3000:]
        assert "1 nodes; starting 1 workers" in own.stderr  # its own Ray, not the 2-node cluster above
    finally:
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.timeout(900)
def test_ray_job_submit_without_address_joins_the_jobs_cluster(tmp_path):
    """`ray job submit -- rayconv convert …` with no --address: RAY_ADDRESS is set in the job, rayconv joins it."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from ray_cluster import LocalRayCluster, bin_path

    env = {**cli_env(), "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cluster = LocalRayCluster(num_cpus=2, memory=4 * GiB, env=env).start()
    try:
        out = tmp_path / "out"
        argv = [a for a in convert_argv(out, "--num_workers", "1", "--worker_memory_gb", "1", "--skip_scanned")]
        submitted = subprocess.run([bin_path("ray"), "job", "submit", "--address", cluster.address, "--",
                                    *[json.dumps(a) if " " in a else a for a in argv]],
                                   env=env, capture_output=True, text=True, timeout=600)
        client = JobSubmissionClient(cluster.address)
        job = client.list_jobs()[-1]
        logs = client.get_job_logs(job.submission_id)
        assert submitted.returncode == 0, logs[-4000:] + submitted.stderr[-2000:]
        assert client.get_job_status(job.submission_id) == JobStatus.SUCCEEDED, logs[-4000:]
        assert "1 nodes; starting 1 workers" in logs, logs[-4000:]
        assert (out / "bf16/unscanned/checkpoints/0/items/commit_success.txt").exists()
    finally:
        cluster.stop()
