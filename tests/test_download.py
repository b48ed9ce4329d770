"""Meta signed-URL flow against a real local HTTP server shaped like CloudFront (started by the
fixtures): URL construction, expiry, Range reads with resume, staging to gs:// and to a local
directory with resume and md5 verification, and one-line errors that never show the signature."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
import time

import numpy as np
import pytest

from helpers import copy_down
from rayconv import catalog, download, staging
from rayconv.catalog import lookup
from rayconv.download import check_expiry, check_meta_url, file_url, resolve, resolve_input
from rayconv.errors import SourceError, SpecError
from rayconv.source.bytesource import open_source
from rayconv.source.hashing import read_checklist, verify_files, verify_md5
from rayconv.source.http import HttpFile, policy_expiry, redact
from rayconv.staging import StageReport, stage
from rayconv.storage import Location
from servers import SignedUrlServer, make_policy

DESCRIPTOR = "Llama3.1-8B"  # served from folder Llama-3.1-8B by the fixtures
SHARD = "consolidated.01.pth"
KiB = 1 << 10


def check_message(exc: BaseException, *must: str) -> str:
    """One line, names what it must, and carries no part of the signed query string."""
    text = str(exc)
    assert "\n" not in text
    for word in must:
        assert word in text, (word, text)
    for secret in ("Policy=", "Signature", "Key-Pair-Id", "Download-Request-ID"):
        assert secret not in text, text
    assert not re.search(r"\?[A-Za-z-]+=", text), text  # no query string at all
    return text


# ---------------------------------------------------------------------------------------------
# URL handling (no server)


@pytest.mark.parametrize("descriptor, folder, shards", [
    ("Llama3.1-405B-Instruct:bf16-mp16", "Llama-3.1-405B-Instruct-MP16", 16),
    ("Llama3.1-405B:bf16-mp16", "Llama-3.1-405B-MP16", 16),
    ("Llama3.1-405B:bf16-mp8", "Llama-3.1-405B-MP8", 8),
    ("Llama3.1-405B-Instruct:bf16-mp8", "Llama-3.1-405B-Instruct-MP8", 8),
    ("Llama3.1-405B", "Llama-3.1-405B", 8),
    ("Llama3.1-8B", "Llama-3.1-8B", 1),
    ("Llama3.1-70B-Instruct", "Llama-3.1-70B-Instruct", 8),
    ("Llama3.3-70B-Instruct", "Llama-3.3-70B-Instruct", 8),
    ("Llama3.2-3B-Instruct", "Llama-3.2-3B-Instruct", 1),
    ("Llama-3-8B-Instruct", "Llama-3-8B-Instruct", 1),
    ("Llama-3-70B", "Llama-3-70B", 8),
    ("Llama-2-7b", "llama-2-7b", 1),
    ("Llama-2-13b-chat", "llama-2-13b-chat", 2),
    ("Llama-2-70b-chat", "llama-2-70b-chat", 8),
])
def test_descriptor_folder(descriptor, folder, shards):
    assert lookup(descriptor).folder == folder
    assert lookup(descriptor).shards == shards


def test_descriptor_details():
    fp8 = lookup("Llama3.1-405B-Instruct")
    assert fp8.fp8 and fp8.files[3:5] == ["fp8_scales_0.pt", "fp8_scales_1.pt"]
    assert fp8.shard_bytes == 60_903_742_309
    mp16 = lookup("Llama3.1-405B:bf16-mp16")
    assert mp16.files[:3] == ["checklist.chk", "tokenizer.model", "params.json"]
    assert mp16.files[-1] == "consolidated.15.pth" and mp16.shard_bytes == 51_268_302_389
    assert mp16.legacy_folders == ("Meta-Llama-3.1-405B-MP16",)
    assert lookup("Llama-3-8B").legacy_folders == ("Meta-Llama-3-8B", "8b_pre_trained")
    assert lookup("Llama3.1-8B", folder="custom/dir").folder == "custom/dir"
    with pytest.raises(SpecError):
        lookup("Mistral-7B")


def test_file_urls_replace_star_keep_query():
    url = "https://llama3-1.llamameta.net/*?Policy=abc&Signature=s%3D&Key-Pair-Id=K&Download-Request-ID=1"
    folder = lookup("Llama3.1-405B:bf16-mp16").folder
    assert file_url(url, folder, "consolidated.03.pth") == (
        "https://llama3-1.llamameta.net/Llama-3.1-405B-MP16/consolidated.03.pth"
        "?Policy=abc&Signature=s%3D&Key-Pair-Id=K&Download-Request-ID=1")
    assert redact(file_url(url, folder, "params.json")) == "https://llama3-1.llamameta.net/Llama-3.1-405B-MP16/params.json"
    assert len(lookup("Llama3.1-405B:bf16-mp16").files) == 19
    check_meta_url(url)
    with pytest.raises(SourceError) as info:
        check_meta_url("https://llama3-1.llamameta.net/x?Policy=abc&Signature=zzz")
    check_message(info.value, "placeholder")


def test_policy_expiry_and_check():
    now = time.time()
    url = f"https://h/*?Policy={make_policy(now + 7200)}&Signature=x&Key-Pair-Id=y"
    assert abs(policy_expiry(url) - int(now + 7200)) < 1
    assert check_expiry(url) == int(now + 7200)
    expired = f"https://h/*?Policy={make_policy(now - 10)}&Signature=x&Key-Pair-Id=y"
    with pytest.raises(SourceError) as info:
        check_expiry(expired)
    check_message(info.value, "expired")
    assert policy_expiry("https://h/*?Signature=x") is None


def test_read_checklist():
    text = ("0123456789abcdef0123456789abcdef  consolidated.00.pth\n"
            "FEDCBA9876543210FEDCBA9876543210  ./params.json\n\n")
    assert read_checklist(text) == {"consolidated.00.pth": "0123456789abcdef0123456789abcdef",
                                    "params.json": "fedcba9876543210fedcba9876543210"}
    with pytest.raises(SourceError) as info:
        read_checklist(b"<html><body>AccessDenied</body></html>")
    check_message(info.value, "checklist.chk", "line 1")


# ---------------------------------------------------------------------------------------------
# HttpFile against the signed-URL server


def shard_url(server: SignedUrlServer, name: str = SHARD) -> str:
    return server.url().replace("*", f"Llama-3.1-8B/{name}")


def test_http_range_reads_match_local(signed_url_server, small_checkpoint):
    local = (small_checkpoint / SHARD).read_bytes()
    src = open_source(shard_url(signed_url_server))
    assert isinstance(src, HttpFile)
    assert src.size() == len(local)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = int(rng.integers(0, len(local) - 1))
        n = int(rng.integers(1, min(200_000, len(local) - a) + 1))
        assert src.read(a, n) == local[a:a + n]
    chunked = HttpFile(shard_url(signed_url_server), chunk_size=100 * KiB)
    assert chunked.read(3, len(local) - 3) == local[3:]
    # Never HEAD (CloudFront rejects it); the size came from a one-byte ranged GET.
    assert signed_url_server.file_requests(SHARD, "HEAD") == []
    assert ("GET", f"/Llama-3.1-8B/{SHARD}", "bytes=0-0", 206) in signed_url_server.requests
    assert repr(src).count("?") == 0


def test_a_size_seen_under_one_signed_url_is_not_assumed_under_another(tmp_path):
    """The size memo is per signed URL, not per path: a file republished under a new URL (or another server that
    got a finished test server's port: the flaky `changed size on the server (204 → 241 bytes)`) is probed anew."""
    folder = tmp_path / "cdn" / "Llama-3.1-8B"
    folder.mkdir(parents=True)
    (folder / "checklist.chk").write_bytes(b"a" * 204)
    with SignedUrlServer(tmp_path / "cdn") as server:
        first = file_url(server.url(), "Llama-3.1-8B", "checklist.chk")
        assert HttpFile(first).size() == 204
        (folder / "checklist.chk").write_bytes(b"b" * 241)
        second = file_url(server.url(expires_at=server.expires_at + 60), "Llama-3.1-8B", "checklist.chk")
        assert redact(second) == redact(first)
        source = HttpFile(second)
        assert source.read(0, source.size()) == b"b" * 241
        with pytest.raises(SourceError, match="changed size on the server"):  # under one URL: a change mid-run
            HttpFile(first).read(0, 204)


def test_http_resumes_dropped_connection(signed_url_server, small_checkpoint):
    local = (small_checkpoint / SHARD).read_bytes()
    signed_url_server.drop_after[f"Llama-3.1-8B/{SHARD}"] = 300_001
    src = HttpFile(shard_url(signed_url_server), chunk_size=1 << 30)
    assert src.read(1000, len(local) - 1000) == local[1000:]
    ranges = [r[2] for r in signed_url_server.file_requests(SHARD)]
    # The retry asks for exactly the bytes not yet received: no duplicate, no gap.
    assert f"bytes={1000 + 300_001}-{len(local) - 1}" in ranges


def test_http_errors(signed_url_server, small_checkpoint):
    url = shard_url(signed_url_server)
    with pytest.raises(SourceError) as info:
        HttpFile(shard_url(signed_url_server, "consolidated.09.pth")).size()
    check_message(info.value, "missing file", "consolidated.09.pth", "404")
    src = HttpFile(url)
    with pytest.raises(SourceError) as info:
        src.read(src.size() - 10, 11)
    check_message(info.value, "truncated", SHARD)
    bad_signature = url.replace("Signature=", "Signature=00")
    with pytest.raises(SourceError) as info:
        HttpFile(bad_signature).read(0, 10)
    check_message(info.value, "403", "invalid", SHARD)
    signed_url_server.expired = True
    with pytest.raises(SourceError) as info:
        src.read(0, 100)
    check_message(info.value, "403", SHARD)
    expired_policy = signed_url_server.url(expires_at=time.time() - 5).replace("*", f"Llama-3.1-8B/{SHARD}")
    with pytest.raises(SourceError) as info:
        HttpFile(expired_policy).read(0, 10)
    check_message(info.value, "expired at", SHARD)


def test_http_gives_up_after_retries(signed_url_server, small_checkpoint):
    """A server that keeps dropping the connection fails with one line after the retry budget."""
    src = HttpFile(shard_url(signed_url_server), retries=2)
    src.size()
    stop = threading.Event()

    def keep_dropping():
        while not stop.is_set():
            signed_url_server.drop_after[f"Llama-3.1-8B/{SHARD}"] = 0
            time.sleep(0.005)

    t = threading.Thread(target=keep_dropping, daemon=True)
    t.start()
    try:
        with pytest.raises(SourceError) as info:
            src.read(0, 500_000)
    finally:
        stop.set()
        t.join()
    check_message(info.value, SHARD, "after 2 retries")


def test_truncated_file_on_server(signed_url_server, meta_url_tree, small_checkpoint):
    """A shard cut short on the server: direct reads past its end and md5 verification both fail."""
    path = meta_url_tree / "Llama-3.1-8B" / SHARD
    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 2])
    src = HttpFile(shard_url(signed_url_server))
    with pytest.raises(SourceError) as info:
        src.read(len(full) - 100, 100)
    check_message(info.value, "truncated", SHARD)
    md5 = read_checklist((small_checkpoint / "checklist.chk").read_text())[SHARD]
    with pytest.raises(SourceError) as info:
        verify_md5(src, md5, SHARD)
    check_message(info.value, "md5 mismatch", SHARD)


