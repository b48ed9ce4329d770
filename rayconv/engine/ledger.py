"""The job ledger: what this conversion is, which units are done, which outputs are committed.

Everything lives next to the output so a rerun resumes (``<out>/.rayconv/``):

* ``plan.json``: the plan fingerprint, the *source digest* (the shards' zip directories: tensor
  names, offsets, sizes, CRC-32s — a different model with the same shapes has another digest), the
  piece and unit budgets the plan was cut with, and the output directories this conversion writes.
  A rerun with another fingerprint or source digest is a different conversion and is refused.
* ``receipts/<unit>.json``: written by the driver when a unit's receipt arrives, i.e. after the
  unit's databases are fully written. Each carries the *byte identity* of every shard the unit read
  (size + mtime + inode locally, generation on GCS): a unit whose shard was replaced since (a
  re-downloaded shard) is run again, every other unit resumes.
* ``commits/<kind>.json``: ``committing`` is written before the first step of an output's commit
  makes anything visible, ``committed`` after its last; see :mod:`rayconv.sink.commit` and the state
  machine in docs/architecture.md.
* ``lock``: the output lock (:mod:`rayconv.sink.lock`); ``--restart`` clears everything but it.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import time
from typing import TYPE_CHECKING, Any

from rayconv.errors import OutputError
from rayconv.plan import Unit
from rayconv.source.pth import TensorInfo
from rayconv.storage import Location
from rayconv.worker import Receipt

if TYPE_CHECKING:
    from rayconv.source.checkpoint import MetaCheckpoint

COMMITTING, COMMITTED = "committing", "committed"


class Ledger:
    def __init__(self, out: Location) -> None:
        self.root = out.join(".rayconv")

    def _load(self, key: str) -> Any | None:
        data = self.root.read_bytes(key)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise OutputError(f"{self.root.join(key).uri} is not valid JSON (damaged ledger); rerun with --restart "
                              "to start this output over") from None

    def plan_record(self) -> dict[str, Any] | None:
        record = self._load("plan.json")
        if record is not None and not isinstance(record, dict):
            raise OutputError(f"{self.root.join('plan.json').uri} is damaged; rerun with --restart")
        return record

    def start(self, fingerprint: str, summary: dict[str, Any], started_ns: int, **fields: Any) -> dict[str, Any]:
        """Begin or resume; returns the plan record in force. ``fields`` (source digest, budgets,
        output directories) are stored when the record is created and compared on resume."""
        record = self.plan_record()
        if record is not None:
            if record.get("fingerprint") != fingerprint:
                raise OutputError(
                    f"{self.root.parent.uri} holds the output of a different conversion (plan "
                    f"{record.get('fingerprint')}, this one is {fingerprint}: other model, outputs or options); "
                    "choose another --output_directory or rerun with --restart to replace it")
            if "source" in fields and record.get("source") != fields["source"]:
                raise OutputError(
                    f"{self.root.parent.uri} holds the output of a different source checkpoint (same shapes, "
                    "other tensors: the shards' CRC-32s differ); choose another --output_directory or rerun "
                    "with --restart to replace it")
            return record
        record = {"fingerprint": fingerprint, "summary": summary, "started_ns": started_ns, **fields}
        self.root.write_bytes("plan.json", json.dumps(record, indent=1).encode())
        return record

    # Receipts -------------------------------------------------------------------------------

    def receipts(self) -> dict[str, tuple[Receipt, dict[str, str]]]:
        """unit → (receipt, {shard index: byte identity when it was read})."""
        keys = [k for k in self.root.list_keys("receipts/") if k.endswith(".json")]

        def load(key: str) -> tuple[Receipt, dict[str, str]] | None:
            data = self._load(key)
            if data is None:
                return None
            try:
                sources = {str(k): str(v) for k, v in (data.pop("sources", None) or {}).items()}
                return Receipt.from_json(data), sources
            except (TypeError, KeyError, ValueError, AttributeError):
                raise OutputError(f"{self.root.join(key).uri} is not a rayconv receipt (damaged ledger); delete "
                                  "it to redo that unit, or rerun with --restart") from None

        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            loaded = [r for r in pool.map(load, keys) if r is not None]
        return {r.unit: (r, s) for r, s in loaded}

    def record(self, receipt: Receipt, sources: dict[int, str] | None = None) -> None:
        data = receipt.to_json()
        data["sources"] = {str(k): v for k, v in (sources or {}).items()}
        self.root.write_bytes(f"receipts/{receipt.unit}.json", json.dumps(data).encode())

    def forget(self, units: list[str]) -> None:
        """Drop receipts (their units run again on the next attempt)."""
        for unit in units:
            self.root.delete(f"receipts/{unit}.json")

    # Commits --------------------------------------------------------------------------------

    def commit_state(self, kind: str) -> str | None:
        state = self._load(f"commits/{kind}.json")
        if state is None:
            record = self.plan_record() or {}
            return COMMITTED if kind in record.get("committed", []) else None  # ledgers before commits/
        return state.get("state") if isinstance(state, dict) else None

    def set_commit_state(self, kind: str, state: str, final: str) -> None:
        body = {"state": state, "final": final, "time": time.time()}
        self.root.write_bytes(f"commits/{kind}.json", json.dumps(body).encode())

    def mark_committed(self, kind: str, final: str = "") -> None:
        self.set_commit_state(kind, COMMITTED, final)

    def clear(self) -> None:
        """Forget this output's conversion (``--restart``); the lock stays, it is ours."""
        self.root.join("receipts").delete_all()
        self.root.join("commits").delete_all()
        for key in self.root.list_keys():
            if not key.startswith("lock"):
                self.root.delete(key)


# Source identity ---------------------------------------------------------------------------


def unit_shards(unit: Unit) -> set[int]:
    """The shards a unit reads (its receipt is valid while these are the same bytes)."""
    return {r.shard for p in unit.pieces for r in (*p.reads, *p.duplicates)}


def _index_digest(index: dict[str, TensorInfo]) -> str:
    """A shard's zip directory as indexed: tensor names, dtypes, shapes, offsets, sizes and CRC-32s."""
    rows = sorted((i.name, i.dtype, list(i.shape), i.offset, i.nbytes, i.crc32) for i in index.values())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def _byte_identity(uri: str) -> str:
    """Which bytes a shard is now: size + mtime + inode locally, the object generation on GCS.

    HTTP(S) sources have none worth trusting (signed URLs change); their index digest and the CRC-32
    check stand for them."""
    if uri.startswith("gs://"):
        from rayconv.source.gcs import object_info, parse_gs

        info = object_info(*parse_gs(uri))
        return "" if info is None else f"{info['size']}:g{info['generation']}"
    if "://" in uri:
        return ""
    try:
        st = os.stat(uri)
    except OSError:
        return ""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def source_identities(checkpoint: MetaCheckpoint) -> list[str]:
    """Per shard, ``<index digest>/<byte identity>``: what a receipt records for each shard it read."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        identities = list(pool.map(_byte_identity, checkpoint.shards))
    return [f"{_index_digest(index)}/{ident}" for index, ident in zip(checkpoint.indexes, identities)]


def source_digest(identities: list[str]) -> str:
    """The source checkpoint's content identity (index digests only: a re-downloaded copy of the same
    shard keeps it; a different model with the same shapes does not)."""
    digests = [ident.split("/", 1)[0] for ident in identities]
    return hashlib.sha256(json.dumps(digests).encode()).hexdigest()[:16]
