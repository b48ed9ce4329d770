"""Hostile or damaged input around the download and the input directory (issue 11 items 4 and 10):
names from a server's checklist.chk, stalled servers, malformed URLs, ambiguous shard names, md5 of a
local or gs:// input against its checklist.chk. Real servers (signed-URL HTTP server, fake-gcs-server)
and the real CLI; nothing mocked."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from rayconv import catalog
from rayconv.errors import SourceError, SpecError, one_line_reason
from rayconv.source.checkpoint import list_input, shard_files
from rayconv.source.hashing import verify_input
from rayconv.source.http import HttpFile, HttpStatusError
from rayconv.staging import stage
from rayconv.storage import Location
from rayconv.synthetic import SyntheticModel, write_checkpoint
from helpers import one_error, run_cli
from servers import SignedUrlServer

DESCRIPTOR = "Llama3.1-8B"
FOLDER = "Llama-3.1-8B"
SHARD = "consolidated.01.pth"
TINY = SyntheticModel(dim=256, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=64, n_shards=2, seed=11)


def one_line(text: str) -> str:
    assert text and "\n" not in text, text
    for secret in ("Policy=", "Signature=", "Key-Pair-Id="):
        assert secret not in text, text
    return text


def error_line(result: subprocess.CompletedProcess) -> str:
    """Exit 1, no traceback, exactly one ``rayconv: error:`` line, no secret in it; returns it."""
    return one_line(one_error(result))


@contextlib.contextmanager
def rayconv_log(caplog, level: int = logging.WARNING):
    """Capture the ``rayconv`` loggers (the CLI's setup_logging stops them propagating to the root)."""
    logger = logging.getLogger("rayconv")
    old_level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(level)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(old_level)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ---------------------------------------------------------------------------------------------
# Item 4: names from checklist.chk are plain checkpoint file names, written inside the destination


def hostile_tree(root: Path, small_checkpoint: Path, name: str) -> None:
    """A server folder whose checklist.chk also lists ``name``, with the bytes a naive client would fetch."""
    folder = root / FOLDER
    shutil.copytree(small_checkpoint, folder)
    payload = b"overwrite me\n"
    for target in (root / "x", folder / "a" / "b"):  # what '../x' and 'a/b' resolve to on the server
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(payload)
    with open(folder / "checklist.chk", "a") as f:
        f.write(f"{hashlib.md5(payload).hexdigest()}  {name}\n")


@pytest.fixture(params=["local", "gs"])
def dest_kind(request):
    return request.param


@pytest.mark.parametrize("hostile", ["ABSOLUTE", "../x", "a/b", "./../x", "..", "con\\x"])
def test_hostile_checklist_names_write_nothing(hostile, dest_kind, small_checkpoint, tmp_path, request):
    victim = tmp_path / "victim.txt"
    name = str(victim) if hostile == "ABSOLUTE" else hostile
    hostile_tree(tmp_path / "cdn", small_checkpoint, name)
    if dest_kind == "local":
        dest = Location.parse(str(tmp_path / "work" / "base"))
        (tmp_path / "work").mkdir()
        bucket = None
        before = files_under(tmp_path)
    else:
        dest = request.getfixturevalue("gcs_prefix").join("base")
        bucket = Location.parse(f"gs://{dest.bucket}")
        before = set(bucket.list_keys())
    with SignedUrlServer(tmp_path / "cdn") as server:
        with pytest.raises(SourceError) as info:
            stage(server.url(), DESCRIPTOR, dest, part_size=256 << 10)
        text = one_line(str(info.value))
        assert "checklist.chk" in text and repr(name.removeprefix("./")) in text, text
        # Only the checklist was fetched: nothing it names was even requested.
        assert {r[1] for r in server.requests} == {f"/{FOLDER}/checklist.chk"}
    if bucket is None:
        assert files_under(tmp_path) == before and not victim.exists()
    else:
        assert set(bucket.list_keys()) == before


def test_hostile_checklist_through_the_cli(small_checkpoint, tmp_path):
    hostile_tree(tmp_path / "cdn", small_checkpoint, "../x")
    with SignedUrlServer(tmp_path / "cdn") as server:
        result = run_cli("convert", "--meta_url", server.url(), "--model_path", DESCRIPTOR, "--download_directory",
                     str(tmp_path / "dl" / "base"), "--output_directory", str(tmp_path / "out"), "--executor", "local")
    assert "'../x'" in error_line(result)
    assert not (tmp_path / "dl" / "x").exists() and not (tmp_path / "out").exists()


def test_unknown_plain_names_are_ignored_with_a_warning(small_checkpoint, tmp_path, caplog):
    folder = tmp_path / "cdn" / FOLDER
    shutil.copytree(small_checkpoint, folder)
    extra = {"LICENSE": b"license\n", "fp8_scales_0.pt": b"not for a bf16 SKU\n"}
    with open(folder / "checklist.chk", "a") as f:
        for name, data in extra.items():
            (folder / name).write_bytes(data)
            f.write(f"{hashlib.md5(data).hexdigest()}  {name}\n")
    dest = tmp_path / "base"
    with SignedUrlServer(tmp_path / "cdn") as server, rayconv_log(caplog):
        stage(server.url(), DESCRIPTOR, str(dest), part_size=256 << 10)
    staged = {p.name for p in dest.iterdir() if p.is_file()}
    assert staged == {"checklist.chk", "params.json", "tokenizer.model", "consolidated.00.pth", SHARD}
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "'LICENSE'" in warned and "'fp8_scales_0.pt'" in warned and "ignored" in warned


@pytest.mark.parametrize("name, kind", [
    ("consolidated.07.pth", "shard"), ("params.json", "params"), ("checklist.chk", "checklist"),
    ("tokenizer.model", "tokenizer"), ("fp8_scales_3.pt", "fp8_scales"), ("LICENSE", None), ("", None),
    ("/etc/passwd", None), ("../params.json", None), ("a/params.json", None), ("params.json\x00", None),
    ("C:params.json", None), (".", None), ("consolidated.00.pth/", None),
])
def test_checkpoint_file_kind(name, kind):
    assert catalog.checkpoint_file_kind(name) == kind


def test_catalog_fp8_sku_and_descriptor():
    from rayconv.families import Descriptor

    for text in ("Llama3.1-405B-Instruct", "Llama3.1-405B", "Llama3.1-405B:fp8-mp8"):
        model = catalog.lookup(text)
        assert (model.dtype, model.shards, model.fp8) == ("fp8", 8, True)
        assert model.folder == ("Llama-3.1-405B-Instruct" if "Instruct" in text else "Llama-3.1-405B")
        assert model.files[3:11] == [f"fp8_scales_{i}.pt" for i in range(8)]
        descriptor = Descriptor.parse(text)  # the conversion side of the same catalog entry
        assert (descriptor.sku, descriptor.shards) == ("fp8", 8)
    bf16 = catalog.lookup("Llama3.1-405B-Instruct:bf16-mp8")
    assert (bf16.dtype, bf16.shards, bf16.folder) == ("bf16", 8, "Llama-3.1-405B-Instruct-MP8")
    assert Descriptor.parse("Llama3.1-405B-Instruct:bf16-mp8").shards == 8
    with pytest.raises(SpecError, match="unknown 405B variant"):
        catalog.lookup("Llama3.1-405B:int4-mp8")


# ---------------------------------------------------------------------------------------------
# Item 10: a stalled server is named, bounded by --http_timeout_s, and retried with a log line


def test_stalled_read_times_out_naming_file_and_range(signed_url_server, caplog):
    url = signed_url_server.url().replace("*", f"{FOLDER}/{SHARD}")
    src = HttpFile(url, timeout=1.0, retries=1)
    src.size()
    signed_url_server.stall[f"{FOLDER}/{SHARD}"] = (4.0, None)
    start = time.monotonic()
    with rayconv_log(caplog), pytest.raises(SourceError) as info:
        src.read(1000, 50_000)
    elapsed = time.monotonic() - start
    text = one_line(str(info.value))
    assert SHARD in text and "bytes 1000-50999" in text and "no data for 1 s" in text, text
    assert elapsed < 8, elapsed
    waits = [r.getMessage() for r in caplog.records if "waiting for bytes" in r.getMessage()]
    assert waits and SHARD in waits[0] and "1000-50999" in waits[0] and "retry 1 of 1" in waits[0], waits


def test_stall_once_is_retried_and_logged(signed_url_server, small_checkpoint, caplog):
    url = signed_url_server.url().replace("*", f"{FOLDER}/{SHARD}")
    src = HttpFile(url, timeout=1.0, retries=2)
    src.size()
    signed_url_server.stall[f"{FOLDER}/{SHARD}"] = (3.0, 1)
    with rayconv_log(caplog):
        data = src.read(10, 200_000)
    assert data == (small_checkpoint / SHARD).read_bytes()[10:200_010]
    assert any("waiting for bytes 10-200009" in r.getMessage() for r in caplog.records)


def test_timeout_flag_through_the_cli(signed_url_server, tmp_path):
    # params.json is the first file convert reads through the URL (checklist.chk is read by resolve).
    signed_url_server.stall[f"{FOLDER}/params.json"] = (6.0, None)
    start = time.monotonic()
    result = run_cli("convert", "--meta_url", signed_url_server.url(), "--model_path", DESCRIPTOR, "--http_timeout_s",
                 "1", "--executor", "local", "--output_directory", str(tmp_path / "out"),
                 env={"RAYCONV_HTTP_RETRIES": "1"})
    elapsed = time.monotonic() - start
    line = error_line(result)
    assert "params.json" in line and "--http_timeout_s" in line, line
    assert not (tmp_path / "out").exists()
    assert "WARNING" in result.stderr and "waiting for bytes" in result.stderr
    assert elapsed < 60, elapsed
    bad = run_cli("convert", "--meta_url", signed_url_server.url(), "--model_path", DESCRIPTOR, "--http_timeout_s", "0")
    assert bad.returncode == 2 and "--http_timeout_s" in bad.stderr and "Traceback" not in bad.stderr
    env_bad = run_cli("convert", "--meta_url", signed_url_server.url(), "--model_path", DESCRIPTOR,
                  env={"RAYCONV_HTTP_TIMEOUT_S": "soon"})
    assert env_bad.returncode == 2 and "Traceback" not in env_bad.stderr


# ---------------------------------------------------------------------------------------------
# Item 10: malformed URL hosts and ports end in one line


@pytest.mark.parametrize("url", [
    "https://host:99999/*?Policy=x&Signature=y", "https://[bad/*?Signature=y", "https://:80/*?Signature=y",
    "https://host:port/*?Signature=y", "ftp://host/*?Signature=y", "https://host:0/*",
])
def test_malformed_meta_url_is_one_line(url):
    line = error_line(run_cli("convert", "--meta_url", url, "--model_path", DESCRIPTOR, "--executor", "local"))
    assert "--meta_url" in line, line
    with pytest.raises(SourceError):
        HttpFile(url.replace("*", "x"))


def test_http_status_error_carries_the_status(signed_url_server):
    missing = signed_url_server.url().replace("*", f"{FOLDER}/consolidated.09.pth")
    with pytest.raises(HttpStatusError) as info:
        HttpFile(missing).size()
    assert info.value.status == 404
    with pytest.raises(HttpStatusError) as info:
        HttpFile(missing.replace("Signature=", "Signature=0")).size()
    assert info.value.status == 403


# ---------------------------------------------------------------------------------------------
# Item 10: ambiguous shard names


def test_ambiguous_shard_names_are_refused(tmp_path):
    src = write_checkpoint(TINY, tmp_path / "ckpt", checklist=False)
    shutil.copy(src / SHARD, src / "consolidated.1.pth")
    (src / "consolidated.00.pth.d").mkdir()  # directories are not input files
    files = list_input(str(src))
    assert "consolidated.00.pth.d" not in files
    with pytest.raises(SourceError) as info:
        shard_files(files, None, str(src))
    assert "consolidated.01.pth and consolidated.1.pth" in one_line(str(info.value))
    result = run_cli("convert", "--input_directory", str(src), "--model_name", "llama-3.1", "--executor", "local",
                 "--output_directory", str(tmp_path / "out"))
    assert "both shard 01" in error_line(result)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SourceError, match="missing shard consolidated.01.pth"):
        shard_files({"consolidated.00.pth": "a", "consolidated.99999999999.pth": "b"}, None, "x")