# ---------------------------------------------------------------------------------------------
# resolve / streaming verification


def test_resolve_input(signed_url_server, small_checkpoint):
    urls = resolve_input(signed_url_server.url(), DESCRIPTOR)
    assert list(urls)[:3] == ["checklist.chk", "tokenizer.model", "params.json"]
    assert [n for n in urls if n.startswith("consolidated")] == ["consolidated.00.pth", SHARD]
    for name, url in urls.items():
        assert redact(url).endswith(f"/Llama-3.1-8B/{name}")
        assert open_source(url).read(0, 10) == (small_checkpoint / name).read_bytes()[:10]


def test_resolve_legacy_folder(meta_url_tree):
    os.rename(meta_url_tree / "Llama-3.1-8B", meta_url_tree / "Meta-Llama-3.1-8B")
    with SignedUrlServer(meta_url_tree) as server:
        meta = resolve(server.url(), DESCRIPTOR)
        assert meta.model.folder == "Meta-Llama-3.1-8B"
        with pytest.raises(SourceError) as info:
            resolve(server.url(), "Llama3.1-70B")
        check_message(info.value, "checklist.chk", "Llama-3.1-70B", "404")


def test_resolve_expired_url_refused_before_start(signed_url_server):
    with pytest.raises(SourceError) as info:
        resolve(signed_url_server.url(expires_at=time.time() - 60), DESCRIPTOR)
    check_message(info.value, "expired")
    assert signed_url_server.requests == []  # refused locally, nothing fetched


