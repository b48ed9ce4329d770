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
  makes anything visible, ``committed`` after its last, both with the *content identity* of every file
  the output is made from (:mod:`rayconv.engine.identity`), so a rerun can tell a finished output made
  from other bytes; see :mod:`rayconv.sink.commit` and the state machine in docs/architecture.md.
* ``md5.json``: the byte identity of each input file whose md5 matched ``checklist.chk`` (and of the
  checklist itself), so a resumed 820 GB conversion does not read its input once more to hash files
  that have not changed since (:meth:`Ledger.md5_unchanged`).
* ``lock``: the output lock (:mod:`rayconv.sink.lock`); ``--restart`` clears everything but it.

Also here: which recorded units a resume may keep (:func:`resumable`) and what ``--restart``
removes (:func:`restart_targets`).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import time
from typing import TYPE_CHECKING, Any, Sequence

from rayconv.engine.identity import file_name, index_digest
from rayconv.errors import OutputError
from rayconv.plan import Plan, Unit
from rayconv.progress import LOG
from rayconv.records import Records, json_object
from rayconv.leaves import TensorInfo
from rayconv.storage import Location
from rayconv.receipts import Receipt

if TYPE_CHECKING:
    from rayconv.source.protocol import Checkpoint

COMMITTING, COMMITTED = "committing", "committed"


class Ledger(Records):
    """The convert ledger: plan.json, receipts/, commits/, md5.json."""

    def plan_record(self) -> dict[str, Any] | None:
        record = self._load("plan.json")
        if record is not None and not (isinstance(record.get("fingerprint"), str)
                                       and isinstance(record.get("committed", []), list)):
            raise OutputError(f"{self.root.join('plan.json').uri} is damaged (not a rayconv plan record); rerun "
                              "with --restart to start this output over")
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
            if "compression" in record and record.get("compression") != fields.get("compression"):
                raise OutputError(
                    f"{self.root.parent.uri} was started with --compression {record.get('compression') or 'none'}; "
                    "resume with the same, or rerun with --restart to start over")
            if "source" in fields and record.get("source") != fields["source"]:
                raise OutputError(
                    f"{self.root.parent.uri} holds the output of a different source checkpoint (same shapes, "
                    "other tensors: the CRC-32s of its shards or FP8 scale files differ); choose another "
                    "--output_directory or rerun with --restart to replace it")
            return record
        record = {"fingerprint": fingerprint, "summary": summary, "started_ns": started_ns, **fields}
        self.root.write_bytes("plan.json", json.dumps(record, indent=1).encode())
        return record

    # Receipts -------------------------------------------------------------------------------

    def receipts(self) -> dict[str, tuple[Receipt, dict[str, str]]]:
        """unit → (receipt, {shard index: byte identity when it was read})."""
        keys = [k for k in self.root.list_keys("receipts/") if k.endswith(".json")]

        def load(key: str) -> tuple[Receipt, dict[str, str]] | None:
            try:
                data = self._load(key)
                if data is None:
                    return None
                sources = {str(k): str(v) for k, v in (data.pop("sources", None) or {}).items()}
                receipt = Receipt.from_json(data)
                if not isinstance(receipt.dbs, dict) or not isinstance(receipt.unit, str):
                    raise TypeError(receipt)
                return receipt, sources
            except (OutputError, TypeError, KeyError, ValueError, AttributeError):
                # A receipt only saves work: a damaged one costs its unit a rerun, nothing else.
                LOG.warning("%s is not a valid rayconv receipt; its unit runs again", self.root.join(key).uri)
                return None

        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            loaded = [r for r in pool.map(load, keys) if r is not None]
        return {r.unit: (r, s) for r, s in loaded}

    def record(self, receipt: Receipt, sources: dict[str, str] | None = None) -> None:
        """``sources``: identity of every file the unit read, by ledger name (:func:`unit_sources`)."""
        data = receipt.to_json()
        data["sources"] = {str(k): v for k, v in (sources or {}).items()}
        self.root.write_bytes(f"receipts/{receipt.unit}.json", json.dumps(data).encode())

    def forget(self, units: list[str]) -> None:
        """Drop receipts (their units run again on the next attempt)."""
        for unit in units:
            self.root.delete(f"receipts/{unit}.json")

    # Commits --------------------------------------------------------------------------------

    def commit_state(self, name: str) -> str | None:
        """``committing``, ``committed`` or None for the output called ``name`` (a kind's ``name``: the records are
        files named after it, so they outlive any change to the objects)."""
        state = self._load(f"commits/{name}.json")
        if state is None:
            record = self.plan_record() or {}
            return COMMITTED if name in record.get("committed", []) else None  # ledgers before commits/
        return state.get("state") if isinstance(state, dict) else None

    def set_commit_state(self, name: str, state: str, final: str, sources: dict[str, str] | None = None) -> None:
        """``sources``: the content identity of every file the output is built from (:func:`content_identities`),
        recorded with the intent, before anything of it can become visible, and kept with ``committed``."""
        body = {"state": state, "final": final, "time": time.time(), "sources": sources or {}}
        self.root.write_bytes(f"commits/{name}.json", json.dumps(body).encode())

    def mark_committed(self, name: str, final: str = "", sources: dict[str, str] | None = None) -> None:
        self.set_commit_state(name, COMMITTED, final, sources)

    def commit_sources(self, name: str) -> dict[str, str] | None:
        """The content identities an output's commit record says it was built from; None when the record has
        none (no record, or one written before rayconv recorded them)."""
        state = self._load(f"commits/{name}.json")
        sources = state.get("sources") if isinstance(state, dict) else None
        if not isinstance(sources, dict) or not sources:
            return None
        return {str(k): str(v) for k, v in sources.items()}

    # md5 of the input ---------------------------------------------------------------------

    def md5_unchanged(self, identities: dict[str, str]) -> bool:
        """Whether an earlier run into this output found these files' md5 right while they had exactly these byte
        identities (:func:`file_identities`). Read without the output lock: a wrong "no" only costs a hashing
        pass, and a record is only trusted when every file's identity matches."""
        data = self.root.read_bytes("md5.json")
        recorded = (json_object(data) or {}).get("files") if data is not None else None
        return recorded == identities and all(identities.values())

    def record_md5(self, identities: dict[str, str]) -> None:
        """Remember that the files with these identities (taken before they were hashed) matched their md5."""
        self.root.write_bytes("md5.json", json.dumps({"files": identities, "time": time.time()}).encode())

    def clear(self) -> None:
        """Forget this output's conversion (``--restart``) whatever the ledger holds (damaged records, a directory
        where a record belongs); the lock stays, it is ours."""
        if self.root.is_local:  # entries, not keys: a directory named plan.json has keys only inside it
            for entry in sorted(os.listdir(self.root.path)) if os.path.isdir(self.root.path) else ():
                if not entry.startswith("lock"):
                    remove_output(self.root.join(entry))
            return
        self.root.join("receipts").delete_all()
        self.root.join("commits").delete_all()
        for key in self.root.list_keys():
            if not key.startswith("lock"):
                self.root.delete(key)


