"""Shared fixtures: a session Ray runtime, the MaxText reference, cached synthetic checkpoints.

Everything here starts real services from the tests themselves; nothing is mocked. Caches live in
``<repo>/.cache`` so that a developer's second run does not regenerate inputs or rerun MaxText.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from rayconv.synthetic import SyntheticModel

REPO = Path(__file__).resolve().parents[1]
# tests/ (helpers, servers, the storage fixture plugin) and the MaxText reference harness (tools/maxtext_ref).
sys.path[:0] = [str(Path(__file__).parent), str(REPO / "tools" / "maxtext_ref")]

#: fake GCS + signed-URL server fixtures, loaded as a plugin.
pytest_plugins = ["conftest_storage"]

CACHE = Path(os.environ.get("RAYCONV_TEST_CACHE", REPO / ".cache"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
if os.environ.get("PYTEST_XDIST_WORKER") and "RAY_TMPDIR" not in os.environ:
    # Parallel workers (scripts/test.sh runs two): each Ray a worker starts keeps its sessions, sockets and the
    # address a ray.cluster_utils.Cluster records (ray_current_cluster) in the worker's own short temp dir.
    os.environ["RAY_TMPDIR"] = _WORKER_RAY_TMP = tempfile.mkdtemp(prefix=f"ray-{os.environ['PYTEST_XDIST_WORKER']}-",
                                                                  dir="/tmp")

    def pytest_unconfigure(config):
        shutil.rmtree(_WORKER_RAY_TMP, ignore_errors=True)


#: The files that run MaxText or start Ray clusters, heaviest first (seconds of a 2-worker run on 2026-12-07:
#: test_nnx 338, test_parity 284, test_fp8 274, test_ray_lifecycle 221, …), MaxText's alternating with Ray's so
#: that the two workers tend to run one of each (MaxText compiles on a core; a Ray test mostly waits).
#: pytest-xdist's ``--dist loadfile`` hands files out in collection order, so these start first and the many
#: short files fill in behind them, instead of one long file starting last and running alone.
HEAVY_FIRST = ["test_nnx.py", "test_ray_lifecycle.py", "test_parity.py", "test_engine.py", "test_fp8.py",
               "test_remote.py", "test_serving.py", "test_deploy.py", "test_export.py", "test_hf.py",
               "test_qwen3_export.py", "test_qwen3_reference.py", "test_qwen3_mapping.py", "test_qwen3_convert.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def ray_session():
    """One in-process Ray runtime for tests that call convert() with the ray executor."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
                 logging_level="WARNING", runtime_env={"env_vars": {"JAX_PLATFORMS": "cpu"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def reference():
    """MaxText 0.2.4, each script forked from a pre-imported server (saves ~16 s of imports per uncached run);
    the server exits at teardown, or with this process."""
    from reference import MaxTextReference

    # Not serialized across processes: each of the two test workers runs one MaxText script at a time (~2 GB at
    # most), and the suite's 67 runs (16 min on 2026-12-07) are its longest chain; a cache entry is still built once.
    ref = MaxTextReference(CACHE / "maxtext-ref", fork_server=True, serialize=False)
    ref.check_available()  # a missing reference env is a failure, never a skip
    yield ref
    ref.close()


@pytest.fixture(scope="session")
def reference_025(reference):
    """MaxText 0.2.5 with default flags (NNX trees), sharing the 0.2.4 harness's cache and lock (own fork server)."""
    ref = reference.with_maxtext("0.2.5")
    ref.check_available()  # missing 0.2.5 overlay: a failure, never a skip
    yield ref
    ref.close()


# head_dim 32 (bf16(sqrt(32)) = 5.65625 is inexact, so the query rounding is exercised).
MODELS = {
    "llama2-mp2": (SyntheticModel(family="llama-2", dim=256, n_layers=2, n_heads=8, n_kv_heads=8, vocab_size=512,
                                  multiple_of=64, ffn_dim_multiplier=None, n_shards=2, seed=2), None),
    "llama3-mp1": (SyntheticModel(family="llama-3", dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512,
                                  multiple_of=64, n_shards=1, seed=3), None),
    "llama31-mp8": (SyntheticModel(family="llama-3.1", dim=256, n_layers=2, n_heads=8, n_kv_heads=8,
                                   vocab_size=512, multiple_of=64, n_shards=8, seed=4), None),
    # The 405B MP16 layout: 16 shards, 8 real kv heads repeated on shard pairs, params.json says 16.
    "llama31-405b-mp16": (SyntheticModel(family="llama-3.1", dim=512, n_layers=2, n_heads=16, n_kv_heads=8,
                                         vocab_size=1024, multiple_of=64, ffn_dim_multiplier=1.2, n_shards=16,
                                         seed=5), "Llama3.1-405B-Instruct:bf16-mp16"),
}


@pytest.fixture(scope="session")
def converted(tmp_path_factory, ray_session):
    """rayconv output per model: one pass writing scanned, unscanned and int8."""
    results = {}

    def get(name: str):
        if name not in results:
            model, descriptor = MODELS[name]
            out = tmp_path_factory.mktemp(name)
            run_convert(synthetic_checkpoint(model), out, model_name=model.family, model_path=descriptor,
                        kinds=("scanned", "unscanned", "int8"), quantize_type="int8")
            results[name] = out
        return results[name]

    return get



def synthetic_checkpoint(model) -> Path:
    from rayconv.synthetic import ensure_checkpoint

    return ensure_checkpoint(model, CACHE / "synthetic")


def run_convert(src: Path, out: Path, *, model_name=None, model_path=None, kinds=("scanned", "unscanned"),
                quantize_type=None, executor="ray", kv_heads=None, verify=True, **kwargs):
    """Convert in-process; then, like every conversion in the tests, prove the output with rayconv verify."""
    from rayconv.engine.driver import convert
    from rayconv.job import ConvertOptions
    from rayconv.source.checkpoint import list_input
    from rayconv.verify import verify as verify_output

    options = ConvertOptions(files=list_input(str(src)), input_display=str(src), output=str(out),
                             model_name=model_name, model_path=model_path, kinds=tuple(kinds),
                             quantize_type=quantize_type, executor=executor, kv_heads=kv_heads, progress=False,
                             **kwargs)
    result = convert(options)
    if verify:
        report = verify_output(options, str(out))
        assert set(report.outputs) == set(kinds), report
    return result


def qwen3_checkpoint(name: str) -> Path:
    """The transformers-written Qwen3 fixture ``name`` (tests/qwen3_checkpoints.py), written once into the cache."""
    from qwen3_checkpoints import ensure_qwen3_checkpoint

    return ensure_qwen3_checkpoint(name, CACHE / "qwen3-hf")


def qwen3_spec(name: str):
    """The Qwen3 spec rayconv reads from that fixture's config.json."""
    import json

    from rayconv.families import qwen3

    return qwen3.spec_from_config(json.loads((qwen3_checkpoint(name) / "config.json").read_text()))


@pytest.fixture(scope="session")
def qwen3_converted(tmp_path_factory):
    """Qwen3 fixture name → ``rayconv convert``'s output for it (default flags), converted once for the whole run
    (tests/test_qwen3_convert.py and tests/test_qwen3_export.py share it)."""
    from helpers import run_convert_cli

    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            out = tmp_path_factory.mktemp(name) / "out"
            result = run_convert_cli("--input_directory", str(qwen3_checkpoint(name)), "--output_directory", str(out))
            assert result.returncode == 0, result.stderr[-3000:]
            (out.parent / "convert.log").write_text(result.stderr)  # the run's log lines, for the tests to read
            done[name] = out
        return done[name]

    return get