# ---------------------------------------------------------------------------------------------
# Item 10: checklist.chk in the input directory is checked (md5 of what convert reads)


def break_checklist(directory: Path, name: str) -> None:
    path = directory / "checklist.chk"
    lines = [("0" * 32 + "  " + name) if line.endswith("  " + name) else line
             for line in path.read_text().splitlines()]
    path.write_text("\n".join(lines) + "\n")


def assert_md5s_come_from_object_metadata(files: dict, uri: str, names: list, caplog) -> None:
    """verify_input passes taking all three md5s from GCS object metadata, hashing nothing."""
    with rayconv_log(caplog, logging.INFO):
        verify_input(files, uri, names)
    assert any("0 B hashed" in r.getMessage() and "3 from GCS object metadata" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_local_input_md5_checked_against_checklist(tmp_path):
    src = write_checkpoint(TINY, tmp_path / "ckpt")
    args = ("convert", "--input_directory", str(src), "--model_name", "llama-3.1", "--executor", "local",
            "--no_progress", "--skip_scanned")
    good = run_cli(*args, "--output_directory", str(tmp_path / "good"))
    assert good.returncode == 0, good.stderr[-3000:]
    assert "md5 of 3 files matches checklist.chk" in good.stderr
    assert (tmp_path / "good" / "bf16/unscanned/checkpoints/0/items/commit_success.txt").exists()

    break_checklist(src, SHARD)
    line = error_line(run_cli(*args, "--output_directory", str(tmp_path / "bad")))
    assert SHARD in line and "md5 mismatch" in line, line
    assert not any((tmp_path / "bad").rglob("commit_success.txt"))

    skipped = run_cli(*args, "--output_directory", str(tmp_path / "skipped"), "--skip_md5")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "--skip_md5" in skipped.stderr and "md5 of" not in skipped.stderr


def test_resume_does_not_hash_unchanged_input_again(tmp_path):
    """An interrupted 405B run must not cost another 820 GB md5 pass on resume: the ledger remembers which files
    (by size, mtime, inode) matched checklist.chk; a file changed since is hashed again."""
    src = write_checkpoint(TINY, tmp_path / "ckpt")
    out = tmp_path / "out"
    args = ("convert", "--input_directory", str(src), "--model_name", "llama-3.1", "--executor", "local",
            "--no_progress", "--skip_scanned", "--output_directory", str(out))
    # Stopped once every unit is done: a local input is hashed while converting, and the memo is written when
    # the hashes have matched, at the latest before the commit starts (tests/test_md5_while_converting.py).
    killed = run_cli(*args, env=dict(os.environ, RAYCONV_TEST_STOP_AFTER="intent"))
    assert killed.returncode == 99 and "md5 of 3 files matches checklist.chk" in killed.stderr, killed.stderr[-3000:]
    assert not any(out.rglob("commit_success.txt"))

    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not hashed again" in resumed.stderr and "Checking md5" not in resumed.stderr, resumed.stderr[-3000:]
    assert "Resuming" in resumed.stderr

    stat = (src / SHARD).stat()  # the same bytes, touched: no longer known to be the bytes that were hashed
    os.utime(src / SHARD, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    again = run_cli(*args)
    assert again.returncode == 0 and "md5 of 3 files matches checklist.chk" in again.stderr, again.stderr[-3000:]

    break_checklist(src, SHARD)  # the checklist changed: its new sums are checked, and this one is wrong
    line = error_line(run_cli(*args))
    assert SHARD in line and "md5 mismatch" in line, line


def test_gs_input_md5_from_object_metadata(tmp_path, gcs_prefix, caplog):
    src = write_checkpoint(TINY, tmp_path / "ckpt")
    for path in src.iterdir():
        gcs_prefix.write_bytes(path.name, path.read_bytes())  # single-request uploads: GCS keeps their md5
    files, names = list_input(gcs_prefix.uri), ["params.json", "consolidated.00.pth", SHARD]
    assert_md5s_come_from_object_metadata(files, gcs_prefix.uri, names, caplog)
    break_checklist(src, "params.json")
    gcs_prefix.write_bytes("checklist.chk", (src / "checklist.chk").read_bytes())
    with pytest.raises(SourceError) as info:
        verify_input(files, gcs_prefix.uri, names)
    assert "params.json: md5 mismatch" in one_line(str(info.value))
    with pytest.raises(SourceError, match="has no md5 for zz"):
        verify_input(dict(files, zz=files["params.json"]), gcs_prefix.uri, ["tokenizer.model", "zz"])


# ---------------------------------------------------------------------------------------------
# Issue 15 item 6 / 3: one error summary, per-process singletons


@pytest.mark.parametrize("message, expected", [
    ("RESOURCE_EXHAUSTED: Error writing \"k\" in file kvstore: Failed writing: No space left on device "
     "[os_error_code='28']", "No space left on device (RESOURCE_EXHAUSTED)"),
    ("404 GET https://storage/b/x: Not Found\n{\"error\": {...}}\n", "404 GET https://storage/b/x: Not Found"),
    ("", "OSError"),
])
def test_one_line_reason(message, expected):
    assert one_line_reason(OSError(message) if message else OSError()) == expected


def test_per_process_rebuilds_after_fork():
    from rayconv.process_local import per_process

    made = []
    value = per_process(lambda: made.append(os.getpid()) or object())
    first = value()
    assert value() is first and made == [os.getpid()]
    read, write = os.pipe()
    with warnings.catch_warnings():  # "fork() of a multi-threaded process": the child only calls value()
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # child: a new value, built in this process
        ok = value() is not first and made[-1] == os.getpid()
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"


def test_no_import_cycle_between_storage_and_gcs_source():
    code = ("import sys; import rayconv.gcs_api as g; assert 'rayconv.storage' not in sys.modules, 'leaf'; "
            "import rayconv.storage; assert 'rayconv.source.gcs' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


def test_descriptor_is_a_dataclass_view_of_the_catalog():
    from rayconv.families import Descriptor

    d = Descriptor.parse("Llama-2-70b-chat")
    model = catalog.lookup("Llama-2-70b-chat")
    assert dataclasses.astuple(d)[1:] == (model.family, model.size, model.instruct, model.shards, model.dtype)


def test_every_convertible_size_is_a_catalog_release():
    from rayconv.families.llama import KNOWN_SIZES

    for family, sizes in KNOWN_SIZES.items():
        for known in sizes:
            assert (family, known.size) in catalog.PUBLISHED, (family, known.size)


def test_redact_never_raises_and_drops_credentials_and_query():
    from rayconv.source.http import redact

    assert redact("https://user:pw@host:99999/a@b?Signature=s#frag") == "https://host:99999/a@b"
    assert redact("https://user:pw@host:8443/x?Policy=p") == "https://host:8443/x"
    assert redact("https://[bad/*?Signature=s") == "https://[bad/*"


def test_staged_gs_prefix_is_checked_from_metadata_not_reread(signed_url_server, small_checkpoint, gcs_prefix, caplog):
    """Staging composes shards (no GCS md5) and attaches the md5 it verified; a later convert from that prefix
    checks checklist.chk against it without reading the shards; an object replaced since is caught."""
    from rayconv.gcs_api import object_info

    dest = gcs_prefix.join("base")
    stage(signed_url_server.url(), DESCRIPTOR, dest, part_size=256 << 10)
    info = object_info(dest.bucket, dest.join(SHARD).path)
    # Real GCS keeps no md5 for a composed object; fake-gcs-server does (and no componentCount), so the
    # attached md5 is checked here directly.
    assert info["verified_md5"] == hashlib.md5((small_checkpoint / SHARD).read_bytes()).hexdigest()
    files, names = list_input(dest.uri), ["params.json", "consolidated.00.pth", SHARD]
    assert_md5s_come_from_object_metadata(files, dest.uri, names, caplog)
    dest.write_bytes(SHARD, b"replaced")  # a new object: GCS's own md5, no rayconv metadata
    with pytest.raises(SourceError, match=f"{SHARD}: md5 mismatch"):
        verify_input(files, dest.uri, names)
