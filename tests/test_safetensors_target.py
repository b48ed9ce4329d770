"""The safetensors target: planned headers and byte ranges, written region by region, equal the libraries' files.

Each test writes tensors the way an export's workers will (rows of a tensor into its planned byte range, in
shuffled order) and compares the bytes with what ``safetensors.numpy.save_file`` and transformers'
``save_pretrained`` write for the same tensors. MaxText's own split (``to_huggingface.py``) is compared in
tests/test_export_reference.py against a real MaxText run.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rayconv.errors import OutputError
from rayconv.storage import Location
from rayconv.targets import safetensors_writer as writer
from rayconv.targets.safetensors_files import INDEX_FILE, SINGLE_FILE, plan_files

DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
          np.int64, np.uint64, np.float64, np.bool_, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]


def random_tensors(seed: int, count: int = 24) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(count):
        dtype = np.dtype(DTYPES[int(rng.integers(len(DTYPES)))])
        ndim = int(rng.integers(0, 4))
        shape = tuple(int(n) for n in rng.integers(0, 7, size=ndim))
        raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
        value = raw.view(dtype).reshape(shape) if dtype != np.bool_ else (raw % 2).astype(np.bool_).reshape(shape)
        # Names that sort differently as text and as bytes, and that JSON must escape.
        name = rng.choice(["model.layers.{i}.w", "a{i}", "Z{i}", "é{i}", "tab\t{i}", "q\"{i}\\"]).format(i=i)
        out[name] = value
    return out


def write_rows(directory: Location, plan, tensors: dict[str, np.ndarray], seed: int) -> None:
    """Every planned file written as workers would: create, then each tensor in row blocks, shuffled."""
    regions: dict[str, list[tuple[int, int]]] = {f.name: [] for f in plan.files}
    jobs = []
    for name, value in tensors.items():
        planned = plan.tensors[name]
        rows = value.shape[0] if value.ndim else 1
        flat = value.reshape(rows, int(np.prod(value.shape[1:]))) if value.ndim else value.reshape(1, 1)
        step = max(1, rows // 3)
        for begin in range(0, rows, step):
            end = min(rows, begin + step)
            jobs.append((planned.file, *planned.rows(begin, end), flat[begin:end]))
        if rows == 0 or planned.nbytes == 0:
            jobs.append((planned.file, planned.start, planned.start, flat[:0]))
    random.Random(seed).shuffle(jobs)
    for file in plan.files:
        writer.create(directory, file)
    open_writers = {f.name: writer.open_writer(directory, f) for f in plan.files}
    for file_name, start, stop, block in jobs:
        assert block.nbytes == stop - start
        open_writers[file_name].write(start, block)
        regions[file_name].append((start, stop))
    for w in open_writers.values():
        w.close()
    for file in plan.files:
        assert not (Path(directory.path) / file.name).exists()  # written, not yet published
        writer.finish(directory, file, [r for r in regions[file.name] if r[0] != r[1]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_file_equals_safetensors_save_file(tmp_path, seed):
    tensors = random_tensors(seed)
    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, str(theirs), metadata={"format": "pt"})
    plan = plan_files([(n, v.dtype, v.shape) for n, v in tensors.items()])
    assert [f.name for f in plan.files] == [SINGLE_FILE] and plan.index is None
    ours = tmp_path / "ours"
    write_rows(Location.parse(str(ours)), plan, tensors, seed)
    assert (ours / SINGLE_FILE).read_bytes() == theirs.read_bytes()
    assert sorted(os.listdir(ours)) == [SINGLE_FILE]  # no partial file left behind


def test_no_metadata_header_equals_library(tmp_path):
    tensors = random_tensors(5, count=6)
    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, str(theirs))
    plan = plan_files([(n, v.dtype, v.shape) for n, v in tensors.items()], metadata=None)
    assert plan.files[0].header == theirs.read_bytes()[:len(plan.files[0].header)]


def test_maxtext_split_names_and_index(tmp_path):
    """shard_checkpoint's rule: sorted names, a new file when the next tensor would pass the limit."""
    sizes = {"b": 40, "a": 30, "d": 100, "c": 10, "e": 5}
    plan = plan_files([(n, np.uint8, (s,)) for n, s in sizes.items()], max_shard_size=50)
    # sorted: a30 b40 -> [a] [b c] [d] [e]
    weight_map = {"a": "model-00001-of-00004.safetensors", "b": "model-00002-of-00004.safetensors",
                  "c": "model-00002-of-00004.safetensors", "d": "model-00003-of-00004.safetensors",
                  "e": "model-00004-of-00004.safetensors"}
    assert plan.index == json.dumps({"metadata": {"total_size": 185}, "weight_map": weight_map}, indent=2).encode()
    assert {t.name: t.file for t in plan.tensors.values()} == weight_map


