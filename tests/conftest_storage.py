"""Pytest fixtures for the storage layer: a fake GCS server, a signed-URL server, small checkpoints.

Loaded as a pytest plugin by ``tests/conftest.py`` (``pytest_plugins = ["conftest_storage"]``), so every
test module sees the fixtures without importing them; the GCS server is a session fixture (one server).
"""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

import pytest

from servers import FakeGcs, SignedUrlServer

__all__ = ["fake_gcs", "gcs_bucket", "gcs_prefix", "small_checkpoint", "signed_url_server",
           "meta_url_tree", "GCS_BUCKET"]

GCS_BUCKET = "rayconv-test"

_gcs: FakeGcs | None = None
_gcs_users = 0


@pytest.fixture(scope="session")
def fake_gcs():
    """A running fake-gcs-server with the emulator variables set in os.environ for the session."""
    global _gcs, _gcs_users
    if _gcs is None:
        _gcs = FakeGcs().start()
        _gcs.create_bucket(GCS_BUCKET)
        _gcs._env_cm = _gcs.environment()
        _gcs._env_cm.__enter__()
    _gcs_users += 1
    yield _gcs
    _gcs_users -= 1
    if _gcs_users == 0:
        _gcs._env_cm.__exit__(None, None, None)
        _gcs.stop()
        _gcs = None


@pytest.fixture(scope="session")
def gcs_bucket(fake_gcs) -> str:
    return GCS_BUCKET


@pytest.fixture
def gcs_prefix(fake_gcs, request):
    """A fresh ``gs://rayconv-test/<test name>-<uuid>`` Location for one test."""
    from rayconv.storage import Location

    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:60]
    return Location.parse(f"gs://{GCS_BUCKET}/{name}-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    """A 2-shard synthetic Llama 3.1 checkpoint (a few MB) with params.json and checklist.chk."""
    from rayconv.synthetic import SyntheticModel, write_checkpoint

    model = SyntheticModel(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=1024, n_shards=2)
    return write_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "Llama-3.1-8B")


@pytest.fixture
def meta_url_tree(small_checkpoint, tmp_path) -> Path:
    """A server root holding the checkpoint under Meta's folder name for ``Llama3.1-8B``."""
    root = tmp_path / "cdn"
    root.mkdir()
    shutil.copytree(small_checkpoint, root / "Llama-3.1-8B")
    return root


@pytest.fixture
def signed_url_server(meta_url_tree):
    """A SignedUrlServer over ``meta_url_tree``; ``.url()`` is the Meta-style URL with ``*``."""
    with SignedUrlServer(meta_url_tree) as server:
        yield server
