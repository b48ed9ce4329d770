"""``rayconv export`` against MaxText 0.2.5's ``to_huggingface.py``: the same files, byte for byte.

rayconv's own scanned and unscanned outputs of the synthetic Llama 3.1 (head_dim 32), in both tree layouts, and a
float32 checkpoint of MaxText's own trainer, are exported by rayconv and by MaxText (tools/maxtext_ref/to_hf.py,
cached); every safetensors file, the index and every config.json field but ``dtype`` (which MaxText omits and
``save_pretrained`` writes) must be equal. Also: the model check (one line, nothing written), the resume of a
killed export, the gs:// output and the Ray executor.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import MODELS, run_convert, synthetic_checkpoint
from helpers import ITEMS, copy_down, one_error, run_cli
from rayconv.exporting.driver import ExportOptions, export
from rayconv.sink.commit import STOP_EXIT_CODE
from rayconv.targets.safetensors_files import INDEX_FILE, SINGLE_FILE
from rayconv.targets.safetensors_writer import PARTIAL_SUFFIX

MODEL = MODELS["llama31-mp8"][0]
SPLIT = 150_000  # bytes: the 4.3 MB synthetic model in 17 files, as a real one is split at 3 GiB


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """{layout: rayconv's scanned + unscanned output} of the synthetic Llama 3.1, and its HF config.json."""
    from hf_checkpoints import hf_config

    root = tmp_path_factory.mktemp("export-src")
    outs = {}
    for layout in ("linen", "nnx"):
        outs[layout] = root / layout
        run_convert(synthetic_checkpoint(MODEL), outs[layout], model_name=MODEL.family, executor="local",
                    kinds=("scanned", "unscanned"), maxtext_layout=layout, verify=False)
    config = hf_config(MODEL)
    config.bos_token_id, config.eos_token_id = 128000, 128001  # Llama 3.1's, as its config.json on the Hub says
    config.to_json_file(str(root / "config.json"))
    outs["config"] = root / "config.json"
    return outs


def run_export(items, out, config, **kwargs):
    options = dict(executor="local", progress=False)
    options.update(kwargs)
    return export(ExportOptions(input=str(items), output=str(out), config=str(config), **options))


def assert_same_files(ours: Path, theirs: Path) -> list[str]:
    """Every safetensors file and the index byte-equal, the same set of files, config.json equal but dtype."""
    names = sorted(p.name for p in theirs.iterdir())
    assert sorted(p.name for p in ours.iterdir() if not p.name.startswith(".")) == sorted(
        names + ["generation_config.json"])
    for name in names:
        if name != "config.json":
            assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    mine, maxtext = (json.loads((d / "config.json").read_text()) for d in (ours, theirs))
    assert mine.pop("dtype") == "bfloat16" and mine == maxtext
    return names


CASES = [("linen", "unscanned", SPLIT), ("linen", "scanned", None), ("nnx", "unscanned", None),
         ("nnx", "scanned", None)]


@pytest.mark.parametrize("layout,kind,split", CASES, ids=[f"{a}-{b}" for a, b, _ in CASES])
def test_export_equals_maxtexts(reference_025, outputs, tmp_path, layout, kind, split):
    items = outputs[layout] / ITEMS[kind]
    theirs = reference_025.to_huggingface(MODEL, items, scanned=kind == "scanned", max_shard_size=split)
    result = run_export(items, tmp_path / "hf", outputs["config"], **({"max_shard_size": split} if split else {}))
    names = assert_same_files(tmp_path / "hf", theirs)
    assert (INDEX_FILE in names) == (split is not None) and len(result.files) == (17 if split else 1)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 128000 and generation["eos_token_id"] == 128001


def test_generation_config_is_transformers(outputs, tmp_path):
    """generation_config.json is what transformers' save_pretrained writes for the same config, byte for byte."""
    from transformers import GenerationConfig, LlamaConfig

    run_export(outputs["linen"] / ITEMS["unscanned"], tmp_path / "hf", outputs["config"])
    config = LlamaConfig.from_pretrained(str(tmp_path / "hf"))
    GenerationConfig.from_model_config(config).save_pretrained(str(tmp_path / "tf"))
    assert (tmp_path / "hf/generation_config.json").read_bytes() == (tmp_path / "tf/generation_config.json").read_bytes()
    config.save_pretrained(str(tmp_path / "tf"))
    assert json.loads((tmp_path / "hf/config.json").read_text()) == json.loads((tmp_path / "tf/config.json").read_text())


def test_training_checkpoint_exports(reference_025, outputs, tmp_path):
    """maxtext 0.2.5's trainer's checkpoint (float32 params + Adam state): its params, rounded to bf16 as MaxText
    restores them, give MaxText's export byte for byte; the optimizer state is not exported."""
    items = reference_025.train(MODEL, steps=2)
    theirs = reference_025.to_huggingface(MODEL, items, scanned=True)
    run_export(items.parent, tmp_path / "hf", outputs["config"])  # the step directory works too
    assert assert_same_files(tmp_path / "hf", theirs) == ["config.json", SINGLE_FILE]


@pytest.mark.parametrize("flag,value,needle", [
    ("--model_name", "llama3.1-8b", "has 2 decoder layers, llama3.1-8b has 32"),
    ("num_hidden_layers", 3, "has 2 decoder layers"),
    ("num_attention_heads", 16, "head_dim 32 (checkpoint) vs 16, num_attention_heads 8 (checkpoint) vs 16"),
    ("vocab_size", 1024, "vocab_size 512 (checkpoint) vs 1024"),
    ("num_key_value_heads", 4, "num_key_value_heads 8 (checkpoint) vs 4"),
    ("--model_name", "llama3.9-8b", "unknown --model_name"),
    ("--config", "/", "--config / is a directory, not a file"),
])
def test_wrong_model_is_one_line_and_nothing_written(outputs, tmp_path, flag, value, needle):
    if flag.startswith("--"):
        model = [flag, value]
    else:
        config = json.loads(outputs["config"].read_text())
        config[flag] = value
        if flag == "num_attention_heads":
            config["head_dim"] = 16
        (tmp_path / "config.json").write_text(json.dumps(config))
        model = ["--config", str(tmp_path / "config.json")]
    result = run_cli("export", "--executor", "local", "--no_progress", "--input_directory",
                     str(outputs["linen"] / ITEMS["scanned"]), "--output_directory", str(tmp_path / "hf"), *model)
    assert needle in one_error(result)
    assert not (tmp_path / "hf").exists()


DAMAGED_LEAF = "params.params.decoder.layers.mlp.wi_0.kernel"
DAMAGES = [("chunk missing", f"chunk {{0, 0, 0}} stored at \"{DAMAGED_LEAF}/c/0/0/0\" is missing (NOT_FOUND)"),
           ("chunk short", f"Error reading \"{DAMAGED_LEAF}/c/0/0/0\": Not enough data"),
           ("chunk_shape beyond the shape", f"{DAMAGED_LEAF}/zarr.json: chunk_shape [1099511627776, "),
           ("data file missing", "zarr.json: Error reading Byte range [0, ")]


def _damage(items: Path, case: str) -> None:
    """One kind of damage to the OCDBT database of ``items`` (tensorstore writes into it, as Orbax's do)."""
    import tensorstore as ts

    database = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{items}/"}).result()
    meta = json.loads(bytes(database.read(f"{DAMAGED_LEAF}/zarr.json").result().value))
    chunk = f"{DAMAGED_LEAF}/c/" + "/".join("0" * len(meta["shape"]))
    if case == "chunk missing":  # Orbax writes every chunk (store_array_data_equal_to_fill_value): not zeros
        database.delete_range(ts.KvStore.KeyRange(chunk, chunk + "\0")).result()
    elif case == "chunk short":
        database.write(chunk, b"\0" * 100).result()
    elif case == "chunk_shape beyond the shape":  # was a std::bad_alloc abort in tensorstore's chunk decode
        meta["chunk_grid"]["configuration"]["chunk_shape"][0] = 1 << 40
        database.write(f"{DAMAGED_LEAF}/zarr.json", json.dumps(meta).encode()).result()
    else:  # the root's data files, which every zarr.json is behind
        for path in (items / "d").iterdir():
            path.unlink()


@pytest.mark.parametrize("case,needle", DAMAGES, ids=[c for c, _ in DAMAGES])
def test_damaged_checkpoint_is_one_line_naming_the_damage_and_nothing_published(outputs, tmp_path, case, needle):
    """A chunk gone, short or described beyond its array, a data file gone: one line naming the key or file, and
    no published file (at most partial ones, under their partial names)."""
    items = tmp_path / "items"
    shutil.copytree(outputs["linen"] / ITEMS["scanned"], items)
    _damage(items, case)
    out = tmp_path / "hf"
    result = run_cli("export", "--executor", "local", "--no_progress", "--input_directory", str(items),
                     "--output_directory", str(out), "--config", str(outputs["config"]))
    error = one_error(result)
    assert needle in error and str(items) in error, error
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.endswith(PARTIAL_SUFFIX)
                                    and not p.name.startswith(".")], sorted(out.iterdir())


