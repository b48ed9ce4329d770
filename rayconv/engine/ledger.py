"""The job ledger: which units are done, kept next to the output so a rerun resumes.

``<out>/.rayconv/plan.json`` names the plan fingerprint; ``<out>/.rayconv/receipts/<unit>.json``
is written by the driver when a unit's receipt arrives, i.e. after the unit's databases are fully
written. A rerun with the same plan skips every unit that has a receipt; a different plan against
the same output is refused instead of mixing two jobs' chunks.
"""

from __future__ import annotations

import concurrent.futures
import json
from typing import Any

from rayconv.errors import OutputError
from rayconv.progress import LOG
from rayconv.storage import Location
from rayconv.worker import Receipt


# -- JSON loading that survives damaged files (helper D, issue 11 item 9; kept apart for merging) -----------


def _json_object(data: bytes) -> dict[str, Any] | None:
    """``data`` as a JSON object, or None when it is not one (torn write, garbage, another file)."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class Ledger:
    def __init__(self, out: Location) -> None:
        self.root = out.join(".rayconv")

    def plan_record(self) -> dict[str, Any] | None:
        data = self.root.read_bytes("plan.json")
        if not data:
            return None
        record = _json_object(data)
        if record is None or not isinstance(record.get("committed", []), list):
            raise OutputError(f"{self.root.uri}/plan.json is damaged (not a rayconv plan record); rerun with "
                              "--restart to start this output over")
        return record

    def start(self, fingerprint: str, summary: dict[str, Any], started_ns: int) -> dict[str, Any]:
        """Begin or resume; returns the plan record in force."""
        record = self.plan_record()
        if record is not None and record.get("fingerprint") != fingerprint:
            raise OutputError(
                f"{self.root.parent.uri} holds a partial output of a different conversion "
                f"(plan {record.get('fingerprint')}, this one is {fingerprint}); rerun with --restart to replace it")
        if record is None:
            record = {"fingerprint": fingerprint, "summary": summary, "started_ns": started_ns, "committed": []}
            self.root.write_bytes("plan.json", json.dumps(record, indent=1).encode())
        return record

    def receipts(self) -> dict[str, Receipt]:
        keys = [k for k in self.root.list_keys("receipts/") if k.endswith(".json")]

        def load(key: str) -> Receipt | None:
            data = self.root.read_bytes(key)
            if not data:
                return None
            try:
                return Receipt.from_json(_json_object(data) or {})
            except (KeyError, TypeError, ValueError):
                # A torn or damaged receipt: its unit is simply converted again (units are idempotent).
                LOG.warning("Ignoring damaged receipt %s/%s: its unit will be converted again", self.root.uri, key)
                return None

        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            loaded = [r for r in pool.map(load, keys) if r is not None]
        return {r.unit: r for r in loaded}

    def record(self, receipt: Receipt) -> None:
        self.root.write_bytes(f"receipts/{receipt.unit}.json", json.dumps(receipt.to_json()).encode())

    def mark_committed(self, kind: str) -> None:
        record = self.plan_record() or {}
        committed = set(record.get("committed", [])) | {kind}
        record["committed"] = sorted(committed)
        self.root.write_bytes("plan.json", json.dumps(record, indent=1).encode())

    def clear(self) -> None:
        self.root.delete_all()
