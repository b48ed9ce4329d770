"""rayconv.synthetic.cached_directory: the cache the demo and the parallel test workers share builds an entry once."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from rayconv.synthetic import cached_directory


def _build(out: str, log: str) -> None:
    def write(tmp: Path) -> None:
        with open(log, "a") as f:
            f.write("built\n")
        tmp.mkdir()
        (tmp / "part").write_text("x")
        time.sleep(0.5)  # the other process asks meanwhile
        (tmp / "marker").write_text("done")

    cached_directory(Path(out), "marker", write)


def test_two_processes_asking_at_once_build_the_entry_once(tmp_path):
    out, log = tmp_path / "cache" / "entry", tmp_path / "builds.log"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_build, args=(str(out), str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert log.read_text() == "built\n"
    assert (out / "marker").read_text() == "done" and (out / "part").read_text() == "x"
    assert not (tmp_path / "cache" / ".entry.partial").exists()


def test_a_build_that_died_halfway_is_built_again(tmp_path):
    out = tmp_path / "entry"
    (tmp_path / ".entry.partial").mkdir()  # what a killed builder left
    (tmp_path / ".entry.partial" / "part").write_text("stale")
    cached_directory(out, "marker", lambda tmp: (tmp.mkdir(), (tmp / "marker").write_text("done")))
    assert sorted(p.name for p in out.iterdir()) == ["marker"]
