"""Meta's FP8 405B SKU: exact dequantization, end-to-end conversion, and one-line failures on bad FP8 input.

The reference for "exact" is torch: a test writes the dequantized bf16 MP8 checkpoint with torch
(``bf16 = (q.float() * s[row]).to(bfloat16)``) and converts it with rayconv as a bf16 source; the FP8
source must convert to the same bytes in every output.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from conftest import run_convert, synthetic_checkpoint
from fp8_checkpoints import torch_dequantize, write_dequantized
from helpers import assert_clean_failure, assert_same_checkpoint, assert_same_leaves, copy_down, run_cli, run_convert_cli
from helpers import output_leaves as leaves
from rayconv import fp8
from rayconv.families import Descriptor
from rayconv.source.bytesource import open_source
from rayconv.source.pth import index_pth
from rayconv.synthetic import SyntheticModel, shard_tensors

# The FP8 SKU layout scaled down: 8 shards, 8 kv heads (one per shard), 4 layers (1 and 2 are FP8).
MODEL = SyntheticModel(family="llama-3.1", dim=256, n_layers=4, n_heads=16, n_kv_heads=8, vocab_size=256,
                       multiple_of=64, n_shards=8, seed=31, fp8=True)
FP8_PATH = "Llama3.1-405B-Instruct"
BF16_PATH = "Llama3.1-405B-Instruct:bf16-mp8"
KINDS = ("scanned", "unscanned", "int8")


@pytest.fixture(scope="module")
def fp8_src() -> Path:
    return synthetic_checkpoint(MODEL)


@pytest.fixture(scope="module")
def dequantized_src(tmp_path_factory, fp8_src) -> Path:
    return write_dequantized(fp8_src, tmp_path_factory.mktemp("deq") / "in")


@pytest.fixture(scope="module")
def bf16_reference(tmp_path_factory, dequantized_src) -> dict[str, bytes]:
    """rayconv's conversion of the torch-dequantized bf16 shards (a plain bf16 MP8 source)."""
    out = tmp_path_factory.mktemp("deq-out")
    run_convert(dequantized_src, out, model_path=BF16_PATH, kinds=KINDS, quantize_type="int8", executor="local")
    return leaves(out)


@pytest.fixture(scope="module")
def fp8_out(tmp_path_factory, fp8_src) -> tuple[Path, str]:
    """rayconv's conversion of the FP8 source (local executor), and its log."""
    import logging

    out = tmp_path_factory.mktemp("fp8-out")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("rayconv")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        run_convert(fp8_src, out, model_path=FP8_PATH, kinds=KINDS, quantize_type="int8", executor="local")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out, "\n".join(records)


def test_dequantize_equals_torch():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(300, 256), dtype=np.uint8)
    codes[0] = np.arange(256, dtype=np.uint8)  # every float8 value once
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # float8_e4m3fn NaN codes: FBGEMM never writes them
    scale = (10.0 ** rng.uniform(-9, 3, size=300)).astype(np.float32)
    scale[:3] = [fp8.MIN_SCALE, 1.0, 3.4e38 / 448]
    q = codes.view(ml_dtypes.float8_e4m3fn)
    ours = fp8.dequantize(q, scale)
    theirs = torch_dequantize(torch.from_numpy(codes).view(torch.float8_e4m3fn), torch.from_numpy(scale))
    assert ours.dtype == ml_dtypes.bfloat16
    assert ours.view(np.uint16).tobytes() == theirs.view(torch.int16).numpy().tobytes()