STOPS = [("export_units:5", "some units, no file published"), ("export_file:model-00009-of-00017.safetensors",
                                                                  "nine files published"),
         ("export_small:config.json", "every file, no index")]


@pytest.mark.parametrize("stop,_", STOPS, ids=[s for s, _ in STOPS])
def test_killed_export_resumes_to_the_same_bytes(outputs, tmp_path, stop, _):
    items = outputs["nnx"] / ITEMS["scanned"]
    clean = tmp_path / "clean"
    run_export(items, clean, outputs["config"], max_shard_size=SPLIT)
    out = tmp_path / "hf"
    args = ["export", "--executor", "local", "--no_progress", "--input_directory", str(items), "--output_directory",
            str(out), "--config", str(outputs["config"]), "--max_shard_size", str(SPLIT)]
    killed = run_cli(*args, env={"RAYCONV_TEST_STOP_AFTER": stop})
    assert killed.returncode == STOP_EXIT_CODE, killed.stderr[-2000:]
    assert not (out / INDEX_FILE).exists()  # the last file: the directory does not look complete
    for path in out.glob("*.safetensors"):  # published files are whole; the rest only under their partial names
        assert path.read_bytes() == (clean / path.name).read_bytes(), path.name
    partial = sorted(out.glob("*" + PARTIAL_SUFFIX))
    assert len(partial) + len(list(out.glob("*.safetensors"))) == 17
    published = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming" in resumed.stderr or stop.startswith("export_small")
    for path in clean.iterdir():
        if path.is_file():
            assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    assert not list(out.glob("*" + PARTIAL_SUFFIX))
    assert all((out / n).stat().st_mtime_ns == t for n, t in published.items())  # never rewritten
    again = run_cli(*args)
    assert again.returncode == 0 and "nothing to do" in again.stderr


