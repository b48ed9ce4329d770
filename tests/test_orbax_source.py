"""A MaxText Orbax checkpoint as a source (rayconv/source/orbax.py): classification, leaves, region reads, refusals.

Read from what rayconv writes (both tree layouts, scanned and unscanned, local and gs://) and from a real training
checkpoint of maxtext 0.2.5's own trainer (tools/maxtext_ref/train.py: params + Adam state + NNX RNG state). Every
value read is compared with tensorstore's read of the whole stored array (tools/maxtext_ref/reference.read_leaves).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from conftest import MODELS, run_convert, synthetic_checkpoint
from helpers import ITEMS
from reference import read_leaves
from rayconv.errors import SourceError
from rayconv.source.orbax import MAX_METADATA_BYTES, open_checkpoint
from rayconv.storage import Location

MODEL = MODELS["llama31-mp8"][0]
#: Model paths of one layer (unscanned: under decoder/layers_{i}; scanned: decoder/layers) and outside the layers.
LAYER_LEAVES = {"mlp/wi_0/kernel", "mlp/wi_1/kernel", "mlp/wo/kernel", "post_self_attention_layer_norm/scale",
                "pre_self_attention_layer_norm/scale", "self_attention/key/kernel", "self_attention/out/kernel",
                "self_attention/query/kernel", "self_attention/value/kernel"}
TOP_LEAVES = {"decoder/decoder_norm/scale", "decoder/logits_dense/kernel", "token_embedder/embedding"}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """{layout: rayconv output dir} with scanned, unscanned and int8 (local executor)."""
    outs = {}
    for layout in ("linen", "nnx"):
        out = tmp_path_factory.mktemp(f"orbax-{layout}")
        run_convert(synthetic_checkpoint(MODEL), out, model_name=MODEL.family, executor="local",
                    kinds=("scanned", "unscanned", "int8"), quantize_type="int8", maxtext_layout=layout)
        outs[layout] = out
    return outs


def _stored(items) -> dict[str, np.ndarray]:
    """read_leaves keyed by model path (wrapper and NNX value stripped)."""
    out = {}
    for path, value in read_leaves(items).items():
        parts = path.split("/")
        if parts[:2] == ["params", "params"]:
            out["/".join(parts[2:])] = value
        elif parts[-1] == "value":
            out["/".join(parts[:-1])] = value
    return out


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


@pytest.mark.parametrize("layout", ["linen", "nnx"])
@pytest.mark.parametrize("kind", ["scanned", "unscanned"])
def test_rayconv_outputs_classified_and_read(outputs, layout, kind):
    items = outputs[layout] / ITEMS[kind]
    ckpt = open_checkpoint(str(items.parent if kind == "scanned" else items))  # a step dir works too
    tree = "linen" if layout == "linen" or kind == "scanned" else "nnx"  # nnx scanned is the classic tree
    assert (ckpt.tree, ckpt.scanned, ckpt.training, ckpt.n_layers, ckpt.ignored) == (
        tree, kind == "scanned", False, MODEL.n_layers, ())
    layers = ["decoder/layers/"] if kind == "scanned" else [f"decoder/layers_{i}/" for i in range(MODEL.n_layers)]
    assert set(ckpt.leaves) == TOP_LEAVES | {p + leaf for p in layers for leaf in LAYER_LEAVES}
    stored = _stored(items)
    assert set(stored) == set(ckpt.leaves)
    for name, leaf in ckpt.leaves.items():
        assert (leaf.shape, leaf.dtype) == (stored[name].shape, "bfloat16"), name
        assert _bits(ckpt.read(name)) == _bits(stored[name]), name
    # A region spanning several chunks, at an offset: exactly that slice of the array.
    name = "decoder/layers/mlp/wo/kernel" if kind == "scanned" else "decoder/layers_1/mlp/wo/kernel"
    leaf = ckpt.leaves[name]
    region = (slice(3, leaf.shape[0] - 5),) + tuple(slice(1, n) for n in leaf.shape[1:])
    assert _bits(ckpt.read(name, region)) == _bits(stored[name][region])
    if kind == "scanned":  # the layer axis is axis 1, for norms too
        assert ckpt.leaves["decoder/layers/pre_self_attention_layer_norm/scale"].shape == (MODEL.dim, MODEL.n_layers)


def test_training_checkpoint_of_maxtexts_trainer(reference_025):
    """maxtext 0.2.5's train.py: the Linen on-disk tree with params, Adam's mu/nu, counts, NNX RNG state and step."""
    items = reference_025.train(MODEL, steps=2)
    ckpt = open_checkpoint(str(items))
    assert (ckpt.tree, ckpt.scanned, ckpt.training, ckpt.n_layers) == ("linen", True, True, MODEL.n_layers)
    assert set(ckpt.leaves) == TOP_LEAVES | {"decoder/layers/" + leaf for leaf in LAYER_LEAVES}
    roots = {path.split("/")[0] for path in ckpt.ignored}
    assert roots == {"opt_state", "nnx_aux", "step"}
    assert {p for p in ckpt.ignored if p.startswith("opt_state/0/mu/params/")} == {
        "opt_state/0/mu/params/" + name for name in ckpt.leaves}
    stored = _stored(items)
    for name, leaf in ckpt.leaves.items():
        assert leaf.dtype == "float32", name
        assert _bits(ckpt.read(name)) == _bits(stored[name]), name


def test_gcs_checkpoint(outputs, gcs_prefix):
    items = outputs["nnx"] / ITEMS["unscanned"]
    for root, _, files in os.walk(items):
        for f in files:
            path = os.path.join(root, f)
            gcs_prefix.write_bytes(os.path.relpath(path, items), open(path, "rb").read())
    ckpt = open_checkpoint(gcs_prefix.uri)
    assert (ckpt.tree, ckpt.scanned, ckpt.location) == ("nnx", False, gcs_prefix)
    stored = _stored(items)
    name = "decoder/layers_0/self_attention/query/kernel"
    assert _bits(ckpt.read(name, (slice(10, 20), slice(2, 5)))) == _bits(stored[name][10:20, 2:5])


def _copy(items, tmp_path):
    copy = tmp_path / "items"
    shutil.copytree(items, copy)
    return copy


def _edit_metadata(items, edit) -> None:
    meta = json.loads((items / "_METADATA").read_text())
    edit(meta)
    (items / "_METADATA").write_text(json.dumps(meta))


def test_refusals(outputs, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(SourceError, match="has no _METADATA: not an Orbax checkpoint"):
        open_checkpoint(str(hf))
    with pytest.raises(SourceError, match="quantized"):
        open_checkpoint(str(outputs["linen"] / ITEMS["int8"]))
    with pytest.raises(SourceError, match="quantized"):
        open_checkpoint(str(outputs["nnx"] / ITEMS["int8"]))
    with pytest.raises(SourceError, match="has no leaf nope"):
        open_checkpoint(str(outputs["linen"] / ITEMS["unscanned"])).read("nope")
    with pytest.raises(SourceError, match="unsupported location|names no bucket"):
        open_checkpoint("s3://bucket/items")


@pytest.mark.parametrize("case,edit,needle", [
    ("not-json", b"{\"tree_metadata\": [", "not valid JSON"),
    ("deep", b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    ("long-number", b"{\"tree_metadata\": {}, \"x\": " + b"1" * 100 + b"}", "a number of 100 characters"),
    ("not-object", b"[]", "not an object"),
    ("no-tree", b"{\"use_ocdbt\": true, \"use_zarr3\": true}", "no tree_metadata"),
    ("bad-entry", b"{\"use_ocdbt\": true, \"use_zarr3\": true, \"tree_metadata\": {\"a\": {\"key_metadata\": 3}}}",
     "malformed tree entry"),
])
def test_hostile_metadata(outputs, tmp_path, case, edit, needle):
    items = _copy(outputs["linen"] / ITEMS["unscanned"], tmp_path)
    (items / "_METADATA").write_bytes(edit)
    with pytest.raises(SourceError, match=needle) as info:
        open_checkpoint(str(items))
    assert "\n" not in str(info.value) and str(items) in str(info.value)


def test_metadata_too_large_is_not_read(outputs, tmp_path):
    items = _copy(outputs["linen"] / ITEMS["unscanned"], tmp_path)
    with open(items / "_METADATA", "r+b") as f:
        f.truncate(MAX_METADATA_BYTES + 1)  # sparse: refused by its size, never read
    with pytest.raises(SourceError, match="at most"):
        open_checkpoint(str(items))


def test_leaf_missing_from_the_database(outputs, tmp_path):
    items = _copy(outputs["linen"] / ITEMS["unscanned"], tmp_path)

    def add_ghost(meta):
        entry = next(e for e in meta["tree_metadata"].values() if e["value_metadata"]["value_type"] == "jax.Array")
        keys = [{"key": k, "key_type": 2} for k in ("params", "params", "decoder", "layers_0", "ghost", "kernel")]
        meta["tree_metadata"]["ghost"] = {"key_metadata": keys, "value_metadata": entry["value_metadata"]}

    _edit_metadata(items, add_ghost)
    with pytest.raises(SourceError, match="decoder/layers_0/ghost/kernel is in _METADATA but its array .* is missing"):
        open_checkpoint(str(items))


def test_database_without_its_manifest_says_so(outputs, tmp_path):
    """No manifest.ocdbt: the database reads as empty, and the line names the manifest, not the first leaf."""
    items = _copy(outputs["linen"] / ITEMS["unscanned"], tmp_path)
    (items / "manifest.ocdbt").unlink()
    with pytest.raises(SourceError, match="has no manifest.ocdbt: the OCDBT database holding its arrays is missing"):
        open_checkpoint(str(items))


def test_mixed_or_foreign_trees_refused(outputs, tmp_path):
    items = _copy(outputs["linen"] / ITEMS["unscanned"], tmp_path)
    _edit_metadata(items, lambda meta: meta.update(use_zarr3=False))
    with pytest.raises(SourceError, match="use_ocdbt and use_zarr3"):
        open_checkpoint(str(items))
    items = _copy(outputs["nnx"] / ITEMS["unscanned"], tmp_path / "b")

    def foreign(meta):
        entry = next(iter(meta["tree_metadata"].values()))
        entry["key_metadata"] = [{"key": "something", "key_type": 2}, {"key": "else", "key_type": 2}]

    _edit_metadata(items, foreign)
    with pytest.raises(SourceError, match="belongs to no MaxText tree"):
        open_checkpoint(str(items))


def test_checkpoint_location_is_picklable(outputs):
    """Workers get the opened checkpoint (no tensorstore handles inside) and read from it themselves."""
    import pickle

    ckpt = open_checkpoint(str(outputs["linen"] / ITEMS["unscanned"]))
    ckpt.read("token_embedder/embedding", (slice(0, 1),))
    copy = pickle.loads(pickle.dumps(ckpt))
    assert copy == ckpt and isinstance(copy.location, Location)
    assert _bits(copy.read("token_embedder/embedding")) == _bits(ckpt.read("token_embedder/embedding"))


def _add_array(items, tree_path: tuple[str, ...], shape: tuple[int, ...]) -> None:
    """A real extra float32 array in the checkpoint's OCDBT database, and its _METADATA entry."""
    import tensorstore as ts

    spec = {"driver": "zarr3", "kvstore": {"driver": "ocdbt", "base": f"file://{items}/", "path": ".".join(tree_path) + "/"},
            "metadata": {"shape": list(shape), "data_type": "float32"}}
    ts.open(spec, create=True).result().write(np.ones(shape, np.float32)).result()

    def add(meta):
        keys = [{"key": k, "key_type": 2} for k in tree_path]
        meta["tree_metadata"][repr(tree_path)] = {"key_metadata": keys, "value_metadata": {
            "value_type": "jax.Array", "skip_deserialize": False, "write_shape": list(shape)}}

    _edit_metadata(items, add)


@pytest.mark.parametrize("case", ["mixed", "layer-axis", "gap"])
def test_inconsistent_layers_refused(outputs, tmp_path, case):
    kind = "unscanned" if case == "gap" else "scanned"
    items = _copy(outputs["linen"] / ITEMS[kind], tmp_path)
    if case == "mixed":
        _add_array(items, ("params", "params", "decoder", "layers_0", "extra", "kernel"), (4, 3))
        needle = "both decoder/layers"
    elif case == "layer-axis":
        _add_array(items, ("params", "params", "decoder", "layers", "extra", "kernel"), (4, 3))
        needle = "disagree on the layer axis"
    else:
        _edit_metadata(items, lambda meta: meta.update(tree_metadata={
            k: v for k, v in meta["tree_metadata"].items() if "layers_0" not in k}))
        needle = r"decoder layers \[1\] are not layers_0"
    assert open_checkpoint(str(outputs["linen"] / ITEMS[kind])).n_layers == MODEL.n_layers
    with pytest.raises(SourceError, match=needle):
        open_checkpoint(str(items))