def test_scale_bounds_are_what_fbgemm_writes_for_bf16_rows():
    """MAX_SCALE is the quantizer's scale for a row holding the largest bf16, and dequantizes to finite values; the
    next float32 up is refused, as is the float32 below MIN_SCALE (which the quantizer writes for an all-zero row)."""
    from rayconv.errors import SourceError

    big = ml_dtypes.finfo(ml_dtypes.bfloat16).max
    rows = np.array([[big, -big, 1], [0, 0, 0]], dtype=ml_dtypes.bfloat16)
    q, scale = fp8.quantize_rows(rows)
    assert scale[0] == fp8.MAX_SCALE and scale[1] == fp8.MIN_SCALE
    assert np.isfinite(fp8.dequantize(q, scale).astype(np.float32)).all()
    fp8.check_scales(scale, "f")
    for value in (np.nextafter(fp8.MAX_SCALE, np.float32(np.inf)), np.nextafter(fp8.MIN_SCALE, np.float32(0))):
        with pytest.raises(SourceError, match="f: scale of row 8 is"):
            fp8.check_scales(np.array([fp8.MIN_SCALE, value], dtype=np.float32), "f", first_row=7)


def test_quantizer_is_fbgemm_per_row_formula():
    """rayconv's FBGEMM emulation against the formula written in torch (saturating, RNE)."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 80)) * 0.02).astype(ml_dtypes.bfloat16)
    w[3] = 0  # all-zero row: the scale floor 1/(448·512)
    w[5, 7] = 40.0  # a large outlier
    q, s = fp8.quantize_rows(w)
    wt = torch.from_numpy(w.view(np.int16)).view(torch.bfloat16).float()
    st = torch.clamp(wt.abs().amax(dim=1) / 448.0, min=1.0 / (448.0 * 512.0))
    qt = torch.clamp(wt / st[:, None], -448.0, 448.0).to(torch.float8_e4m3fn)
    assert s.tobytes() == st.numpy().tobytes()
    assert q.view(np.uint8).tobytes() == qt.view(torch.uint8).numpy().tobytes()
    assert s[3] == fp8.MIN_SCALE and np.abs(q.astype(np.float32)).max() == 448.0


def test_synthetic_fp8_layout(fp8_src):
    """FP8 exactly in layers 1..n-2's FFN, quantized from the bf16 weights; scales [rows] float32 per key."""
    plain = dict(shard_tensors(MODEL, 3))
    index = index_pth(open_source(str(fp8_src / "consolidated.03.pth")))
    float8 = sorted(k for k, info in index.items() if info.dtype == "float8_e4m3fn")
    assert float8 == sorted(f"layers.{i}.feed_forward.{w}.weight" for i in (1, 2) for w in ("w1", "w2", "w3"))
    assert all(index[k].dtype == "bfloat16" for k in index if k not in float8)
    scales = torch.load(fp8_src / "fp8_scales_3.pt", weights_only=True)
    assert sorted(scales) == sorted(f"{i}_feed_forward.{w}_3" for i in (1, 2) for w in ("w1", "w2", "w3"))
    shard = torch.load(fp8_src / "consolidated.03.pth", weights_only=True)
    for key in float8:
        q, s = fp8.quantize_rows(plain[key])
        assert shard[key].view(torch.uint8).numpy().tobytes() == q.view(np.uint8).tobytes()
        assert scales[fp8.scale_key(key, 3)].numpy().tobytes() == s.tobytes()
        assert tuple(scales[fp8.scale_key(key, 3)].shape) == (index[key].shape[0],)


def test_descriptor_is_the_fp8_sku():
    for text in ("Llama3.1-405B-Instruct", "Llama3.1-405B"):
        d = Descriptor.parse(text)
        assert (d.sku, d.shards, d.size) == ("fp8", 8, "405b")
    assert Descriptor.parse(BF16_PATH).sku == "bf16"


def test_fp8_source_converts_to_the_dequantized_bf16_conversion(fp8_out, bf16_reference):
    out, log = fp8_out
    assert "FP8 SKU" in log and "FP8-rounded" in log
    got = leaves(out)
    assert set(got) == set(bf16_reference) and len(got) > 20
    differing = [k for k in got if got[k] != bf16_reference[k]]
    assert not differing, differing[:5]