def test_other_export_into_the_same_directory_is_refused(outputs, tmp_path):
    run_export(outputs["linen"] / ITEMS["unscanned"], tmp_path / "hf", outputs["config"])
    result = run_cli("export", "--executor", "local", "--input_directory", str(outputs["linen"] / ITEMS["unscanned"]),
                     "--output_directory", str(tmp_path / "hf"), "--config", str(outputs["config"]), "--dtype",
                     "float32")
    assert "holds another export" in one_error(result)
    restarted = run_cli("export", "--executor", "local", "--input_directory",
                        str(outputs["linen"] / ITEMS["unscanned"]), "--output_directory", str(tmp_path / "hf"),
                        "--config", str(outputs["config"]), "--dtype", "float32", "--restart")
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float32"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    result = run_cli("export", "--executor", "local", "--input_directory", str(outputs["linen"] / ITEMS["unscanned"]),
                     "--output_directory", str(tmp_path / "other"), "--config", str(outputs["config"]))
    assert "already exists and was not written by this export" in one_error(result)
    assert (tmp_path / "other" / "config.json").read_text() == "{}"


def _upload(items: Path, source):
    """Every file of a local checkpoint under the gs:// Location ``source``."""
    for path in items.rglob("*"):
        if path.is_file():
            source.write_bytes(str(path.relative_to(items)), path.read_bytes())
    return source


def _assert_bucket_holds(target, local: Path, down: Path) -> None:
    """The gs:// export ``target`` holds the local export's files byte for byte, and no staging objects."""
    copy_down(target, down)
    names = sorted(p.name for p in local.iterdir() if p.is_file())
    assert sorted(p.name for p in down.iterdir() if p.is_file()) == names
    for name in names:
        assert (down / name).read_bytes() == (local / name).read_bytes(), name
    assert not any(k.startswith(".rayconv-staging") for k in target.list_keys())


