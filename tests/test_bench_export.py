"""scripts/bench_export.py's pure helpers: the export's closing line, the byte-equality of two exports, the table."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_export  # noqa: E402

from rayconv.progress import human_bytes  # noqa: E402


def test_parse_export_line_reads_the_closing_line():
    line = (f"2026-12-07 10:01:02 INFO Done in 41.7 s: read {human_bytes(2_080_000_000)}, wrote "
            f"{human_bytes(2_090_000_000)}, 12 units (3 resumed), 2 workers, worker peak RSS {human_bytes(812 << 20)}")
    parsed = bench_export.parse_export_line("ray started\n" + line + "\nexported: /tmp/x\n")
    assert parsed == {"seconds": 41.7, "read": human_bytes(2_080_000_000), "wrote": human_bytes(2_090_000_000),
                      "units": 12, "resumed": 3, "workers": 2, "worker_peak_rss": human_bytes(812 << 20)}
    assert bench_export.parse_export_line("rayconv: error: no such directory") is None


def test_digests_compare_safetensors_and_index_only(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "model-00001-of-00002.safetensors").write_bytes(b"x" * 100)
        (d / "model-00002-of-00002.safetensors").write_bytes(b"y" * 50)
        (d / "model.safetensors.index.json").write_text("{}")
    (a / "config.json").write_text('{"a": 1}')  # differs by design (rayconv adds dtype): not compared
    (b / "config.json").write_text('{"a": 1, "dtype": "bfloat16"}')
    (b / "generation_config.json").write_text("{}")
    da, db = bench_export.export_digests(a), bench_export.export_digests(b)
    assert sorted(da) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                          "model.safetensors.index.json"]
    assert bench_export.compare_digests(da, db) == (True, "3 files byte-equal")

    (b / "model-00002-of-00002.safetensors").write_bytes(b"y" * 49 + b"z")
    assert bench_export.compare_digests(da, bench_export.export_digests(b)) == (
        False, "bytes differ: ['model-00002-of-00002.safetensors']")
    (b / "model-00002-of-00002.safetensors").unlink()
    equal, detail = bench_export.compare_digests(da, bench_export.export_digests(b))
    assert not equal and "model-00002-of-00002.safetensors" in detail
    assert bench_export.compare_digests({}, db) == (False, "no reference files")


def test_table_ratios_against_the_floor_and_failures():
    run = {"steps": [], "phases": {}, "worker_mb_s": None, "failed": None}
    results = {"preset": "narrow", "input": {"description": "18 layers", "bytes": 2e9}, "export_bytes": 2e9,
               "export_files": 1, "machine": "2 cores, 23 GiB", "load_before": "1 2 3", "load_after": "4 5 6",
               "versions": {"maxtext": "maxtext-0.2.5.dist-info"},
               "runs": [dict(run, name="MaxText", seconds=0.0, peak_rss=0, peak_pss=0, failed="not run: 3 GB"),
                        dict(run, name="rayconv", seconds=30.0, peak_rss=2e9, peak_pss=1e9, equal="**yes**"),
                        dict(run, name="write floor (x)", seconds=10.0, peak_rss=0, peak_pss=0, equal="")]}
    text = bench_export.table(results)
    assert "| rayconv | 30.0 | 2.00 | 1.00 | 3.00x | **yes** |" in text
    assert "| MaxText | 0.0 | 0.00 | 0.00 |  | **failed: not run: 3 GB** |" in text
    assert "Versions: maxtext maxtext-0.2.5.dist-info." in text
