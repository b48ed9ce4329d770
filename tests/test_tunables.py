"""Issue 20 item 5: the command line only says what to acquire and which knobs to use; the job acquires the input
(rayconv.acquire, the driver's first phase) and carries its tunables in the options (rayconv.tunables), never
through ``os.environ``. (That the workers get them through the job context: tests/test_storage_timeout_workers.py.)
"""

from __future__ import annotations

import os

import pytest

from helpers import run_cli
from rayconv import tunables
from rayconv.acquire import acquire
from rayconv.cli.options import build_options
from rayconv.errors import ConversionError
from rayconv.source.checkpoint import list_input
from rayconv.source.http import redact
from rayconv.tunables import Tunables, from_env

DESCRIPTOR = "Llama3.1-8B"  # the small_checkpoint fixture's, under Meta's folder Llama-3.1-8B


def parse(*args: str):
    """What flag parsing makes of a convert command line: click's parameters (callbacks included) → options."""
    from rayconv.cli import convert

    return build_options(convert.make_context("convert", list(args)).params)


def test_flag_parsing_stages_nothing_the_acquire_phase_does(signed_url_server, small_checkpoint, tmp_path):
    dest = tmp_path / "base"
    options = parse("--meta_url", signed_url_server.url(), "--model_path", DESCRIPTOR, "--download_directory",
                    str(dest), "--output_directory", str(tmp_path / "out"))
    assert signed_url_server.requests == [] and not dest.exists()  # not even checklist.chk was asked for
    assert options.files == {} and options.acquire.download_directory == str(dest)
    assert "Signature=" not in repr(options.acquire)  # the signed URL is data, never shown

    staged = acquire(options)
    assert (dest / "checklist.chk").read_bytes() == (small_checkpoint / "checklist.chk").read_bytes()
    assert staged.files == list_input(str(dest)) and staged.input_display == str(dest) and staged.acquire is None
    assert acquire(staged) is staged  # nothing left to acquire


def test_streaming_from_the_url_resolves_in_the_acquire_phase(signed_url_server, tmp_path):
    options = parse("--meta_url", signed_url_server.url(), "--model_path", DESCRIPTOR, "--output_directory",
                    str(tmp_path / "out"))
    assert signed_url_server.requests == [] and options.files == {}
    streamed = acquire(options)
    assert signed_url_server.file_requests("checklist.chk")
    assert set(streamed.files) >= {"params.json", "consolidated.00.pth", "consolidated.01.pth"}
    assert all(uri.startswith("http://127.0.0.1:") for uri in streamed.files.values())
    assert streamed.input_display == f"{redact(signed_url_server.url())} ({DESCRIPTOR})"
    assert "Signature=" not in streamed.input_display


def test_convert_stages_as_the_first_phase_of_the_job(signed_url_server, small_checkpoint, tmp_path):
    dest, out = tmp_path / "base", tmp_path / "out"
    result = run_cli("convert", "--meta_url", signed_url_server.url(), "--model_path", f"{DESCRIPTOR}:bf16-mp2",
                     "--download_directory", str(dest), "--output_directory", str(out), "--executor", "local",
                     "--no_progress")
    assert result.returncode == 0, result.stderr[-3000:]
    closing = next(line for line in result.stderr.splitlines() if "Done in" in line)
    assert "(acquire " in closing, closing  # timed as the job's first phase
    assert f"Reading checkpoint index from {dest}" in result.stderr
    assert (dest / "checklist.chk").exists() and (out / "bf16/scanned/0/commit_success.txt").exists()


