"""What the md5 pass allows the driver to keep: nothing is committed, and no md5 memo is written, before every
file the plan reads has matched ``checklist.chk``.

The pass itself is :mod:`rayconv.source.hashing`: for a local input it runs beside the conversion
(:class:`~rayconv.source.hashing.BackgroundMd5`), for a remote one it ran before (``checked`` here). Units
keep running while it hashes, and their receipts go to the ledger as usual; a mismatch then forgets the
receipts of every unit that read the file (as a CRC failure does), so the rerun after the file is replaced
converts them again, and fails the job with the one-line mismatch. A run stopped before the pass ended
(interrupted, or failed another way) records no memo: its rerun hashes again, and forgets the same way.
"""

from __future__ import annotations

from rayconv.engine.ledger import Ledger, unit_sources
from rayconv.plan import Plan
from rayconv.source.hashing import BackgroundMd5


class Md5Gate:
    """The md5 state of one run. ``identities``: the byte identities of the checked files (and of the
    checklist) taken before hashing, which :meth:`Ledger.record_md5` remembers once they matched; ``pending``:
    the pass still running beside the conversion, None when it already ended well (checked before converting,
    or known unchanged since an earlier run into this output)."""

    def __init__(self, identities: dict[str, str], pending: BackgroundMd5 | None = None) -> None:
        self.identities = identities
        self.pending = pending
        self._recorded = False

    def poll(self, ledger: Ledger, plan: Plan) -> None:
        """Between units: record the memo as soon as every file matched, fail at once on a mismatch."""
        if self._recorded:
            return
        if self.pending is None or self.pending.done() or self.pending.failure() is not None:
            self.settle(ledger, plan)

    def settle(self, ledger: Ledger, plan: Plan) -> None:
        """Before anything is committed: wait for the pass; a mismatch forgets what the file produced and raises."""
        if self._recorded:
            return
        if self.pending is not None:
            self.pending.wait()
            failure = self.pending.failure()
            if failure is not None:
                name, error = failure
                ledger.forget(self._units_reading(plan, self.pending.uris[name]))
                raise error
            if not self.pending.matched():  # cancelled: cannot happen while the job runs, never trusted
                raise RuntimeError("md5 pass stopped before it ended")
            self.pending.log_success()
        ledger.record_md5(self.identities)  # a resume after an interruption need not hash the input again
        self._recorded = True

    def cancel(self) -> None:
        """The job ended (done, failed or interrupted): stop hashing."""
        if self.pending is not None:
            self.pending.cancel()

    @staticmethod
    def _units_reading(plan: Plan, uri: str) -> list[str]:
        """Units whose output depends on ``uri``: those reading it as a shard; all of them for params.json (the
        model's shape and rope settings come from it)."""
        keys = {str(i) for i, shard in enumerate(plan.tensor_files) if shard == uri}
        return [u.id for u in plan.units if not keys or unit_sources(u) & keys]
