"""Shared fixtures: a session Ray runtime, the MaxText reference, cached synthetic checkpoints.

Everything here starts real services from the tests themselves; nothing is mocked. Caches live in
``<repo>/.cache`` so that a developer's second run does not regenerate inputs or rerun MaxText.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest_storage import *  # noqa: E402,F401,F403  (fake GCS + signed-URL server fixtures)

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("RAYCONV_TEST_CACHE", REPO / ".cache"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_session():
    """One in-process Ray runtime for tests that call convert() with the ray executor."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
                 logging_level="WARNING", runtime_env={"env_vars": {"JAX_PLATFORMS": "cpu"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def reference():
    from reference import MaxTextReference

    ref = MaxTextReference(CACHE / "maxtext-ref")
    ref.check_available()  # a missing reference env is a failure, never a skip
    return ref


def synthetic_checkpoint(model) -> Path:
    from rayconv.synthetic import ensure_checkpoint

    return ensure_checkpoint(model, CACHE / "synthetic")


def run_convert(src: Path, out: Path, *, model_name=None, model_path=None, kinds=("scanned", "unscanned"),
                quantize_type=None, executor="ray", kv_heads=None, **kwargs):
    from rayconv.engine.driver import ConvertOptions, convert
    from rayconv.source.checkpoint import list_input

    options = ConvertOptions(files=list_input(str(src)), input_display=str(src), output=str(out),
                             model_name=model_name, model_path=model_path, kinds=tuple(kinds),
                             quantize_type=quantize_type, executor=executor, kv_heads=kv_heads, progress=False,
                             **kwargs)
    return convert(options)