# Source identity ---------------------------------------------------------------------------


def unit_sources(unit: Unit) -> set[str]:
    """The files a unit reads, as the ledger names them: shard ``"3"`` (file index in the plan), FP8 scale file
    ``"scale:3"`` (its receipt is valid while every one of these is the same bytes)."""
    keys: set[str] = set()
    for piece in unit.pieces:
        for read in (*piece.reads, *piece.duplicates):
            keys.add(str(read.file))
            if read.scale is not None:
                keys.add(f"scale:{read.scale.file}")
    return keys


def read_identities(plan: Plan, identities: Sequence[str]) -> dict[str, str]:
    """Every file the plan reads, by ledger name (:func:`unit_sources`) → its identity: the shards' as
    :func:`source_identities` gives them, the FP8 scale files' byte identities (their own CRCs are checked
    when they are read)."""
    scales = file_identities({f"scale:{i}": uri for i, uri in enumerate(plan.scale_files)})
    return {**{str(i): ident for i, ident in enumerate(identities)}, **scales}


def _byte_identity(uri: str) -> str:
    """Which bytes a shard is now: size + mtime + inode locally, the object generation on GCS.

    HTTP(S) sources have none worth trusting (signed URLs change); their index digest and the CRC-32
    check stand for them."""
    if uri.startswith("gs://"):
        from rayconv.gcs_api import object_info, parse_gs

        info = object_info(*parse_gs(uri))
        return "" if info is None else f"{info['size']}:g{info['generation']}"
    if "://" in uri:
        return ""
    try:
        st = os.stat(uri)
    except OSError:
        return ""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def file_identities(files: dict[Any, str]) -> dict[Any, str]:
    """name → byte identity of each uri (concurrently: on GCS each is a metadata request); "" where unknown."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        return dict(zip(files, pool.map(_byte_identity, files.values())))


def source_identities(checkpoint: Checkpoint) -> list[str]:
    """Per shard, ``<index digest>/<byte identity>``: what a receipt records for each shard it read."""
    identities = file_identities(dict(enumerate(checkpoint.tensor_files))).values()
    return [f"{index_digest(index)}/{ident}" for index, ident in zip(checkpoint.indexes, identities)]


def source_digest(identities: list[str], scales: Sequence[dict[str, TensorInfo]] = ()) -> str:
    """The source checkpoint's content identity (index digests only: a re-downloaded copy of the same
    shard keeps it; a different model with the same shapes does not). ``scales``: the FP8 scale files' indexes,
    whose CRC-32s make a changed scale another source (appended only when there are any, so the digests of
    bf16 sources, and the ledgers holding them, stay the same)."""
    digests = [ident.split("/", 1)[0] for ident in identities] + [index_digest(index) for index in scales]
    return hashlib.sha256(json.dumps(digests).encode()).hexdigest()[:16]


# Resume and restart ----------------------------------------------------------------------


def resumable(ledger: Ledger, plan: Plan, identities: dict[str, str], places: dict[Any, Any],
              to_build: Sequence[Any]) -> dict[str, Receipt]:
    """Recorded receipts still valid: every file the unit read (:func:`read_identities`) is the same bytes (else
    it is run again — a re-downloaded shard or scale file is re-read), and what it wrote is still there for the
    outputs to build (the plan's target tells, from what the unit's writer returned)."""
    recorded = ledger.receipts()
    done: dict[str, Receipt] = {}
    changed: set[str] = set()
    rerun = 0
    for unit in plan.units:
        if unit.id not in recorded:
            continue
        receipt, sources = recorded[unit.id]
        stale = [k for k in unit_sources(unit) if sources.get(k) != identities[k]]
        if stale:
            changed.update(stale)
            rerun += 1
            continue
        done[unit.id] = receipt
    if rerun:
        names = ", ".join(sorted(file_name(plan, k) for k in changed)[:3])
        LOG.info("%d finished unit(s) read files that changed since (%s%s): running them again", rerun, names,
                 ", …" if len(changed) > 3 else "")
    for kind in to_build:
        lost = plan.target.lost_units(places[kind], {unit: r.dbs for unit, r in done.items()})
        for unit in lost:
            done.pop(unit, None)
        if lost:
            LOG.info("%d finished unit(s) have no %s database under %s: running them again",
                     len(lost), kind.name, places[kind].item(staging=True).uri)
    return done


def relative(out: Location, location: Location) -> str:
    return location.path[len(out.path):].lstrip("/")


def remove_output(location: Location) -> None:
    if location.is_local and (os.path.isfile(location.path) or os.path.islink(location.path)):
        os.remove(location.path)
    else:
        location.delete_all()


def restart_targets(out: Location, plan: Plan, places: dict[Any, Any],
                    previous: dict[str, Any] | None) -> list[Location]:
    """What ``--restart`` removes: every output this plan writes, every output the previous
    conversion of this directory recorded (a stale ``int8/`` next to new bf16 outputs), and rayconv's
    staging directories (the plan's target knows them all). Anything else under the output directory is left
    alone."""
    target = plan.target
    targets = [places[k].final_root for k in plan.kinds]
    if previous:
        recorded = previous.get("outputs")
        if isinstance(recorded, dict):
            targets += [out.join(str(rel)) for rel in recorded.values() if rel and ".." not in str(rel).split("/")]
        else:  # ledgers written before outputs were recorded: their kinds' directories (the AQT one's default)
            old = {kind.name: place for kind, place in target.places(out).items()}
            summary = previous.get("summary")
            kinds_before = summary.get("outputs", []) if isinstance(summary, dict) else []
            targets += [old[k].final_root for k in kinds_before if isinstance(k, str) and k in old]
    targets += target.staging_roots(out)
    unique: dict[str, Location] = {}
    base = out.path.rstrip("/") + "/" if out.path else ""
    for target in targets:  # only ever strictly inside the output directory
        if target.path.startswith(base) and target.path.rstrip("/") != out.path.rstrip("/"):
            unique.setdefault(target.uri, target)
    return list(unique.values())