def test_verify_files_over_http(signed_url_server, small_checkpoint):
    meta = resolve(signed_url_server.url(), DESCRIPTOR)
    listed = {name: url for name, url in meta.urls.items() if name != "checklist.chk"}
    assert verify_files(listed, meta.md5, block=256 * KiB, window=3) == {name: "hashed" for name in listed}
    wrong = dict(meta.md5, **{SHARD: "0" * 32})
    with pytest.raises(SourceError) as info:
        verify_files(listed, wrong)
    check_message(info.value, "md5 mismatch", SHARD)
    with pytest.raises(SourceError) as info:
        verify_files(meta.urls, meta.md5)  # every file checked must be listed
    check_message(info.value, "no md5 for checklist.chk")


# ---------------------------------------------------------------------------------------------
# stage(): URL → gs:// and URL → local directory


def verify_staged(dest: Location) -> None:
    """What convert does for a directory with checklist.chk: every listed file's md5 checked."""
    sums = read_checklist(dest.read_bytes("checklist.chk"))
    verify_files({name: dest.join(name).uri for name in sums}, sums)


def assert_staged_equal(dest: Location, checkpoint) -> None:
    for name in sorted(os.listdir(checkpoint)):
        assert dest.read_bytes(name) == (checkpoint / name).read_bytes(), name
    # No scratch parts left behind; only the verified markers.
    leftovers = [k for k in dest.list_keys(".rayconv-staging/") if not k.endswith(".verified")]
    assert leftovers == []


