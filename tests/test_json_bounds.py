"""Hostile JSON in every file rayconv reads (issue 21): one line and exit 1, or a finished run, never a traceback.

Two payloads the standard library cannot take: ``[``×100000 ``]``×100000 exhausts the recursion limit
(``RecursionError``) and a 5000-digit integer exceeds CPython's int-conversion limit. Each is put in every
JSON file rayconv parses: the input's (params.json, config.json, the index, a safetensors header), the
ledger's (``plan.json``, ``md5.json``, ``commits/*.json``, ``receipts/*.json``; a fresh run and ``--restart``,
which must clear whatever the ledger holds and convert), an output's ``_METADATA`` and ``_CHECKPOINT_METADATA``
(``rayconv verify``, the resumed commit's check), the download's staging records and a signed URL's policy.
The real CLI runs the user's paths (local executor); the outputs of every finished run are proven by verify.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
from pathlib import Path

import pytest

from conftest import CACHE, MODELS, synthetic_checkpoint
from helpers import ITEMS, assert_one_line, run_convert_cli, run_cli
from hf_checkpoints import ensure_hf_checkpoint
from rayconv.source.http import policy_expiry
from rayconv.storage import Location
from rayconv.synthetic import SyntheticModel

PAYLOADS = {
    "nested": b"[" * 100_000 + b"]" * 100_000,
    "5000 digits": b'{"fingerprint": ' + b"9" * 5000 + b"}",
}
#: What rayconv says about each payload (rayconv.jsonio).
SAYS = {"nested": "nested too deeply", "5000 digits": "a number of 5000 characters"}

META = MODELS["llama2-mp2"][0]  # 2 shards: several units, so an interrupted run leaves receipts and work to do
HF = SyntheticModel(family="llama-3.1", dim=256, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=256,
                    multiple_of=64, n_shards=1, seed=51)


def meta_convert(src: Path, out: Path, *extra: str, env: dict | None = None):
    return run_convert_cli("--input_directory", str(src), "--output_directory", str(out), "--model_name", META.family,
                           *extra, env=env)


def verified(src: Path, out: Path) -> None:
    result = run_cli("verify", str(src), str(out), "--model_name", META.family)
    assert result.returncode == 0 and "identical to the mapping" in result.stdout, result.stderr[-3000:]


@pytest.fixture(scope="module")
def meta_src(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("meta") / "in"
    shutil.copytree(synthetic_checkpoint(META), src)
    return src


@pytest.fixture(scope="module")
def ledgers(meta_src, tmp_path_factory) -> dict[str, Path]:
    """Two outputs to copy and damage: one interrupted after its first unit (plan.json, md5.json, a receipt, units
    left to do), one finished (commits/*.json)."""
    root = tmp_path_factory.mktemp("ledgers")
    interrupted = meta_convert(meta_src, root / "interrupted", env={"RAYCONV_TEST_STOP_AFTER": "units:1"})
    assert interrupted.returncode != 0 and not list((root / "interrupted").rglob("commit_success.txt"))
    finished = meta_convert(meta_src, root / "finished")
    assert finished.returncode == 0, finished.stderr[-3000:]
    return {"interrupted": root / "interrupted", "finished": root / "finished"}


def hf_src(tmp_path: Path) -> Path:
    src = tmp_path / "hf"
    shutil.copytree(ensure_hf_checkpoint(HF, CACHE / "synthetic-hf", max_shard_size="100KB"), src)
    return src


# -- the input's JSON: one line naming the file ------------------------------------------------------------------


def _header_file(src: Path, payload: bytes) -> str:
    """The first safetensors file's header replaced by ``payload`` (the data section kept)."""
    path = sorted(src.glob("model-*.safetensors"))[0]
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    body = payload + b" " * (-len(payload) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
    return path.name


def _replaced(name: str):
    def damage(src: Path, payload: bytes) -> str:
        (src / name).write_bytes(payload)
        return name
    return damage


INPUTS = {name: _replaced(name) for name in ("params.json", "config.json", "model.safetensors.index.json")}
INPUTS["safetensors header"] = _header_file


@pytest.mark.parametrize("payload", list(PAYLOADS))
@pytest.mark.parametrize("kind", list(INPUTS))
def test_hostile_json_in_the_input_is_one_line(kind, payload, meta_src, tmp_path):
    if kind == "params.json":
        src = tmp_path / "in"
        shutil.copytree(meta_src, src)
    else:
        src = hf_src(tmp_path)
    name = INPUTS[kind](src, PAYLOADS[payload])
    out = tmp_path / "out"
    args = ["--input_directory", str(src), "--output_directory", str(out)]
    error = assert_one_line(run_convert_cli(*args, *(["--model_name", META.family] if kind == "params.json" else [])),
                            SAYS[payload], out)
    assert name in error, error


# -- the ledger's JSON: a fresh run says what to do, --restart does it --------------------------------------------


def _receipt(out: Path) -> Path:
    return sorted((out / ".rayconv" / "receipts").glob("*.json"))[0]


LEDGER = {  # file → (which output holds it, where it is, what a rerun without --restart gives: None = it finishes)
    "plan.json": ("interrupted", lambda out: out / ".rayconv" / "plan.json", "plan.json is damaged"),
    "md5.json": ("interrupted", lambda out: out / ".rayconv" / "md5.json", None),
    "receipts/*.json": ("interrupted", _receipt, None),
    "commits/*.json": ("finished", lambda out: out / ".rayconv" / "commits" / "scanned.json",
                       "commits/scanned.json is damaged"),
}


@pytest.mark.parametrize("restart", [False, True], ids=["rerun", "restart"])
@pytest.mark.parametrize("payload", list(PAYLOADS))
@pytest.mark.parametrize("kind", list(LEDGER))
def test_hostile_json_in_the_ledger(kind, payload, restart, ledgers, meta_src, tmp_path):
    base, where, refusal = LEDGER[kind]
    out = tmp_path / "out"
    shutil.copytree(ledgers[base], out)
    target = where(out)
    assert target.exists(), target
    target.write_bytes(PAYLOADS[payload])
    result = meta_convert(meta_src, out, *(["--restart"] if restart else []))
    if refusal is not None and not restart:
        error = assert_one_line(result, refusal)
        assert "--restart" in error, error
        return
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    if kind == "md5.json" and not restart:  # a damaged record only costs the md5 pass
        assert "not hashed again" not in result.stderr
    if kind == "receipts/*.json" and not restart:  # ... and a damaged receipt its unit
        assert "is not a valid rayconv receipt; its unit runs again" in result.stderr, result.stderr[-3000:]
    verified(meta_src, out)


def test_restart_clears_directories_where_records_belong(ledgers, meta_src, tmp_path):
    """``--restart`` clears the ledger's entries, not only its keys: a directory named plan.json (keys only inside
    it) would otherwise stay and block the new plan record."""
    out = tmp_path / "out"
    shutil.copytree(ledgers["finished"], out)
    for name in ("plan.json", "md5.json"):
        (out / ".rayconv" / name).unlink()
        (out / ".rayconv" / name / "x").mkdir(parents=True)
        (out / ".rayconv" / name / "x" / "y.json").write_bytes(PAYLOADS["nested"])
    assert_one_line(meta_convert(meta_src, out), "--restart")
    result = meta_convert(meta_src, out, "--restart")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / ".rayconv" / "plan.json").is_file()
    verified(meta_src, out)


# -- the output's JSON: verify and the resumed commit's check --------------------------------------------------


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_hostile_metadata_in_verify_is_one_line(payload, ledgers, meta_src, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(ledgers["finished"], out)
    (out / ITEMS["unscanned"] / "_METADATA").write_bytes(PAYLOADS[payload])
    error = assert_one_line(run_cli("verify", str(meta_src), str(out), "--model_name", META.family), "_METADATA")
    assert "is damaged" in error, error


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_hostile_checkpoint_metadata_in_verify(payload, ledgers, meta_src, tmp_path):
    """A scanned-only output's step ``_CHECKPOINT_METADATA`` only tells the layout: damaged, the default is
    checked (and the data still has to match)."""
    out = tmp_path / "out"
    shutil.copytree(ledgers["finished"], out)
    shutil.rmtree(out / "bf16" / "unscanned")
    shutil.rmtree(out / ".rayconv")  # as MaxText's scripts leave it: no ledger naming the unscanned output
    (out / "bf16" / "scanned" / "0" / "_CHECKPOINT_METADATA").write_bytes(PAYLOADS[payload])
    verified(meta_src, out)


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_hostile_metadata_at_the_resumed_commit(payload, ledgers, meta_src, tmp_path):
    """The ledger says ``committing`` and the output carries its marker: the commit only checks ``_METADATA``."""
    out = tmp_path / "out"
    shutil.copytree(ledgers["finished"], out)
    commit = out / ".rayconv" / "commits" / "scanned.json"
    commit.write_text(json.dumps(dict(json.loads(commit.read_text()), state="committing")))
    (out / ITEMS["scanned"] / "_METADATA").write_bytes(PAYLOADS[payload])
    assert_one_line(meta_convert(meta_src, out), "its _METADATA is not the tree this conversion writes")
    result = meta_convert(meta_src, out, "--restart")
    assert result.returncode == 0, result.stderr[-3000:]
    verified(meta_src, out)


# -- the download's records and a signed URL's policy ----------------------------------------------------------


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_hostile_staging_state_is_fetched_again(payload, tmp_path):
    from rayconv.staging import STAGING_DIR, _LocalParts

    parts = _LocalParts(Location.parse(str(tmp_path)), "consolidated.00.pth", size=10, part_size=4)
    Path(parts.partial).write_bytes(b"x" * 10)
    Path(parts.state_path).write_bytes(PAYLOADS[payload])
    assert parts.open() == set()  # nothing trusted: every part is fetched again
    parts.discard()
    for bad in ({"size": 10, "part_size": 4, "done": [0, 7]}, {"size": 10, "part_size": 4, "done": "all"}):
        Path(parts.partial).write_bytes(b"x" * 10)
        Path(parts.state_path).write_text(json.dumps(bad))
        assert parts.open() == set(), bad
        parts.discard()
    Path(parts.partial).write_bytes(b"x" * 10)
    Path(parts.state_path).write_text(json.dumps({"size": 10, "part_size": 4, "done": [0, 2]}))
    assert parts.open() == {0, 2}  # a sound record still resumes
    parts.discard()
    assert (tmp_path / STAGING_DIR).is_dir()


def _policy_url(document: bytes) -> str:
    policy = base64.b64encode(document).decode().translate(str.maketrans("+=/", "-_~"))
    return f"https://example.com/Llama3.1-8B/params.json?Policy={policy}&Signature=s&Key-Pair-Id=k"


@pytest.mark.parametrize("document", [
    PAYLOADS["nested"], PAYLOADS["5000 digits"],
    b'{"Statement": [{"Condition": {"DateLessThan": {"AWS:EpochTime": 1e300}}}]}',
    b'{"Statement": [{"Condition": {"DateLessThan": {"AWS:EpochTime": -1e300}}}]}',
    b'{"Statement": [{"Condition": {"DateLessThan": {"AWS:EpochTime": "Infinity"}}}]}',
    b'{"Statement": "x"}',
], ids=["nested", "5000 digits", "1e300", "-1e300", "Infinity", "not a list"])
def test_hostile_policy_has_no_expiry(document):
    assert policy_expiry(_policy_url(document)) is None


def test_sound_policy_expiry():
    good = b'{"Statement": [{"Condition": {"DateLessThan": {"AWS:EpochTime": 1700000000}}}]}'
    assert policy_expiry(_policy_url(good)) == 1700000000.0