def test_replaced_scale_file_reruns_exactly_the_units_that_read_it(tmp_path, fp8_src, fp8_out):
    """Receipts name the FP8 scale files they read next to the shards: a re-downloaded fp8_scales_{r}.pt (a new
    file) makes the units that read it run again on resume, and only those."""
    from rayconv.engine.ledger import Ledger, unit_sources
    from rayconv.job import ConvertOptions, make_plan, open_checkpoint
    from rayconv.sink.commit import STOP_EXIT_CODE
    from rayconv.source.checkpoint import list_input
    from rayconv.storage import Location

    src, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(fp8_src, src)
    args = ("--input_directory", str(src), "--model_path", FP8_PATH, "--output_directory", str(out),
            "--quantize_type", "int8", "--quantize_weights", "True")
    stopped = run_convert_cli(*args, env={"RAYCONV_TEST_STOP_AFTER": "intent"})  # every unit recorded, no commit
    assert stopped.returncode == STOP_EXIT_CODE, stopped.stderr[-3000:]
    options = ConvertOptions(files=list_input(str(src)), input_display=str(src), output=str(out),
                             model_path=FP8_PATH, kinds=KINDS, quantize_type="int8")
    plan = make_plan(open_checkpoint(options), options)
    readers = {u.id for u in plan.units if "scale:1" in unit_sources(u)}
    assert 0 < len(readers) < len(plan.units) and len(Ledger(Location.parse(str(out))).receipts()) == len(plan.units)

    scale = src / "fp8_scales_1.pt"
    shutil.copy(scale, tmp_path / "copy.pt")
    (tmp_path / "copy.pt").replace(scale)  # the same bytes, another file: as a re-download leaves it
    result = run_convert(src, out, model_path=FP8_PATH, kinds=KINDS, quantize_type="int8", executor="local")
    assert result.units_run == len(readers) and result.units_skipped == len(plan.units) - len(readers)
    reference = leaves(fp8_out[0])
    assert leaves(out) == reference


def test_a_changed_scale_after_a_finished_run_is_another_source(tmp_path, fp8_src):
    """One value of fp8_scales_1.pt changed after a finished run, and checklist.chk with it: the rerun refuses (the
    scale files' CRC-32s are part of the source digest), never keeping the outputs made with the old scale."""
    import hashlib

    from rayconv.errors import OutputError

    src, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(fp8_src, src)
    run_convert(src, out, model_path=FP8_PATH, kinds=("scanned",), executor="local", verify=False)
    _edit_scales(1, lambda s: _set(s, "1_feed_forward.w1_1", float(s["1_feed_forward.w1_1"][5]) * 2))(src)
    md5 = hashlib.md5((src / "fp8_scales_1.pt").read_bytes()).hexdigest()
    lines = [f"{md5}  fp8_scales_1.pt" if line.endswith(" fp8_scales_1.pt") else line
             for line in (src / "checklist.chk").read_text().splitlines()]
    (src / "checklist.chk").write_text("\n".join(lines) + "\n")
    with pytest.raises(OutputError, match="different source checkpoint .*FP8 scale files differ"):
        run_convert(src, out, model_path=FP8_PATH, kinds=("scanned",), executor="local", verify_md5=True)


def test_fp8_source_on_ray_with_row_by_one_scales(tmp_path, fp8_src, bf16_reference, ray_session):
    """The same on Ray, with scales saved as [rows, 1] (the note says to accept both shapes)."""
    src = tmp_path / "in"
    shutil.copytree(fp8_src, src)
    for shard in range(MODEL.n_shards):
        path = src / f"fp8_scales_{shard}.pt"
        scales = torch.load(path, weights_only=True)
        torch.save({k: v.reshape(-1, 1).contiguous() for k, v in scales.items()}, path)
    out = tmp_path / "out"
    result = run_convert(src, out, model_path=FP8_PATH, kinds=KINDS, quantize_type="int8", executor="ray")
    assert leaves(out) == bf16_reference
    # Bytes read: float8 FFN weights (1 byte) plus their scales, not the bf16 size.
    assert result.bytes_read < sum(p.stat().st_size for p in src.glob("consolidated.*.pth")) + 64 * 1024


