"""Units the driver converts itself while a local Ray starts.

Starting a local Ray and its worker actors takes 3.5–6 s on a 2-core machine (``scripts/bench.py``'s "Ray
alone"), and nothing was converted meanwhile. Units are idempotent and the driver process can run them (that is
all ``--executor local`` does), so a driver thread takes units from the front of the queue until the workers
are ready, then finishes the unit in hand and takes no more: the workers get the rest. Its receipts are
recorded like any worker's (the ``worker`` field names the driver's pid).

Only for a Ray this process starts itself: on an existing cluster the driver may sit on a small head node, and
connecting costs well under a second. While it runs, the driver needs one worker's memory for the unit in hand.
"""

from __future__ import annotations

import collections
import threading
from typing import Iterator, Sequence

from rayconv.plan import Unit
from rayconv.receipts import JobContext, Receipt
from rayconv.worker import run_unit


class HeadStart:
    """A driver thread converting units until :meth:`handover`; its first unit is taken before the thread
    starts, so a job with units always runs at least one here (what the tests rely on)."""

    def __init__(self, ctx: JobContext, units: Sequence[Unit]) -> None:
        self._ctx = ctx
        self._pending = collections.deque(units)
        self._lock = threading.Lock()
        self._stopped = False
        self._receipts: list[Receipt] = []
        self._error: BaseException | None = None
        first = self._take()
        self._thread = threading.Thread(target=self._run, args=(first,), name="rayconv-head-start", daemon=True)
        self._thread.start()

    def _take(self) -> Unit | None:
        with self._lock:
            if self._stopped or not self._pending:
                return None
            return self._pending.popleft()

    def _run(self, unit: Unit | None) -> None:
        try:
            while unit is not None:
                receipt = run_unit(self._ctx, unit)
                with self._lock:
                    self._receipts.append(receipt)
                unit = self._take()
        except BaseException as exc:  # noqa: BLE001  (re-raised in the driver's thread by finish())
            self._error = exc

    def handover(self) -> list[Unit]:
        """Take no more units; → the ones not started, for the workers (idempotent: later calls return [])."""
        with self._lock:
            self._stopped = True
            rest = list(self._pending)
            self._pending.clear()
        return rest

    def finished(self) -> list[Receipt]:
        """Receipts of the units finished so far (each returned once)."""
        with self._lock:
            done, self._receipts = self._receipts, []
        return done

    def finish(self) -> Iterator[Receipt]:
        """Wait for the unit in hand; yield the receipts not yet returned; re-raise the thread's error."""
        self.handover()
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self.finished()

    def abandon(self) -> None:
        """On failure: take no more units and wait for the one in hand, so nothing writes after the job ends."""
        self.handover()
        self._thread.join()
