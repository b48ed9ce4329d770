"""The whole job against remote storage through the real CLI and a real local Ray: the signed URL
(streamed, and staged into the bucket like the tutorial's ``base/`` copy) → gs:// on fake-gcs-server.

Outputs must be bit-equal to a local-disk conversion of the same shards, carry Orbax's commit markers
on GCS, pass ``rayconv verify`` read back from the bucket, keep each worker under its memory budget
while streaming a checkpoint larger than that budget, and never print or record the URL's signature.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess

from conftest import run_convert
from helpers import assert_same_leaves as leaves_equal
from helpers import copy_down, run_cli
from rayconv.storage import Location
from rayconv.synthetic import PRESETS, write_checkpoint
from servers import SignedUrlServer

DESCRIPTOR = "Llama3.1-405B-Instruct:bf16-mp16"
FOLDER = "Llama-3.1-405B-Instruct-MP16"  # Meta's CloudFront folder for that descriptor
MODEL = dataclasses.replace(PRESETS["demo"], n_layers=2, seed=31)  # 16 shards, 8 kv heads repeated, ~330 MB
SECRET_BITS = ("Signature=", "Policy=", "Key-Pair-Id=")


def cli(*args: str) -> subprocess.CompletedProcess:
    # synthetic shards are not Meta's published 405B sizes
    return run_cli(*args, env={"RAYCONV_META_SHARD_SIZES": "ignore"}, timeout=900)


def test_signed_url_and_bucket_to_bucket_through_ray(tmp_path, fake_gcs, gcs_bucket):
    cdn = tmp_path / "cdn"
    write_checkpoint(MODEL, cdn / FOLDER)
    local = tmp_path / "local"
    run_convert(cdn / FOLDER, local, model_path=DESCRIPTOR, kinds=("scanned", "unscanned", "int8"),
                quantize_type="int8", executor="local")
    root = Location.parse(f"gs://{gcs_bucket}/remote-{os.getpid()}")
    budget_gb = 0.3  # the model is ~330 MB: more than a worker's budget

    with SignedUrlServer(cdn) as server:
        url = server.url()
        server.drop_after[f"{FOLDER}/consolidated.03.pth"] = 5_000_000  # one dropped connection, resumed
        streamed = cli("convert", "--no_progress", "--meta_url", url, "--model_name", "llama-3.1", "--model_path",
                       DESCRIPTOR, "--output_directory", root.join("streamed").uri, "--inference_server",
                       "jetstream-maxtext", "--quantize_type", "int8", "--quantize_weights", "True",
                       "--worker_memory_gb", str(budget_gb))
        assert streamed.returncode == 0, streamed.stderr[-3000:]
        # The tutorial's shape: --bucket_name stages Meta's files into gs://<bucket>/base/… first.
        staged = cli("convert", "--no_progress", "--meta_url", url, "--model_name", "llama-3.1", "--model_path",
                     DESCRIPTOR, "--bucket_name", gcs_bucket, "--output_directory", root.join("staged").uri,
                     "--quantize_type", "int8", "--quantize_weights", "True")
        assert staged.returncode == 0, staged.stderr[-3000:]

    base = Location.parse(f"gs://{gcs_bucket}/base/{DESCRIPTOR.replace(':', '-')}")
    assert base.exists("checklist.chk") and base.exists("consolidated.15.pth")
    for name, result in (("streamed", streamed), ("staged", staged)):
        out = root.join(name)
        assert f"Completed unscanning checkpoint to {out.uri}/bf16/unscanned/checkpoints/0/items" in result.stderr
        assert f"Completed quantizing model llama3.1-405b with int8 to {out.uri}/int8" in result.stderr
        for sub in ("bf16/scanned/0", "bf16/scanned/0/items", "bf16/unscanned/checkpoints/0/items", "int8"):
            assert out.exists(f"{sub}/commit_success.txt"), (name, sub)
        copy_down(out, tmp_path / name)
        for sub in ("bf16/scanned/0/items", "bf16/unscanned/checkpoints/0/items", "int8"):
            leaves_equal(tmp_path / name / sub, local / sub)
        # Nothing secret in logs or in the ledger left in the bucket.
        ledger = "".join((out.read_bytes(k) or b"").decode() for k in out.list_keys(".rayconv/"))
        for bit in SECRET_BITS:
            assert bit not in result.stderr and bit not in result.stdout and bit not in ledger

    # Each worker stayed under its budget while streaming more than that from the URL.
    receipts = [json.loads(root.join("streamed").read_bytes(k)) for k in root.join("streamed").list_keys(".rayconv/receipts/")]
    peak = max(r["peak_rss"] for r in receipts)
    assert peak < budget_gb * (1 << 30), peak
    print(f"\nstreaming {MODEL.nbytes() / 1e6:.0f} MB from the URL: worker peak RSS {peak / 2**20:.0f} MiB "
          f"(budget {budget_gb} GiB)")

    # rayconv verify reads both source and output straight from the bucket.
    verified = cli("verify", base.uri, root.join("staged").uri, "--model_path", DESCRIPTOR)
    assert verified.returncode == 0, verified.stderr[-3000:]
    assert "identical to the mapping" in verified.stdout


def test_unwritable_bucket_is_one_line(tmp_path, fake_gcs):
    src = tmp_path / "src"
    write_checkpoint(dataclasses.replace(MODEL, n_layers=1, n_shards=16), src)
    result = cli("convert", "--no_progress", "--input_directory", str(src), "--model_path", DESCRIPTOR,
                 "--output_directory", "gs://no-such-bucket-rayconv/out")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("rayconv: error:")]
    assert len(errors) == 1 and "cannot write to gs://no-such-bucket-rayconv/out" in errors[0], result.stderr[-2000:]