def test_gcs_input_and_output_equal_local(outputs, tmp_path, gcs_prefix):
    """A gs:// checkpoint exported to gs:// (parts composed into each file) gives the local export's bytes."""
    items = outputs["linen"] / ITEMS["scanned"]
    source = _upload(items, gcs_prefix.join("items"))
    run_export(items, tmp_path / "local", outputs["config"], max_shard_size=SPLIT)
    target = gcs_prefix.join("hf")
    run_export(source.uri, target.uri, outputs["config"], max_shard_size=SPLIT)
    _assert_bucket_holds(target, tmp_path / "local", tmp_path / "gcs")


def test_ray_executor_with_small_workers(outputs, tmp_path, ray_session):
    """Ray workers, and pieces cut to a tiny budget: the embedding in row blocks, every file still equal."""
    items = outputs["nnx"] / ITEMS["unscanned"]
    run_export(items, tmp_path / "local", outputs["config"])
    # A 4.2 GB 405B embedding against 1 GiB workers is this model's 256 KB embedding against a 64 KB budget.
    result = run_export(items, tmp_path / "ray", outputs["config"], executor="ray", num_workers=2,
                        piece_budget=64 << 10)
    assert result.workers == 2 and result.plan["largest_piece_bytes"] <= 64 << 10
    assert 0 < result.worker_peak_rss < 1 << 30  # each actor within its --worker_memory_gb (1)
    for name in os.listdir(tmp_path / "local"):
        if name.endswith((".safetensors", ".json")):
            assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


def test_verify_proves_an_export_and_names_a_damaged_tensor(outputs, tmp_path):
    items = outputs["nnx"] / ITEMS["scanned"]
    run_export(items, tmp_path / "hf", outputs["config"], max_shard_size=SPLIT)
    ok = run_cli("verify", str(items), str(tmp_path / "hf"))
    assert ok.returncode == 0 and "verified 21 tensors in 17 files" in ok.stdout, ok.stderr[-2000:]
    index = json.loads((tmp_path / "hf" / INDEX_FILE).read_text())
    damaged = tmp_path / "hf" / index["weight_map"]["model.layers.1.self_attn.k_proj.weight"]
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 1  # a bit of the last tensor's data, inside its range
    damaged.write_bytes(bytes(data))
    bad = run_cli("verify", str(items), str(tmp_path / "hf"))
    assert "differ from the inverse transform" in one_error(bad) and damaged.name in one_error(bad)


def test_killed_gcs_export_resumes_to_the_same_bytes(outputs, tmp_path, gcs_prefix):
    """gs:// to gs://, killed after nine of 17 files were composed: the bucket holds no index (nothing looks
    complete), the resume composes only the rest (the nine keep their generations) and ends with the local
    export's bytes and no staging objects."""
    from rayconv.gcs_api import object_info

    items = outputs["linen"] / ITEMS["scanned"]
    source = _upload(items, gcs_prefix.join("items"))
    run_export(items, tmp_path / "local", outputs["config"], max_shard_size=SPLIT)
    target = gcs_prefix.join("hf")
    args = ["export", "--executor", "local", "--no_progress", "--input_directory", source.uri, "--output_directory",
            target.uri, "--config", str(outputs["config"]), "--max_shard_size", str(SPLIT)]
    killed = run_cli(*args, env={"RAYCONV_TEST_STOP_AFTER": "export_file:model-00009-of-00017.safetensors"})
    assert killed.returncode == STOP_EXIT_CODE, killed.stderr[-2000:]
    published = {k: object_info(target.bucket, target.join(k).path)["generation"]
                 for k in target.list_keys() if k.endswith(".safetensors")}
    assert len(published) == 9 and INDEX_FILE not in target.list_keys()
    resumed = run_cli(*args)
    assert resumed.returncode == 0 and "Resuming" in resumed.stderr, resumed.stderr[-2000:]
    assert all(object_info(target.bucket, target.join(k).path)["generation"] == g for k, g in published.items())
    _assert_bucket_holds(target, tmp_path / "local", tmp_path / "gcs")