def test_timeout_flags_and_env_overrides_are_the_options_tunables(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYCONV_GCS_CHUNK_MB", "4")
    monkeypatch.setenv("RAYCONV_LOCK_STALE_SECONDS", "9.5")
    monkeypatch.setenv("RAYCONV_META_SHARD_SIZES", "ignore")
    monkeypatch.setenv("RAYCONV_HTTP_RETRIES", "")  # set but empty: not given
    monkeypatch.delenv("RAYCONV_HTTP_TIMEOUT_S", raising=False)
    environment, installed = dict(os.environ), tunables.current()
    options = parse("--input_directory", str(tmp_path), "--http_timeout_s", "1.5", "--storage_timeout_s", "2.5")
    assert dict(os.environ) == environment  # nothing published through the environment
    assert tunables.current() == installed  # parsing installs nothing: the job does
    assert options.tunables == Tunables(http_timeout_s=1.5, storage_timeout_s=2.5, gcs_chunk_mb=4, lock_stale_s=9.5,
                                        meta_shard_sizes=False)
    monkeypatch.setenv("RAYCONV_HTTP_TIMEOUT_S", "4")  # the flag's own variable (click reads it)
    assert parse("--input_directory", str(tmp_path)).tunables.http_timeout_s == 4.0
    assert parse("--input_directory", str(tmp_path), "--http_timeout_s", "5").tunables.http_timeout_s == 5.0


def test_from_env_reads_the_documented_variables_and_refuses_bad_values():
    assert from_env({}) == Tunables()
    assert from_env({"RAYCONV_HTTP_CONCURRENCY": "3", "RAYCONV_GCS_PROCESS_INFLIGHT": "5"}, http_retries=0) == \
        Tunables(http_concurrency=3, gcs_process_inflight=5, http_retries=0)
    assert from_env({"RAYCONV_META_SHARD_SIZES": "CHECK"}).meta_shard_sizes is True
    for variable, value, needle in (("RAYCONV_HTTP_CHUNK_MB", "lots", "whole number"),
                                    ("RAYCONV_GCS_CONCURRENCY", "0", "whole number of at least 1"),
                                    ("RAYCONV_GCS_CHUNK_MB", "1.5", "whole number"),
                                    ("RAYCONV_LOCK_STALE_SECONDS", "inf", "positive number of seconds"),
                                    ("RAYCONV_META_SHARD_SIZES", "no", "ignore")):
        with pytest.raises(ConversionError, match=needle) as info:
            from_env({variable: value})
        assert f"{variable}={value!r}" in str(info.value)
    with pytest.raises(ConversionError, match="storage_timeout_s"):
        Tunables(storage_timeout_s=0)


def test_a_bad_override_is_one_line_not_a_traceback(tmp_path):
    """Read once at the command line's entry: before, rayconv.source.http parsed it at import (a ValueError)."""
    result = run_cli("convert", "--meta_url", "http://127.0.0.1:9/*?Signature=x", "--model_path", DESCRIPTOR,
                     "--output_directory", str(tmp_path / "out"), env={"RAYCONV_HTTP_CHUNK_MB": "lots"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("rayconv: error:")]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert errors == ["rayconv: error: RAYCONV_HTTP_CHUNK_MB='lots' is not a whole number of at least 1"], errors


def test_ray_workers_get_the_test_hooks_but_not_the_knobs_through_the_environment(monkeypatch):
    """On an existing cluster the workers' environment is forwarded; rayconv's knobs are not in it (they are in the
    job context), the test hooks and storage endpoints are."""
    from rayconv.engine.executors import _forwarded_env

    monkeypatch.setenv("RAYCONV_HTTP_CHUNK_MB", "4")
    monkeypatch.setenv("RAYCONV_TEST_STOP_AFTER", "intent")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")
    forwarded = _forwarded_env()
    assert forwarded["RAYCONV_TEST_STOP_AFTER"] == "intent" and "STORAGE_EMULATOR_HOST" in forwarded
    assert not [name for name in forwarded if name.startswith("RAYCONV_") and not name.startswith("RAYCONV_TEST_")]


def test_the_lock_and_the_byte_sources_take_this_processes_tunables(tmp_path):
    from rayconv.sink.lock import OutputLock
    from rayconv.source.gcs import GcsObject
    from rayconv.source.http import HttpFile
    from rayconv.storage import Location

    previous = tunables.current()
    tunables.install(Tunables(lock_stale_s=8.0, http_retries=1, http_chunk_mb=2, gcs_concurrency=3))
    try:
        lock = OutputLock(Location.parse(str(tmp_path)))
        http, gcs = HttpFile("http://127.0.0.1:9/x", size=1), GcsObject("gs://b/x", size=1)
    finally:
        tunables.install(previous)
    assert (lock.stale, lock.interval) == (8.0, 2.0)
    assert (http.retries, http.chunk_size, gcs.concurrency) == (1, 2 << 20, 3)