# -- bad FP8 input: one line, exit 1, nothing committed ----------------------------------------------------------------
def _scales(src: Path, shard: int) -> dict:
    return torch.load(src / f"fp8_scales_{shard}.pt", weights_only=True)


def _save_scales(src: Path, shard: int, scales: dict) -> None:
    torch.save(scales, src / f"fp8_scales_{shard}.pt")


def _edit_scales(shard: int, edit) -> callable:  # noqa: ANN001
    def apply(src: Path) -> None:
        scales = _scales(src, shard)
        edit(scales)
        _save_scales(src, shard, scales)
    return apply


def _edit_shard(shard: int, key: str, dtype: torch.dtype):
    def apply(src: Path) -> None:
        path = src / f"consolidated.{shard:02d}.pth"
        state = torch.load(path, weights_only=True)
        state[key] = state[key].float().to(dtype)
        torch.save(state, path)
    return apply


def _set(scales: dict, key: str, value: float) -> None:
    scales[key] = scales[key].clone()
    scales[key][5] = value


def _flip_scale_bit(src: Path) -> None:
    """A corrupt scale that is still finite and positive: only the zip CRC-32 can tell."""
    path = src / "fp8_scales_3.pt"
    info = index_pth(open_source(str(path)))["1_feed_forward.w1_3"]
    data = bytearray(path.read_bytes())
    data[info.offset + 8] ^= 0x01  # lowest mantissa bit of row 2's scale
    path.write_bytes(bytes(data))