@pytest.fixture(params=["gs", "local"])
def stage_dest(request, tmp_path):
    if request.param == "gs":
        return request.getfixturevalue("gcs_prefix").join("base")
    return Location.parse(str(tmp_path / "base"))


def test_stage_with_dropped_connection(signed_url_server, small_checkpoint, stage_dest):
    signed_url_server.drop_after[f"Llama-3.1-8B/{SHARD}"] = 700_000
    report = StageReport(dest=stage_dest)
    dest = stage(signed_url_server.url(), DESCRIPTOR, stage_dest.uri, part_size=256 * KiB,
                 concurrency=3, report=report)
    assert dest == stage_dest
    assert_staged_equal(dest, small_checkpoint)
    assert signed_url_server.file_requests(SHARD, "HEAD") == []
    shard_size = (small_checkpoint / SHARD).stat().st_size
    assert report.fetched[SHARD] == shard_size
    verify_staged(dest)
    # A second run finds everything staged and verified, and downloads nothing but the checklist.
    before = len(signed_url_server.requests)
    report2 = StageReport(dest=dest)
    stage(signed_url_server.url(), DESCRIPTOR, dest, part_size=256 * KiB, report=report2)
    assert sorted(report2.cached) == sorted(n for n in os.listdir(small_checkpoint) if n != "checklist.chk")
    assert all("checklist.chk" in r[1] or "bytes=0-0" == r[2]
               for r in signed_url_server.requests[before:])