def test_transformers_save_pretrained_files_and_index(tmp_path):
    """Our files and index equal save_pretrained's, for a tiny Llama split across several files."""
    import torch
    from transformers import LlamaForCausalLM

    from hf_checkpoints import hf_config, hf_state
    from rayconv.synthetic import SyntheticModel

    model = SyntheticModel(family="llama-3.1", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128,
                           multiple_of=32, n_shards=1, seed=11)
    with torch.device("meta"):
        order = list(LlamaForCausalLM(hf_config(model)).state_dict())
    state = hf_state(model)
    hf_model = LlamaForCausalLM(hf_config(model)).to(torch.bfloat16)
    hf_model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v).view(np.int16)).view(torch.bfloat16)
                              for k, v in state.items()})
    theirs = tmp_path / "theirs"
    hf_model.save_pretrained(theirs, max_shard_size="20KB")
    plan = plan_files([(n, state[n].dtype, state[n].shape) for n in order], max_shard_size=20_000,
                      style="transformers")
    assert len(plan.files) > 2
    ours = tmp_path / "ours"
    write_rows(Location.parse(str(ours)), plan, {n: state[n] for n in order}, 3)
    for file in plan.files:
        assert (ours / file.name).read_bytes() == (theirs / file.name).read_bytes(), file.name
    assert plan.index == (theirs / INDEX_FILE).read_bytes()
    assert sorted(p.name for p in theirs.glob("*.safetensors")) == sorted(f.name for f in plan.files)


def test_half_written_file_is_never_under_its_name(tmp_path):
    tensors = random_tensors(7, count=5)
    plan = plan_files([(n, v.dtype, v.shape) for n, v in tensors.items()])
    directory = Location.parse(str(tmp_path))
    file = plan.files[0]
    writer.create(directory, file)
    assert not (tmp_path / file.name).exists()
    half = [(len(file.header), (len(file.header) + file.size) // 2)]
    with pytest.raises(OutputError, match="regions end at byte"):
        writer.finish(directory, file, half)
    assert not (tmp_path / file.name).exists()
    with pytest.raises(OutputError, match="do not tile"):
        writer.finish(directory, file, [(len(file.header) + 1, file.size)])
    writer.finish(directory, file, [(len(file.header), file.size)])
    assert (tmp_path / file.name).stat().st_size == file.size
    writer.create(directory, file)  # a second conversion into the same directory
    with pytest.raises(OutputError, match="exists already"):
        writer.finish(directory, file, [(len(file.header), file.size)])


def test_worker_refuses_a_partial_file_of_another_plan(tmp_path):
    small = plan_files([("x", np.float32, (4,))]).files[0]
    large = plan_files([("x", np.float32, (8,))]).files[0]
    directory = Location.parse(str(tmp_path))
    writer.create(directory, small)
    with pytest.raises(OutputError, match="another plan"):
        writer.open_writer(directory, large)
    w = writer.open_writer(directory, small)
    with pytest.raises(OutputError, match="outside its data section"):
        w.write(0, b"\0" * 4)
    w.close()


def test_gcs_parts_composed_into_the_file(gcs_prefix, tmp_path):
    tensors = {f"t{i}": np.arange(i * 50, dtype=np.float32).reshape(i * 5, 10) for i in range(1, 5)}
    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, str(theirs), metadata={"format": "pt"})
    plan = plan_files([(n, v.dtype, v.shape) for n, v in tensors.items()])
    file = plan.files[0]
    writer.create(gcs_prefix, file)
    w = writer.open_writer(gcs_prefix, file)
    regions = []
    for name, value in tensors.items():
        start, stop = plan.tensors[name].rows(0, value.shape[0])
        if name != "t4":  # the last region is written only after a first finish() refused
            w.write(start, value)
        regions.append((start, stop))
    missing = regions.pop()
    with pytest.raises(OutputError, match="regions end at byte"):
        writer.finish(gcs_prefix, file, regions)
    with pytest.raises(OutputError, match="is missing"):
        writer.finish(gcs_prefix, file, regions + [missing])
    assert not gcs_prefix.exists(file.name)
    w.write(missing[0], tensors["t4"])
    final = writer.finish(gcs_prefix, file, regions + [missing])
    assert final == gcs_prefix.join(file.name)
    assert gcs_prefix.read_bytes(file.name) == theirs.read_bytes()
    assert gcs_prefix.list_keys(writer.STAGING_DIR) == []
    assert {k: v.tolist() for k, v in load_file(str(theirs)).items()} == {k: v.tolist() for k, v in tensors.items()}
