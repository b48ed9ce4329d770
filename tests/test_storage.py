"""Storage layer against a real fake-gcs-server (started by the fixtures): Location ops on gs://,
ranged reads of .pth shards through GcsObject, tensorstore zarr3-over-OCDBT on the emulator,
throughput and memory while streaming."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest

from rayconv.errors import ConversionError, OutputError, SourceError
from rayconv.source.bytesource import RangeFile, open_source
from rayconv.gcs_api import object_info
from rayconv.source.gcs import GcsObject
from rayconv.storage import Location

MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text
    return text


# ---------------------------------------------------------------------------------------------
# Location on gs:// and on local disk: same behaviour


@pytest.fixture(params=["local", "gs"])
def location(request, tmp_path):
    if request.param == "local":
        return Location.parse(str(tmp_path / "out"))
    return request.getfixturevalue("gcs_prefix")


def test_location_round_trip(location):
    assert location.list_keys() == []
    assert not location.exists()
    location.write_bytes("a/params.json", b'{"dim": 8}')
    location.write_bytes("a/b/c.bin", bytes(range(256)) * 4)
    location.write_bytes("ab.txt", b"x")
    location.write_bytes("b.txt", b"y")
    assert location.read_bytes("a/params.json") == b'{"dim": 8}'
    assert location.read_bytes("nope") is None
    assert location.read_range("a/b/c.bin", 10, 20) == bytes(range(10, 20))
    assert location.exists("a/b/c.bin") and not location.exists("a/b/zzz") and location.exists()
    assert location.size("a/b/c.bin") == 1024
    assert location.size("missing") is None
    assert location.list_keys() == ["a/b/c.bin", "a/params.json", "ab.txt", "b.txt"]
    assert location.list_keys("a/") == ["a/b/c.bin", "a/params.json"]
    assert location.list_keys("a") == ["a/b/c.bin", "a/params.json", "ab.txt"]
    sub = location.join("a")
    assert sub.list_keys() == ["b/c.bin", "params.json"]
    assert sub.read_bytes("params.json") == b'{"dim": 8}'
    location.check_writable()
    assert location.list_keys() == ["a/b/c.bin", "a/params.json", "ab.txt", "b.txt"]  # probe removed
    sub.delete_all()
    assert location.list_keys() == ["ab.txt", "b.txt"]
    location.delete_all()
    assert location.list_keys() == []


def test_location_parse_and_uri(fake_gcs):
    loc = Location.parse("gs://rayconv-test/some/prefix/")
    assert (loc.bucket, loc.path, loc.uri) == ("rayconv-test", "some/prefix", "gs://rayconv-test/some/prefix")
    assert loc.join("x", "y.json").uri == "gs://rayconv-test/some/prefix/x/y.json"
    assert loc.kvstore_spec() == {"driver": "gcs", "bucket": "rayconv-test", "path": "some/prefix/"}
    with pytest.raises(OutputError):
        Location.parse("gs://")
    with pytest.raises(OutputError):
        Location.parse("s3://bucket/x")


def test_gcs_prefix_isolation(gcs_prefix):
    """delete_all on one prefix must not touch a sibling sharing the same string prefix."""
    a = gcs_prefix.join("run")
    b = Location.parse(gcs_prefix.uri + "/run-2")
    a.write_bytes("x", b"1")
    b.write_bytes("x", b"2")
    a.delete_all()
    assert b.read_bytes("x") == b"2"
    assert a.list_keys() == []


@pytest.fixture
def silent_endpoint():
    """An HTTP "storage endpoint" that accepts connections and never answers (a black-holed network)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                held.append(server.accept()[0])  # keep it open, say nothing
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    try:
        yield {"TENSORSTORE_GCS_HTTP_URL": url, "STORAGE_EMULATOR_HOST": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
               "GOOGLE_CLOUD_PROJECT": "rayconv-test"}
    finally:
        done.set()
        server.close()
        for conn in held:
            conn.close()
        thread.join(5)


@pytest.mark.parametrize("side", ["output", "input"])
def test_storage_that_never_answers_ends_in_one_line_naming_the_bucket(silent_endpoint, tmp_path, side):
    """No answer from GCS (no network, no credentials, a dead endpoint): one line naming the bucket, not minutes of
    silent retries. The subprocess's own timeout is the hang guard; no timing is asserted."""
    from conftest import MODELS, synthetic_checkpoint
    from helpers import one_error, run_convert_cli

    model = MODELS["llama3-mp1"][0]
    if side == "output":
        args = ["--input_directory", str(synthetic_checkpoint(model)), "--output_directory", "gs://silent-bucket/out"]
    else:
        args = ["--input_directory", "gs://silent-bucket/in", "--output_directory", str(tmp_path / "out")]
    result = run_convert_cli(*args, "--model_name", model.family, "--storage_timeout_s", "3", env=silent_endpoint,
                             timeout=240)
    line = one_error(result)
    assert "gs://silent-bucket: no answer from Cloud Storage within 3 s" in line, line
    assert silent_endpoint["STORAGE_EMULATOR_HOST"] in line, line  # and why: that endpoint does not answer
    assert not (tmp_path / "out").exists()


