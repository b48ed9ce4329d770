"""Logging and the progress display: one bar (bytes/s, ETA, units done/failed) or, without a
terminal (CI, ``ray job logs``, Kubernetes), a timestamped status line every few seconds."""

from __future__ import annotations

import logging
import sys
import time

LOG = logging.getLogger("rayconv")


def setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    LOG.handlers[:] = [handler]
    LOG.setLevel(logging.DEBUG if verbose else logging.INFO)
    LOG.propagate = False


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """Tracks bytes and units; renders with rich on a TTY, as log lines otherwise."""

    def __init__(self, total_bytes: int, total_units: int, *, done_bytes: int = 0, done_units: int = 0,
                 interval: float = 5.0, enabled: bool = True) -> None:
        self.total_bytes, self.total_units = total_bytes, total_units
        self.done_bytes, self.done_units, self.failed = done_bytes, done_units, 0
        self._start_bytes = done_bytes
        self._start = time.monotonic()
        self._last_log = 0.0
        self._interval = interval
        self._rich = None
        if enabled and sys.stderr.isatty():
            from rich.progress import (BarColumn, DownloadColumn, Progress as RichProgress, TextColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)

            self._rich = RichProgress(TextColumn("[bold]converting"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[units]}"),
                                      transient=False)
            self._task = self._rich.add_task("convert", total=total_bytes, completed=done_bytes, units=self._units())
            self._rich.start()
        self.enabled = enabled

    def _units(self) -> str:
        failed = f", {self.failed} failed" if self.failed else ""
        return f"units {self.done_units}/{self.total_units}{failed}"

    @property
    def rate(self) -> float:
        elapsed = max(time.monotonic() - self._start, 1e-6)
        return (self.done_bytes - self._start_bytes) / elapsed

    def update(self, nbytes: int = 0, units: int = 0, failed: int = 0) -> None:
        self.done_bytes += nbytes
        self.done_units += units
        self.failed += failed
        if self._rich is not None:
            self._rich.update(self._task, completed=self.done_bytes, units=self._units())
            return
        now = time.monotonic()
        if self.enabled and (now - self._last_log >= self._interval or self.done_units == self.total_units):
            self._last_log = now
            rate = self.rate
            eta = (self.total_bytes - self.done_bytes) / rate if rate > 0 else float("inf")
            eta_text = f"{eta:.0f}s" if eta != float("inf") else "?"
            LOG.info("progress %s / %s (%s/s, ETA %s), %s", _human(self.done_bytes), _human(self.total_bytes),
                     _human(rate), eta_text, self._units())

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None


human_bytes = _human