def test_stage_resumes_after_interruption(signed_url_server, small_checkpoint, stage_dest):
    """The URL 'expires' part-way through; a rerun with a fresh URL fetches only what is missing."""
    signed_url_server.fail_after_requests = 12
    with pytest.raises(SourceError) as info:
        stage(signed_url_server.url(), DESCRIPTOR, stage_dest, part_size=128 * KiB, concurrency=2,
              parallel_files=1)
    check_message(info.value, "403")
    assert stage_dest.read_bytes("checklist.chk") is None  # not complete: no checklist yet
    first_gets = len(signed_url_server.file_requests("consolidated.00.pth"))
    assert first_gets > 1

    signed_url_server.expired = False
    signed_url_server.fail_after_requests = None
    before = len(signed_url_server.requests)
    report = StageReport(dest=stage_dest)
    stage(signed_url_server.url(), DESCRIPTOR, stage_dest, part_size=128 * KiB, concurrency=2,
          report=report)
    assert_staged_equal(stage_dest, small_checkpoint)
    shard0 = (small_checkpoint / "consolidated.00.pth").stat().st_size
    reused = report.reused.get("consolidated.00.pth", 0) + (shard0 if "consolidated.00.pth" in report.cached else 0)
    assert reused > 0
    assert report.fetched.get("consolidated.00.pth", 0) + reused == shard0
    # Parts fetched in the first run were not requested again.
    second = [r for r in signed_url_server.requests[before:] if r[1].endswith("consolidated.00.pth")]
    assert len(second) < -(-shard0 // (128 * KiB))


def test_stage_md5_mismatch(meta_url_tree, small_checkpoint, stage_dest):
    checklist = meta_url_tree / "Llama-3.1-8B" / "checklist.chk"
    lines = checklist.read_text().splitlines()
    lines = [("0" * 32 + "  " + SHARD) if line.endswith(SHARD) else line for line in lines]
    checklist.write_text("\n".join(lines) + "\n")
    with SignedUrlServer(meta_url_tree) as server:
        with pytest.raises(SourceError) as info:
            stage(server.url(), DESCRIPTOR, stage_dest, part_size=256 * KiB, parallel_files=1)
    check_message(info.value, "md5 mismatch", SHARD)
    assert stage_dest.size(SHARD) is None  # never published under its name
    assert stage_dest.read_bytes("checklist.chk") is None
    assert [k for k in stage_dest.list_keys(f".rayconv-staging/{SHARD}")] == []


def test_stage_truncated_shard(meta_url_tree, small_checkpoint, stage_dest):
    path = meta_url_tree / "Llama-3.1-8B" / SHARD
    path.write_bytes(path.read_bytes()[:-1000])
    with SignedUrlServer(meta_url_tree) as server:
        with pytest.raises(SourceError) as info:
            stage(server.url(), DESCRIPTOR, stage_dest, part_size=256 * KiB)
    check_message(info.value, "md5 mismatch", SHARD)
    assert stage_dest.size(SHARD) is None


def test_stage_known_size_mismatch(signed_url_server, small_checkpoint, tmp_path, monkeypatch):
    """Published 405B sizes are checked before downloading (here: pretend 8B has one)."""
    monkeypatch.setattr(download, "_fetch_order", lambda model, md5: sorted(md5, key=lambda n: n.startswith("c")))
    original = catalog.lookup

    def with_size(descriptor, folder=None):
        import dataclasses

        return dataclasses.replace(original(descriptor, folder), shard_bytes=12345)

    monkeypatch.setattr(catalog, "lookup", with_size)
    with pytest.raises(SourceError) as info:
        stage(signed_url_server.url(), DESCRIPTOR, str(tmp_path / "base"), files=[SHARD])
    check_message(info.value, SHARD, "published size is 12345")


def test_stage_403_and_404(meta_url_tree, signed_url_server, tmp_path):
    dest = str(tmp_path / "base")
    bad = signed_url_server.url().replace("Signature=", "Signature=0")
    with pytest.raises(SourceError) as info:
        stage(bad, DESCRIPTOR, dest)
    check_message(info.value, "403", "checklist.chk")
    (meta_url_tree / "Llama-3.1-8B" / "consolidated.00.pth").unlink()
    with pytest.raises(SourceError) as info:
        stage(signed_url_server.url(), DESCRIPTOR, dest)
    check_message(info.value, "missing file", "consolidated.00.pth", "404")


def test_stage_reuses_existing_local_copy(signed_url_server, small_checkpoint, tmp_path):
    """Files already present (e.g. from `llama download`) are hashed, not downloaded again."""
    dest = tmp_path / "base"
    shutil.copytree(small_checkpoint, dest)
    report = StageReport(dest=Location.parse(str(dest)))
    stage(signed_url_server.url(), DESCRIPTOR, str(dest), report=report)
    assert report.fetched == {}
    assert signed_url_server.file_requests(SHARD) == []


# ---------------------------------------------------------------------------------------------
# End to end: URL → gs:// and staged gs:// → gs:// convert to the same bytes as local → local


def test_convert_from_url_and_bucket_bit_equal_to_local(tmp_path, gcs_prefix):
    from reference import read_leaves

    from rayconv.engine.driver import convert

    from rayconv.job import ConvertOptions
    from rayconv.source.checkpoint import list_input
    from rayconv.synthetic import SyntheticModel, write_checkpoint

    model = SyntheticModel(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=1024, n_shards=1, seed=5)
    src = write_checkpoint(model, tmp_path / "cdn" / "Llama-3.1-8B")

    def run(files: dict[str, str], output: str) -> None:
        convert(ConvertOptions(files=files, input_display="test", output=output, model_path=DESCRIPTOR,
                               executor="local", progress=False))

    run(list_input(str(src)), str(tmp_path / "local"))
    with SignedUrlServer(tmp_path / "cdn") as server:
        server.drop_after["Llama-3.1-8B/consolidated.00.pth"] = 1_000_000  # resumed mid-tensor
        run(resolve_input(server.url(), DESCRIPTOR), gcs_prefix.join("from-url").uri)
        staged = stage(server.url(), DESCRIPTOR, gcs_prefix.join("base"), part_size=512 * KiB)
    run(list_input(staged.uri), gcs_prefix.join("from-gs").uri)

    for sub in ("bf16/scanned/0/items", "bf16/unscanned/checkpoints/0/items"):
        want = read_leaves(tmp_path / "local" / sub)
        assert want
        for name in ("from-url", "from-gs"):
            copy_down(gcs_prefix.join(name), tmp_path / name)
            got = read_leaves(tmp_path / name / sub)
            assert sorted(got) == sorted(want), (name, sub)
            for key in want:
                assert got[key].dtype == want[key].dtype and got[key].tobytes() == want[key].tobytes(), (name, key)
        # Orbax commit markers are there on GCS too.
        assert gcs_prefix.join("from-url").exists(sub + "/commit_success.txt")


URL_CONVERT_CHILD = """
import sys
from rayconv.download import resolve_input
from rayconv.engine.driver import convert
from rayconv.errors import ConversionError
from rayconv.job import ConvertOptions
from rayconv.progress import setup_logging
setup_logging()
try:
    convert(ConvertOptions(files=resolve_input(sys.argv[1], "Llama3.1-8B"), input_display="url", output=sys.argv[2],
                           model_path="Llama3.1-8B", executor="local", progress=False, verify_md5=True,
                           piece_budget=1 << 20, unit_budget=1 << 20))
except ConversionError as exc:
    sys.exit(f"rayconv: error: {exc}")
"""


def test_url_resume_hashes_again(tmp_path):
    """Issue 21 #13: files behind a signed URL have no byte identity (empty), so the md5 memo of an interrupted URL
    conversion proves nothing about what the server serves now: the resume must hash again. Here the checklist
    changes on the server between the runs, and the resume catches it; with the checklist back, it hashes and
    finishes."""
    import subprocess
    import sys

    from helpers import cli_env
    from rayconv.synthetic import SyntheticModel, write_checkpoint

    model = SyntheticModel(dim=256, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=1024, n_shards=1, seed=21)
    src = write_checkpoint(model, tmp_path / "cdn" / "Llama-3.1-8B")
    checklist = (src / "checklist.chk").read_bytes()
    out = tmp_path / "out"

    def run(server: SignedUrlServer, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", URL_CONVERT_CHILD, server.url(), str(out)], capture_output=True,
                              text=True, env=cli_env(env), timeout=300)

    with SignedUrlServer(tmp_path / "cdn") as server:
        killed = run(server, RAYCONV_TEST_STOP_AFTER="units:1")
        assert killed.returncode == 99 and "md5 of 2 files matches checklist.chk" in killed.stderr, killed.stderr
        assert (out / ".rayconv/md5.json").exists()  # what a resume must not trust for URLs

        sums = read_checklist(checklist)
        (src / "checklist.chk").write_text("".join(f"{'0' * 32 if n == 'consolidated.00.pth' else d}  {n}\n"
                                                   for n, d in sums.items()))
        caught = run(server)
        assert caught.returncode == 1, caught.stderr[-3000:]
        check_message(caught.stderr.strip().splitlines()[-1], "consolidated.00.pth: md5 mismatch")
        assert not list(out.rglob("commit_success.txt"))

        (src / "checklist.chk").write_bytes(checklist)
        resumed = run(server)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Checking md5 of 2 files" in resumed.stderr and "not hashed again" not in resumed.stderr
    assert "Resuming" in resumed.stderr, resumed.stderr[-3000:]
    assert (out / "bf16/unscanned/checkpoints/0/items/commit_success.txt").exists()


STAGE_CHILD = """
import json, os, sys, time
sys.path.insert(0, {repo!r})
from rayconv import staging
from rayconv.staging import StageReport
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
import rayconv.storage, rayconv.source.gcs, rayconv.download, google.cloud.storage  # imports count as baseline
base = hwm()
report = StageReport(dest=None)
t = time.perf_counter()
staging.stage(sys.argv[1], "Llama3.1-8B", sys.argv[2], part_size=16 << 20, concurrency=4,
               memory_budget=96 << 20, report=report)
dt = time.perf_counter() - t
fetched = report.fetched["consolidated.00.pth"]
print(json.dumps({{"base_mb": base, "peak_mb": hwm(), "seconds": dt, "fetched": fetched}}))
"""


def test_stage_throughput_and_memory(tmp_path, gcs_prefix, capsys):
    """Stage a 256 MiB shard URL → gs:// in a fresh process with a 96 MiB budget; print MB/s, RSS."""
    import json
    import subprocess
    import sys

    folder = tmp_path / "cdn" / "Llama-3.1-8B"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    md5 = hashlib.md5()
    with open(folder / "consolidated.00.pth", "wb") as f:
        for _ in range(8):
            block = rng.integers(0, 255, 32 << 20, dtype=np.uint8).tobytes()
            f.write(block)
            md5.update(block)
    (folder / "params.json").write_text("{}")
    lines = [f"{md5.hexdigest()}  consolidated.00.pth",
             f"{hashlib.md5(b'{}').hexdigest()}  params.json"]
    (folder / "checklist.chk").write_text("\n".join(lines) + "\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with SignedUrlServer(tmp_path / "cdn") as server:
        out = subprocess.run([sys.executable, "-c", STAGE_CHILD.format(repo=repo), server.url(),
                              gcs_prefix.join("base").uri], capture_output=True, text=True, timeout=600,
                             env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    size_mb = 256
    assert result["fetched"] == 256 << 20
    verify_staged(gcs_prefix.join("base"))
    with capsys.disabled():
        print(f"\n[throughput] stage 256 MiB URL → gs:// (16 MiB parts, 96 MiB budget): "
              f"{size_mb / result['seconds']:.0f} MB/s incl. md5 + compose; peak RSS {result['peak_mb']:.0f} MB "
              f"(+{result['peak_mb'] - result['base_mb']:.0f} MB over imports)")
    assert result["peak_mb"] - result["base_mb"] < 96 + 96  # budget + upload copies/ tensorstore buffers
    gcs_prefix.delete_all()


def test_stage_detects_bytes_changed_on_the_way_into_the_bucket(signed_url_server, small_checkpoint,
                                                                gcs_prefix, monkeypatch):
    """A part stored differently from what was hashed (fault injected into the upload) is caught
    by the crc32c of the composed object; nothing is published and a rerun starts that file over."""
    original = staging._GcsParts.write
    hit = []

    def corrupt_once(self, index, data):
        if self.name == SHARD and index == 2 and not hit:
            hit.append(index)
            data = memoryview(bytes(data[:-1]) + bytes([data[-1] ^ 1]))
        return original(self, index, data)

    monkeypatch.setattr(staging._GcsParts, "write", corrupt_once)
    dest = gcs_prefix.join("base")
    with pytest.raises(SourceError) as info:
        stage(signed_url_server.url(), DESCRIPTOR, dest, part_size=256 * KiB, parallel_files=1)
    check_message(info.value, SHARD, "crc32c")
    assert dest.size(SHARD) is None and dest.list_keys(f".rayconv-staging/{SHARD}/") == []
    stage(signed_url_server.url(), DESCRIPTOR, dest, part_size=256 * KiB)
    assert_staged_equal(dest, small_checkpoint)