def test_gcs_object_read_that_never_answers_is_one_line(silent_endpoint):
    """A worker's ranged read of a shard is bounded too (source side, tensorstore's retries cut short)."""
    code = textwrap.dedent("""
        from rayconv import tunables
        from rayconv.errors import SourceError
        from rayconv.source.gcs import GcsObject
        tunables.install(tunables.Tunables(storage_timeout_s=2))
        try:
            GcsObject("gs://silent-bucket/consolidated.00.pth", size=1 << 20).readinto(0, memoryview(bytearray(1 << 20)))
        except SourceError as exc:
            print("error:", exc)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                            env=dict(os.environ, **silent_endpoint))
    assert "error: gs://silent-bucket: no answer from Cloud Storage within 2 s" in result.stdout, result.stderr[-2000:]


def test_check_writable_missing_bucket(fake_gcs):
    with pytest.raises(OutputError) as info:
        Location.parse("gs://no-such-bucket-rayconv/x").check_writable()
    assert "gs://no-such-bucket-rayconv/x" in one_line(info.value)


# ---------------------------------------------------------------------------------------------
# GcsObject: ranged reads of a real .pth


@pytest.fixture
def staged_gcs(small_checkpoint, gcs_prefix):
    """The small checkpoint copied into the fake bucket (google-cloud-storage upload)."""
    for name in sorted(os.listdir(small_checkpoint)):
        gcs_prefix.write_bytes(name, (small_checkpoint / name).read_bytes())
    return gcs_prefix


def test_gcs_object_range_reads_match_local(staged_gcs, small_checkpoint):
    local = (small_checkpoint / "consolidated.01.pth").read_bytes()
    uri = staged_gcs.join("consolidated.01.pth").uri
    src = open_source(uri)
    assert isinstance(src, GcsObject)
    assert src.size() == len(local)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = int(rng.integers(0, len(local) - 1))
        n = int(rng.integers(1, min(300_000, len(local) - a) + 1))
        assert src.read(a, n) == local[a:a + n]
    # A large read split into many parallel sub-reads (chunk 1 MiB, 3 in flight).
    small = GcsObject(uri, chunk_size=MiB, concurrency=3)
    buf = memoryview(bytearray(len(local) - 5))
    small.readinto(5, buf)
    assert bytes(buf) == local[5:]
    assert small.read(len(local) - 1, 1) == local[-1:]
    assert small.read(0, 0) == b""


def test_gcs_object_zip_index_matches_local(staged_gcs, small_checkpoint):
    """zipfile over RangeFile(GcsObject) sees the same records, and record bytes match."""
    path = small_checkpoint / "consolidated.00.pth"
    remote = zipfile.ZipFile(RangeFile(open_source(staged_gcs.join("consolidated.00.pth").uri)))
    local = zipfile.ZipFile(path)
    assert [(i.filename, i.header_offset, i.file_size, i.CRC) for i in remote.infolist()] == \
           [(i.filename, i.header_offset, i.file_size, i.CRC) for i in local.infolist()]
    name = next(n for n in local.namelist() if n.endswith("data.pkl"))
    assert remote.read(name) == local.read(name)


def test_gcs_object_errors_are_one_line(staged_gcs):
    missing = GcsObject(staged_gcs.join("consolidated.07.pth").uri)
    with pytest.raises(SourceError) as info:
        missing.size()
    assert "missing file" in one_line(info.value) and "consolidated.07.pth" in str(info.value)
    src = GcsObject(staged_gcs.join("params.json").uri)
    with pytest.raises(SourceError) as info:
        src.read(0, src.size() + 1)
    assert "truncated" in one_line(info.value)
    with pytest.raises(SourceError):
        GcsObject("gs://rayconv-test")


def test_object_info_md5(staged_gcs, small_checkpoint):
    import hashlib

    data = (small_checkpoint / "params.json").read_bytes()
    info = object_info(staged_gcs.bucket, staged_gcs.join("params.json").path)
    assert info["size"] == len(data)
    assert info["md5"] == hashlib.md5(data).hexdigest()
    assert object_info(staged_gcs.bucket, staged_gcs.join("nope").path) is None


def test_compose_tree(gcs_prefix):
    """More than 32 parts go through intermediate composites; result is the concatenation."""
    from rayconv.gcs_api import compose

    pieces = [bytes([i]) * (1000 + i) for i in range(70)]
    for i, p in enumerate(pieces):
        gcs_prefix.write_bytes(f"p/{i:03d}", p)
    compose(gcs_prefix.bucket, [gcs_prefix.join(f"p/{i:03d}").path for i in range(70)],
            gcs_prefix.join("joined").path, scratch_prefix=gcs_prefix.join("tmp").path + "/")
    assert gcs_prefix.read_bytes("joined") == b"".join(pieces)
    assert gcs_prefix.list_keys("tmp") == []


# ---------------------------------------------------------------------------------------------
# tensorstore writes on the emulator: zarr3 over OCDBT (the layout Orbax writes)


def test_tensorstore_zarr3_over_ocdbt_on_gcs(gcs_prefix):
    import tensorstore as ts

    base = gcs_prefix.join("ckpt", "0", "items").kvstore_spec()
    ocdbt = {"driver": "ocdbt", "base": base}

    def spec(name: str, shape, chunks) -> dict:
        return {
            "driver": "zarr3",
            "kvstore": {**ocdbt, "path": f"{name}/"},
            "metadata": {"shape": list(shape), "data_type": "bfloat16",
                         "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}}},
        }

    rng = np.random.default_rng(1)
    a = rng.standard_normal((64, 48)).astype(ts.bfloat16.numpy_dtype)
    b = rng.standard_normal((16, 8, 4)).astype(ts.bfloat16.numpy_dtype)
    arr = ts.open(spec("params.decoder.w", a.shape, (16, 48)), create=True, open=False).result()
    arr.write(a).result()
    # Re-open the same OCDBT database (new manifest generation) and add a second array: the step
    # that gcp-storage-emulator breaks and that multi-writer saves rely on.
    arr2 = ts.open(spec("params.token_embedder", b.shape, (8, 8, 4)), create=True, open=False,
                   context=ts.Context()).result()
    arr2.write(b).result()
    fresh = ts.Context()
    got_a = ts.open({"driver": "zarr3", "kvstore": {**ocdbt, "path": "params.decoder.w/"}}, context=fresh).result()
    got_b = ts.open({"driver": "zarr3", "kvstore": {**ocdbt, "path": "params.token_embedder/"}}, context=fresh).result()
    np.testing.assert_array_equal(got_a.read().result().view(np.uint16), a.view(np.uint16))
    np.testing.assert_array_equal(got_b.read().result().view(np.uint16), b.view(np.uint16))
    keys = gcs_prefix.join("ckpt", "0", "items").list_keys()
    assert "manifest.ocdbt" in keys and any(k.startswith("d/") for k in keys), keys


def test_orbax_restores_converted_params_from_gcs(gcs_prefix, tmp_path):
    """rayconv's gs:// output is a checkpoint Orbax itself restores on GCS (via etils/gcsfs for the
    directory operations and tensorstore for the arrays), equal to the local conversion."""
    import jax
    import orbax.checkpoint as ocp

    from rayconv.engine.driver import convert

    from rayconv.job import ConvertOptions
    from rayconv.source.checkpoint import list_input
    from rayconv.synthetic import SyntheticModel, write_checkpoint

    src = write_checkpoint(SyntheticModel(dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=1024,
                                          n_shards=1, seed=9), tmp_path / "ckpt")
    results = {}
    for name, out in (("local", str(tmp_path / "out")), ("gs", gcs_prefix.join("out").uri)):
        result = convert(ConvertOptions(files=list_input(str(src)), input_display=name, output=out,
                                        model_path="Llama3.1-8B", executor="local", progress=False))
        path = result.outputs["scanned"]
        checkpointer = ocp.PyTreeCheckpointer()
        tree = checkpointer.metadata(path).item_metadata.tree
        target = {"params": tree["params"]}
        args = jax.tree_util.tree_map(lambda _: ocp.ArrayRestoreArgs(restore_type=np.ndarray), target)
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(item=target, restore_args=args,
                                                                          partial_restore=True))
        results[name] = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(restored)}
    assert len(results["gs"]) >= 9 and sorted(results["gs"]) == sorted(results["local"])
    for key, value in results["local"].items():
        assert results["gs"][key].dtype == value.dtype
        assert results["gs"][key].tobytes() == value.tobytes(), key


# ---------------------------------------------------------------------------------------------
# Throughput (printed, not asserted) and memory while streaming


def test_gcs_throughput(gcs_prefix, capsys):
    total, size = 192 * MiB, 48 * MiB
    payload = np.random.default_rng(2).integers(0, 255, size, dtype=np.uint8).tobytes()
    t = time.perf_counter()
    for i in range(total // size):
        gcs_prefix.write_bytes(f"tp/{i}", payload)
    write = total / MiB / (time.perf_counter() - t)
    buf = memoryview(bytearray(size))
    t = time.perf_counter()
    for i in range(total // size):
        GcsObject(gcs_prefix.join(f"tp/{i}").uri).readinto(0, buf)
    read = total / MiB / (time.perf_counter() - t)
    assert bytes(buf) == payload
    with capsys.disabled():
        print(f"\n[throughput] fake-gcs-server, {total // MiB} MiB in {size // MiB} MiB objects: "
              f"write {write:.0f} MB/s (tensorstore single-request upload), "
              f"read {read:.0f} MB/s (GcsObject, default chunking)")
    gcs_prefix.delete_all()


STREAM_CHILD = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {repo!r})
    import rayconv.source.gcs, rayconv.source.http
    from rayconv.source.bytesource import open_source
    import hashlib
    src = open_source(sys.argv[1])
    size = src.size()
    tensor = int(sys.argv[2])
    buf = memoryview(bytearray(tensor))
    md5 = hashlib.md5()
    def status(field):  # kB; VmHWM is this process's own peak (ru_maxrss survives exec on Linux)
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))
    src.read(0, 1)  # warm up: clients, connection pools, tensorstore context
    base = status("VmHWM")
    t = time.perf_counter()
    for offset in range(0, size, tensor):
        n = min(tensor, size - offset)
        src.readinto(offset, buf[:n])
        md5.update(buf[:n])
    dt = time.perf_counter() - t
    peak = status("VmHWM")
    print(json.dumps({{"base_mb": base / 1024, "peak_mb": peak / 1024, "md5": md5.hexdigest(),
                      "mb_s": size / 2**20 / dt}}))
""")


