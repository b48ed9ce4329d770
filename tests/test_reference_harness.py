"""The MaxText reference harness itself works: on one tiny model, MaxText's scanned converter runs in the
reference env, the result is readable in this env, it equals an independent numpy re-derivation of
MaxText's rules, and MaxText's own loader restores it with the same bytes.

Only the scanned path runs here (~25 s cold, cached afterwards under <repo>/.cache/maxtext-ref), plus one
load_check that must fail (~10 s, failures are not cached). The fork-server tests (the tests' default way to run
the scripts) check what a fork must not change: the exit-code contract, the XLA_FLAGS device count, the timeout,
and the fallback to a plain subprocess when the server is gone.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import reference as refmod
from rayconv.synthetic import SyntheticModel, shard_tensors, write_checkpoint

BF16 = ml_dtypes.bfloat16

TINY = SyntheticModel(family="llama-3.1", dim=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=512, n_shards=2)


def expected_scanned(model: SyntheticModel) -> dict[str, np.ndarray]:
    """MaxText 0.2.4 llama_or_mistral_ckpt's scanned tree, re-derived with numpy from the synthetic shards
    (an oracle for the harness, independent of rayconv's converter)."""
    name = refmod.maxtext_model_name(model)
    shards = [dict(shard_tensors(model, s)) for s in range(model.n_shards)]
    e, h, kv, d, v = model.dim, model.n_heads, model.n_kv_heads, model.head_dim, model.vocab_size
    step = 2 if name == "llama3.1-405b" else 1
    permute = name[:8] not in ("llama3.1", "llama3.3")

    def cat(key: str, axis: int, sub=None) -> np.ndarray:
        return np.concatenate([s[key] for s in (sub or shards)], axis=axis)

    def rope(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a[..., ::2], a[..., 1::2]], axis=-1) if permute else a

    if name[:6] in ("llama3", "llama4"):
        emb = cat("tok_embeddings.weight", 0)
    else:
        emb = cat("tok_embeddings.weight", 1)[:v]
    q, k, val, out, wi0, wi1, wo, pre, post = ([] for _ in range(9))
    for i in range(model.n_layers):
        p = f"layers.{i}."
        q.append(rope(cat(p + "attention.wq.weight", 0).T.reshape(e, h, d)))
        k.append(rope(cat(p + "attention.wk.weight", 0, shards[::step]).T.reshape(e, kv, d)))
        val.append(cat(p + "attention.wv.weight", 0, shards[::step]).T.reshape(e, kv, d))
        out.append(cat(p + "attention.wo.weight", 1).reshape(e, h, d))
        wi0.append(cat(p + "feed_forward.w1.weight", 0).T)
        wi1.append(cat(p + "feed_forward.w3.weight", 0).T)
        wo.append(cat(p + "feed_forward.w2.weight", 1).T)
        pre.append(shards[0][p + "attention_norm.weight"])
        post.append(shards[0][p + "ffn_norm.weight"])
    divisor = np.float32(np.sqrt(d).astype(BF16))
    query = np.stack(q).transpose(1, 0, 2, 3)
    query = (query.astype(np.float32) / divisor).astype(BF16)
    pfx, lay = "params/params/", "params/params/decoder/layers/"
    return {
        pfx + "token_embedder/embedding": emb,
        pfx + "decoder/decoder_norm/scale": shards[0]["norm.weight"],
        pfx + "decoder/logits_dense/kernel": cat("output.weight", 0).T[:, :v],
        lay + "self_attention/query/kernel": query,
        lay + "self_attention/key/kernel": np.stack(k).transpose(1, 0, 2, 3),
        lay + "self_attention/value/kernel": np.stack(val).transpose(1, 0, 2, 3),
        lay + "self_attention/out/kernel": np.stack(out).transpose(2, 0, 3, 1),
        lay + "mlp/wi_0/kernel": np.stack(wi0).transpose(1, 0, 2),
        lay + "mlp/wi_1/kernel": np.stack(wi1).transpose(1, 0, 2),
        lay + "mlp/wo/kernel": np.stack(wo).transpose(1, 0, 2),
        lay + "pre_self_attention_layer_norm/scale": np.stack(pre).T,
        lay + "post_self_attention_layer_norm/scale": np.stack(post).T,
    }


