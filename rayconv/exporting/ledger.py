"""The export's ledger, next to its output (``<out>/.rayconv/``, beside convert's and under the same lock):

* ``export.json``: the plan fingerprint (files, headers, pieces), the source's content digest, the dtype; a rerun
  with another fingerprint or source is a different export and is refused (``--restart`` starts over);
* ``export-receipts/<unit>.json``: written by the driver when a unit's receipt arrives (its bytes are written
  and, locally, fsynced): a resumed export skips these units;
* ``export-files/<file>.json``: a safetensors file published under its final name (renamed or composed);
* ``export-complete.json``: written after the last small file (the index, or config.json): nothing to do.
"""

from __future__ import annotations

import hashlib
from typing import Any

from rayconv.errors import OutputError
from rayconv.exporting.worker import ExportReceipt
from rayconv.source.orbax import MaxTextCheckpoint
from rayconv.records import Records

PLAN, RECEIPTS, FILES, COMPLETE = "export.json", "export-receipts/", "export-files/", "export-complete.json"


def source_digest(checkpoint: MaxTextCheckpoint) -> str:
    """The checkpoint's content identity: its ``_METADATA`` and OCDBT root manifest (a new write rewrites both)."""
    digest = hashlib.sha256()
    for key in ("_METADATA", "manifest.ocdbt"):
        digest.update((checkpoint.location.read_bytes(key) or b"-") + b"\0")
    return digest.hexdigest()[:16]


class ExportLedger(Records):
    """The export's records (module docstring); a damaged one is one line and ``--restart``."""

    kind = ("export", "export")

    def _write(self, key: str, value: dict[str, Any], indent: int | None = 1) -> None:
        super()._write(key, value, indent)

    def record(self) -> dict[str, Any] | None:
        return self._load(PLAN)

    def start(self, fields: dict[str, Any]) -> None:
        """Begin, or check that the export being resumed is this one."""
        record = self.record()
        if record is None:
            self._write(PLAN, fields)
            return
        if record.get("source") != fields["source"]:
            raise OutputError(f"{self.root.parent.uri} holds an export of another checkpoint (or one written since); "
                              "choose another --output_directory or rerun with --restart to replace it")
        if record.get("fingerprint") != fields["fingerprint"]:
            raise OutputError(f"{self.root.parent.uri} holds another export (plan {record.get('fingerprint')}, this "
                              f"one is {fields['fingerprint']}: other model, --dtype, --max_shard_size or "
                              "--worker_memory_gb); resume with the same flags or rerun with --restart")

    def receipts(self) -> dict[str, ExportReceipt]:
        out = {}
        for key in self.root.list_keys(RECEIPTS):
            data = self._load(key)
            try:
                receipt = ExportReceipt.from_json(data or {})
            except (TypeError, KeyError):
                continue  # a torn record: the unit runs again
            out[receipt.unit] = receipt
        return out

    def add_receipt(self, receipt: ExportReceipt) -> None:
        self._write(RECEIPTS + receipt.unit + ".json", receipt.to_json())

    def published(self) -> set[str]:
        return {key[len(FILES):-len(".json")] for key in self.root.list_keys(FILES) if key.endswith(".json")}

    def mark_published(self, name: str, size: int) -> None:
        self._write(FILES + name + ".json", {"file": name, "size": size})

    def complete(self) -> bool:
        return self._load(COMPLETE) is not None

    def mark_complete(self, files: list[str]) -> None:
        self._write(COMPLETE, {"files": files})

    def clear(self) -> None:
        for key in (PLAN, COMPLETE, *self.root.list_keys(RECEIPTS), *self.root.list_keys(FILES)):
            self.root.delete(key)