BAD = {
    "missing scale file": (lambda src: (src / "fp8_scales_3.pt").unlink(), "fp8_scales_3.pt is missing"),
    "extra scale file": (lambda src: shutil.copy(src / "fp8_scales_0.pt", src / "fp8_scales_8.pt"),
                         "unexpected scale file fp8_scales_8.pt"),
    "missing key": (_edit_scales(2, lambda s: s.pop("1_feed_forward.w2_2")), "has no scales 1_feed_forward.w2_2"),
    "extra key": (_edit_scales(2, lambda s: s.__setitem__("3_feed_forward.w1_2", s["1_feed_forward.w1_2"])),
                  "unexpected scales 3_feed_forward.w1_2"),
    "scale count": (_edit_scales(4, lambda s: s.__setitem__("2_feed_forward.w3_4", s["2_feed_forward.w3_4"][:-1])),
                    "have shape"),
    "float64 scales": (_edit_scales(1, lambda s: s.__setitem__("1_feed_forward.w1_1", s["1_feed_forward.w1_1"].double())),
                       "expected float32"),
    "infinite scale": (_edit_scales(6, lambda s: _set(s, "2_feed_forward.w2_6", float("inf"))), "must be finite"),
    "nan scale": (_edit_scales(0, lambda s: _set(s, "1_feed_forward.w1_0", float("nan"))), "must be finite"),
    # Finite, but no FBGEMM quantizer writes it: 1e38 dequantizes to ±inf, 1e-7 is below 1/(448·512).
    "huge scale": (_edit_scales(6, lambda s: _set(s, "2_feed_forward.w2_6", 1e38)),
                   "fp8_scales_6.pt: 2_feed_forward.w2_6: scale of row 5 is 1e+38"),
    "tiny scale": (_edit_scales(2, lambda s: _set(s, "1_feed_forward.w3_2", 1e-7)),
                   "fp8_scales_2.pt: 1_feed_forward.w3_2: scale of row 5 is 1e-07"),
    "corrupt scale bytes": (_flip_scale_bit, "fp8_scales_3.pt: tensor 1_feed_forward.w1_3 fails its CRC-32 check"),
    "float8 outside layers 1..n-2": (_edit_shard(5, "layers.0.feed_forward.w1.weight", torch.float8_e4m3fn),
                                     "layers.0.feed_forward.w1.weight is float8_e4m3fn; expected bfloat16"),
    "bf16 where float8 belongs": (_edit_shard(5, "layers.1.feed_forward.w3.weight", torch.bfloat16),
                                  "layers.1.feed_forward.w3.weight is bfloat16; expected float8_e4m3fn"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_fp8_input_is_one_line(case, tmp_path, fp8_src):
    damage, needle = BAD[case]
    src = tmp_path / "in"
    shutil.copytree(fp8_src, src)
    damage(src)
    out = tmp_path / "out"
    result = run_convert_cli("--input_directory", str(src), "--output_directory", str(out), "--model_path", FP8_PATH,
                     "--quantize_type", "int8", "--quantize_weights", "True")
    assert result.returncode == 1, result.stderr[-2000:]
    assert_clean_failure(result, out, needle)


def test_sku_and_files_must_agree(tmp_path, fp8_src):
    out = tmp_path / "out"
    result = run_convert_cli("--input_directory", str(fp8_src), "--output_directory", str(out), "--model_path", BF16_PATH)
    assert_clean_failure(result, out, "names a bf16 SKU")
    bf16 = synthetic_checkpoint(SyntheticModel(**{**MODEL.__dict__, "fp8": False}))
    result = run_convert_cli("--input_directory", str(bf16), "--output_directory", str(out), "--model_path", FP8_PATH)
    assert_clean_failure(result, out, "has no float8 tensors")


def test_simulated_405b_fp8_plan_reads_40_percent_less():
    """`rayconv plan --simulate --model_path Llama3.1-405B-Instruct`: the FP8 plan, sized like Meta's FP8 files."""
    import json
    import subprocess
    import sys

    def simulate(model_path: str) -> dict:
        result = subprocess.run([sys.executable, "-m", "rayconv.cli", "plan", "--json", "--simulate", "--model_path", model_path,
                                 "--quantize_type", "int8"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout)

    fp8_plan, bf16_plan = simulate(FP8_PATH), simulate(BF16_PATH)
    assert fp8_plan["source_sku"] == "fp8" and fp8_plan["plan"]["shards"] == 8
    assert fp8_plan["plan"]["pieces"] == bf16_plan["plan"]["pieces"]
    # Meta's FP8 shards are 8 × 60,903,742,309 bytes; the plan reads the tensors plus their scales.
    assert abs(fp8_plan["plan"]["input_bytes"] - 8 * 60_903_742_309) < 0.001 * 8 * 60_903_742_309
    assert 0.38 < 1 - fp8_plan["plan"]["input_bytes"] / bf16_plan["plan"]["input_bytes"] < 0.42


def test_parity_with_maxtext_on_the_dequantized_shards(fp8_out, dequantized_src, reference):
    """All three outputs of the FP8 source equal what MaxText 0.2.4's converters write for its dequantized shards."""

    out, _ = fp8_out
    assert assert_same_leaves(out / "bf16/scanned/0/items", reference.scanned(MODEL, dequantized_src)) == 13
    assert assert_same_leaves(out / "bf16/unscanned/checkpoints/0/items",
                              reference.unscanned(MODEL, dequantized_src)) == 4 + 9 * MODEL.n_layers
    assert assert_same_leaves(out / "int8", reference.quantized(MODEL, dequantized_src, quant="int8")) > 0


def test_nnx_parity_with_maxtext_025_on_the_dequantized_shards(tmp_path, fp8_src, dequantized_src, reference_025):
    """With --maxtext_layout nnx, the FP8 source's three outputs equal, tree and metadata included, what MaxText
    0.2.5 writes for its dequantized shards (llama_or_mistral_ckpt, generate_param_only_checkpoint,
    layerwise_quantization)."""
    out = tmp_path / "nnx"
    run_convert(fp8_src, out, model_path=FP8_PATH, kinds=KINDS, quantize_type="int8", executor="local",
                maxtext_layout="nnx")
    assert assert_same_checkpoint(out / "bf16/scanned/0/items", reference_025.scanned(MODEL, dequantized_src),
                                  step_dir=True) == 13
    assert assert_same_checkpoint(out / "bf16/unscanned/checkpoints/0/items",
                                  reference_025.unscanned(MODEL, dequantized_src), step_dir=True) == 3 + 9 * MODEL.n_layers
    assert assert_same_checkpoint(out / "int8", reference_025.quantized(MODEL, dequantized_src, quant="int8"),
                                  step_dir=False) == 3 + (2 + 7 * 2) * MODEL.n_layers


def test_fp8_from_meta_url_and_bucket(tmp_path, fp8_src, fp8_out, gcs_prefix):
    """Behind a signed URL: streamed (md5-checked inline) and staged to gs://, the FP8 SKU converts to the same bytes."""
    from servers import SignedUrlServer

    from rayconv.download import resolve_input
    from rayconv.staging import stage
    from rayconv.engine.driver import convert
    from rayconv.job import ConvertOptions
    from rayconv.source.checkpoint import list_input

    cdn = tmp_path / "cdn"
    shutil.copytree(fp8_src, cdn / "Llama-3.1-405B-Instruct")

    def run(files: dict[str, str], output: str) -> None:
        convert(ConvertOptions(files=files, input_display="test", output=output, model_path=FP8_PATH,
                               kinds=KINDS, quantize_type="int8", executor="local", progress=False))

    with SignedUrlServer(cdn) as server:
        files = resolve_input(server.url(), FP8_PATH, published_sizes=False)  # synthetic shards, not Meta's 60.9 GB
        assert {f"fp8_scales_{r}.pt" for r in range(8)} <= set(files)
        run(files, gcs_prefix.join("from-url").uri)
        staged = stage(server.url(), FP8_PATH, gcs_prefix.join("base"), published_sizes=False)
    run(list_input(staged.uri), gcs_prefix.join("from-gs").uri)
    want = leaves(fp8_out[0])
    for name in ("from-url", "from-gs"):
        copy_down(gcs_prefix.join(name), tmp_path / name)
        assert leaves(tmp_path / name) == want, name


def test_cli_synthetic_fp8_writes_the_fp8_layout(tmp_path, fp8_src, monkeypatch):
    """`rayconv synthetic PRESET --fp8` writes the same checkpoint as SyntheticModel(fp8=True) (a tiny preset here)."""
    import dataclasses

    from click.testing import CliRunner

    from rayconv import synthetic as syn
    from rayconv.cli import main

    monkeypatch.setitem(syn.PRESETS, "fp8-test", dataclasses.replace(MODEL, fp8=False))
    out = tmp_path / "syn"
    result = CliRunner().invoke(main, ["synthetic", "fp8-test", "--fp8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fp8_src.iterdir())
    for path in sorted(out.glob("*.p*")):
        ours, cached = (torch.load(p, weights_only=True) for p in (path, fp8_src / path.name))
        assert list(ours) == list(cached), path.name
        for key in ours:
            assert ours[key].dtype == cached[key].dtype and torch.equal(ours[key].view(torch.uint8),
                                                                         cached[key].view(torch.uint8)), key


def test_demo_preset_of_the_fp8_sku_converts_end_to_end(tmp_path):
    """`scripts/demo.sh --synthetic demo-fp8`: the demo's widths in the FP8 SKU's layout convert through the CLI,
    say their source is FP8, and verify."""
    from conftest import CACHE
    from rayconv.synthetic import PRESETS, ensure_checkpoint

    model = PRESETS["demo-fp8"]
    assert model.fp8 and model.n_shards == 8 and Descriptor.parse(model.descriptor).sku == "fp8"
    out = tmp_path / "out"
    result = run_cli("convert", "--synthetic", "demo-fp8", "--output_directory", str(out), "--executor", "local",
                     "--no_progress", "--skip_scanned", env={"RAYCONV_CACHE": str(CACHE)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Source is Meta's FP8 SKU" in result.stderr
    checkpoint = ensure_checkpoint(model, CACHE / "synthetic")  # the one the CLI wrote (same cache key)
    assert sorted(p.name for p in checkpoint.glob("fp8_scales_*.pt")) == [f"fp8_scales_{r}.pt" for r in range(8)]
    verified = run_cli("verify", str(checkpoint), str(out), "--model_path", model.descriptor)
    assert verified.returncode == 0, verified.stderr[-3000:]