def assert_bits_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        a, b = got[key], np.ascontiguousarray(want[key])
        assert a.dtype == b.dtype and a.shape == b.shape, (key, a.dtype, a.shape, b.dtype, b.shape)
        assert a.tobytes() == b.tobytes(), key


@pytest.fixture
def ref(reference):
    """conftest's session MaxTextReference (cache <repo>/.cache/maxtext-ref; a missing env fails)."""
    return reference


def test_model_names_follow_maxtext_rules():
    name = refmod.maxtext_model_name
    assert name(TINY) == "llama3.1-8b"
    assert name(SyntheticModel(family="llama-2", n_kv_heads=8)) == "llama2-7b"
    assert name(SyntheticModel(family="llama-3")) == "llama3-8b"
    assert name(SyntheticModel(family="llama-3.3")) == "llama3.3-70b"
    mp16 = SyntheticModel(family="llama-3.1", dim=512, n_heads=16, n_kv_heads=8, n_shards=16, vocab_size=1024)
    assert name(mp16) == "llama3.1-405b"
    with pytest.raises(refmod.ReferenceUnsupported):  # 405B MP8: kv step 4 is not in MaxText's script
        name(SyntheticModel(family="llama-3.1", dim=512, n_heads=16, n_kv_heads=2, n_shards=8, vocab_size=1024))
    with pytest.raises(refmod.ReferenceUnsupported):  # llama3.1-405b would also drop llama-3's rope permute
        name(SyntheticModel(family="llama-3", dim=512, n_heads=16, n_kv_heads=8, n_shards=16, vocab_size=1024))


def test_scanned_reference_roundtrip(ref, tmp_path):
    src = write_checkpoint(TINY, tmp_path / "src")
    items = ref.scanned(TINY, src)
    assert items.name == "items" and (items / "_METADATA").is_file()
    assert ref.scanned(TINY, src) == items  # second call is served from the cache
    assert ref.runs[-1].cached

    tree = refmod.metadata_tree(items)
    assert tree["step"]["value_type"] == "scalar"
    assert tree["opt_state"]["value_type"] == "Dict"

    leaves = refmod.read_leaves(items)
    assert int(leaves.pop("step")) == 0
    assert_bits_equal(leaves, expected_scanned(TINY))

    summary = ref.load_check(TINY, items, "scanned")
    assert summary["model_name"] == "llama3.1-8b"
    assert summary["leaves"] == {
        k: {**v, "sum": summary["leaves"][k]["sum"]} for k, v in refmod.leaves_summary(items).items()
    }


def test_load_check_fails_when_maxtext_cannot_restore(ref):
    """A scanned checkpoint is not loadable as unscanned: MaxText's loader reports the missing layers_i."""
    items = ref.scanned(TINY)
    with pytest.raises(refmod.ReferenceError, match="layers_0"):
        ref.load_check(TINY, items, "unscanned")


# --------------------------------------------------------------------------------------------------
# The fork server (conftest's ``reference`` runs every script through it)

#: llama-3 with 16 shards over 8 kv heads: scanned.py exits 3 ("UNSUPPORTED: ...") before importing MaxText.
UNSUPPORTED = SyntheticModel(family="llama-3", dim=512, n_heads=16, n_kv_heads=8, n_shards=16, vocab_size=1024)

DEVICE_PROBE = """
import os, sys
sys.path.insert(0, {scripts!r})
import _common
_common.bootstrap(device_count=None if sys.argv[1] == "none" else int(sys.argv[1]))
import jax
print(len(jax.devices()), sorted(k for k in os.environ if k.startswith("TF2_")))
"""


def run_unsupported(ref: refmod.MaxTextReference, tmp_path: Path) -> None:
    spec = json.dumps(refmod.model_spec(UNSUPPORTED))
    ref._run("scanned.py", ["--model", spec, "--src", tmp_path, "--out", tmp_path / "out"], tmp_path / "unsupported")


