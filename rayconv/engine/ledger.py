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
from rayconv.storage import Location
from rayconv.worker import Receipt


class Ledger:
    def __init__(self, out: Location) -> None:
        self.root = out.join(".rayconv")

    def plan_record(self) -> dict[str, Any] | None:
        data = self.root.read_bytes("plan.json")
        return json.loads(data) if data else None

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
            return Receipt.from_json(json.loads(data)) if data else None

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