def stream_in_child(uri: str, tensor_bytes: int) -> dict:
    """Read ``uri`` tensor by tensor in a fresh process; report its RSS before and after."""
    code = STREAM_CHILD.format(repo=REPO)
    out = subprocess.run([sys.executable, "-c", code, uri, str(tensor_bytes)], check=True,
                         capture_output=True, text=True, env=dict(os.environ), timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def big_blob(tmp_path_factory):
    """A 320 MiB file (larger than the 64 MiB per-tensor buffer and the ~200 MiB budget below)."""
    import hashlib

    path = tmp_path_factory.mktemp("big") / "consolidated.00.pth"
    rng = np.random.default_rng(3)
    md5 = hashlib.md5()
    with open(path, "wb") as f:
        for _ in range(10):
            block = rng.integers(0, 255, 32 * MiB, dtype=np.uint8).tobytes()
            f.write(block)
            md5.update(block)
    return path, md5.hexdigest()


BUDGET_MB = 200  # allowed RSS growth while streaming 320 MiB through a 64 MiB buffer


def test_gcs_streaming_memory(big_blob, gcs_prefix, capsys):
    from google.cloud import storage

    path, md5 = big_blob
    client = storage.Client()
    blob = client.bucket(gcs_prefix.bucket).blob(gcs_prefix.join("big.pth").path, chunk_size=16 * MiB)
    blob.upload_from_filename(str(path))  # resumable, chunked: the test process stays small too
    result = stream_in_child(gcs_prefix.join("big.pth").uri, 64 * MiB)
    assert result["md5"] == md5
    growth = result["peak_mb"] - result["base_mb"]
    with capsys.disabled():
        print(f"\n[memory] gs:// 320 MiB streamed in 64 MiB reads: peak RSS {result['peak_mb']:.0f} MB "
              f"(+{growth:.0f} MB over {result['base_mb']:.0f} MB after imports), {result['mb_s']:.0f} MB/s")
    assert growth < BUDGET_MB
    gcs_prefix.delete_all()


def test_http_streaming_memory(big_blob, capsys):
    from servers import SignedUrlServer

    path, md5 = big_blob
    with SignedUrlServer(path.parent) as server:
        url = server.url().replace("*", path.name)
        result = stream_in_child(url, 64 * MiB)
        assert not server.file_requests(path.name, "HEAD")
    assert result["md5"] == md5
    growth = result["peak_mb"] - result["base_mb"]
    with capsys.disabled():
        print(f"\n[memory] https 320 MiB streamed in 64 MiB reads: peak RSS {result['peak_mb']:.0f} MB "
              f"(+{growth:.0f} MB over {result['base_mb']:.0f} MB after imports), {result['mb_s']:.0f} MB/s")
    assert growth < BUDGET_MB


def test_errors_are_conversion_errors():
    assert issubclass(SourceError, ConversionError) and issubclass(OutputError, ConversionError)