def test_fork_server_keeps_the_exit_code_contract(ref, tmp_path):
    """Exit 3 + UNSUPPORTED becomes ReferenceUnsupported through the server, as through a plain subprocess."""
    assert ref.fork_server
    with pytest.raises(refmod.ReferenceUnsupported, match="MaxText only de-duplicates repeated kv heads"):
        run_unsupported(ref, tmp_path)
    assert ref.last_run["via"] == "forkserver"


def test_forked_scripts_get_the_xla_device_count_they_set(ref, tmp_path):
    """jax reads XLA_FLAGS when its backend starts, which is in the forked child, after the script's bootstrap:
    scanned.py's 16 simulated devices (and 1 without the flag) as in a plain run; the server's import-time env
    (TF2_BEHAVIOR=1 from the TF import) reaches the child as a plain run's own imports would set it."""
    probe = tmp_path / "probe.py"
    probe.write_text(DEVICE_PROBE.format(scripts=str(refmod.SCRIPTS_DIR)))
    server = ref._fork_server_for(refmod.child_env(ref.maxtext))
    assert server is not None and server.info["failed"] == {}
    for arg, devices in (("16", 16), ("none", 1), ("16", 16)):
        out = tmp_path / f"probe-{arg}.out"
        request = {"script": str(probe), "argv": [arg], "cwd": str(tmp_path), "stdout": str(out),
                   "stderr": str(tmp_path / "probe.err"), "env": refmod.child_env(ref.maxtext), "timeout": 120}
        assert server.run(request, 120)[0] == 0, (tmp_path / "probe.err").read_text()[-2000:]
        assert out.read_text().split(None, 1) == [str(devices), "['TF2_BEHAVIOR']\n"]


def test_fork_server_timeout_kills_the_run_and_keeps_serving(ref, tmp_path):
    src = write_checkpoint(TINY, tmp_path / "src")
    spec = json.dumps(refmod.model_spec(TINY))
    timeout, ref.timeout = ref.timeout, 3
    try:
        with pytest.raises(refmod.ReferenceError, match="scanned.py timed out after 3 s"):
            ref._run("scanned.py", ["--model", spec, "--src", src, "--out", tmp_path / "out"], tmp_path / "slow")
    finally:
        ref.timeout = timeout
    server = ref._fork
    assert ref.last_run["via"] == "forkserver" and server is not None and server.alive()
    assert not Path(f"/proc/{server.last_pid}").exists()  # killed and reaped by the server
    with pytest.raises(refmod.ReferenceUnsupported):
        run_unsupported(ref, tmp_path)
    assert ref._fork is server and ref.last_run["via"] == "forkserver"


def test_a_dead_fork_server_falls_back_to_a_plain_subprocess(tmp_path):
    ref = refmod.MaxTextReference(tmp_path / "cache", fork_server=True)
    try:
        server = ref._fork_server_for(refmod.child_env(ref.maxtext))
        assert server is not None
        os.kill(server.pid, signal.SIGKILL)  # the server this test started
        server.proc.wait()
        with pytest.warns(refmod.ForkServerWarning, match="exited"):
            with pytest.raises(refmod.ReferenceUnsupported):
                run_unsupported(ref, tmp_path)
        assert ref.last_run["via"] == "subprocess" and ref._fork is None
    finally:
        ref.close()


def test_cache_keys_follow_the_code_not_its_comments():
    """A reworded comment or docstring keeps a script's cached MaxText runs; a changed line of code does not."""
    code = b'"""Doc."""\nimport os\n\n\ndef f(x):\n    """Say why."""\n    return x + 1  # one\n'
    reworded = b'"""Another doc."""\nimport os\n\n\ndef f(x):\n    """Say it otherwise."""\n    return x + 1  # two\n'
    changed = b'"""Doc."""\nimport os\n\n\ndef f(x):\n    """Say why."""\n    return x + 2  # one\n'
    assert refmod._code_of(code) == refmod._code_of(reworded)
    assert refmod._code_of(code) != refmod._code_of(changed)
