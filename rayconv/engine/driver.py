"""The conversion job, start to finish: open → plan → run units → verify → commit.

The driver holds only metadata: shard indexes, the plan, receipts. Tensor bytes move between
storage and workers directly. It only orchestrates: what the job is (options, budgets, plan) lives in
rayconv/job.py, the CRC proof in rayconv/checksum.py, the receipts in rayconv/receipts.py, and everything about
the output format — where each output lives, whether it is complete, how one is committed — in the plan's
target (rayconv/targets/), whose kinds it handles as objects and names only in the ledger and the logs.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from rayconv import tunables
from rayconv.acquire import acquire
from rayconv.checksum import crc_check, crc_error
from rayconv.engine.identity import changed_sources, content_identities
from rayconv.engine.ledger import (COMMITTED, COMMITTING, Ledger, file_identities, relative, remove_output,
                                   read_identities, restart_targets, resumable, source_digest, source_identities,
                                   unit_sources)
from rayconv.engine.md5gate import Md5Gate
from rayconv.errors import ConversionError, OutputError
from rayconv.job import (ConvertOptions, budgets, commit_batch_bytes, make_plan, open_checkpoint,
                         resume_options)
from rayconv.plan import Plan, describe
from rayconv.progress import LOG, Progress, human_bytes
from rayconv.receipts import JobContext
from rayconv.sink.commit import occupied, stop_point
from rayconv.sink.lock import OutputLock
from rayconv.source.protocol import Checkpoint
from rayconv.storage import Location


#: The phases of a run, in order, as the closing log line and the benchmark name them.
PHASES = ("acquire", "index", "plan", "ray start", "convert", "verify", "commit", "shutdown")


class PhaseTimer:
    """Wall time per phase of one run: where the fixed costs go (the closing log line, scripts/bench.py).

    Phases follow one another, so ``lap(phase)`` charges the time since the previous lap (or since the
    timer was made) to ``phase``; a phase lapped twice adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._mark = time.monotonic()

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._mark
        self._mark = now


@dataclasses.dataclass
class ConvertResult:
    outputs: dict[str, str]  # output name → items uri
    plan: dict[str, Any]
    seconds: float
    bytes_read: int
    bytes_written: int
    units_run: int
    units_skipped: int
    workers: int
    worker_peak_rss: int
    #: Seconds per phase (:data:`PHASES`), measured by :class:`PhaseTimer`.
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    #: Sum of the units' own run times (receipts): bytes_read / unit_seconds is the per-worker rate.
    unit_seconds: float = 0.0
    #: This run started a local Ray (which dies with the process: the CLI need not wait for its shutdown).
    local_ray: bool = False


def _make_executor(options: ConvertOptions):
    from rayconv.engine.executors import make_executor  # ray and its actors only when units run

    return make_executor(options)


def _prepare_output(out: Location, ledger: Ledger, places: dict[Any, Any], plan: Plan, restart: bool,
                    summary: dict[str, Any], started_ns: int, fields: dict[str, Any],
                    content: dict[str, str]) -> dict[str, Any]:
    """Restart or resume: the ledger must describe this conversion, and storage must agree with it. An output that
    is visible (the plan's target calls it complete) must have been made from ``content``, today's source."""
    target = plan.target
    if restart:
        try:
            previous = ledger.plan_record()
        except OutputError:
            previous = None
        ledger.clear()
        for location in restart_targets(out, plan, places, previous):
            remove_output(location)
    record = ledger.plan_record()
    if record is None:
        for kind in plan.kinds:
            if occupied(places[kind].final_root):
                raise OutputError(f"{places[kind].final_root.uri} already exists and was not written by this "
                                  "conversion; choose another --output_directory or pass --restart to replace it")
        for kind in plan.kinds:  # rayconv's temporaries with no ledger to resume them: nothing may reuse them
            if places[kind].staging_root != places[kind].final_root:
                remove_output(places[kind].staging_root)
    record = ledger.start(plan.fingerprint(), summary, started_ns, **fields)
    for kind in plan.kinds:
        place, state = places[kind], ledger.commit_state(kind.name)
        if state == COMMITTED and not target.is_complete(place):
            raise OutputError(f"the ledger says the {kind.name} checkpoint was committed, but "
                              f"{target.completion_mark(place).uri} is missing (moved or deleted?); rerun with "
                              "--restart to write it again")
        if state is not None and target.is_complete(place):
            why = changed_sources(plan, ledger.commit_sources(kind.name), content)
            if why is not None:
                raise OutputError(f"{place.final_root.uri} is a finished {kind.name} checkpoint, but {why}; rerun "
                                  "with --restart to convert again, or choose another --output_directory")
        if state is None:
            if target.is_foreign(place):
                raise OutputError(f"{place.final_root.uri} holds a checkpoint this conversion did not commit; move "
                                  "it away or rerun with --restart to replace it")
    return record


def _check_md5(checkpoint: Checkpoint, options: ConvertOptions) -> Md5Gate | None:
    """Check the files convert reads against the input's checklist.chk, unless an earlier run into this output
    already did and none has changed since. A local input is hashed beside the conversion (the gate holds what
    may be committed until it matched); a remote one before converting, as a second download beside the
    conversion's own reads would compete with them. → the gate, None when there is no checklist."""
    from rayconv.source.hashing import CHECKLIST, hash_in_background, verify_input

    out = Location.parse(options.output)
    out.check_writable()  # fail fast, before a long md5 pass
    read = set(checkpoint.tensor_files)
    files = checkpoint.files  # the folder actually opened (a Hub snapshot's original/, say)
    names = ["params.json", *(name for name, uri in files.items() if uri in read)]
    if CHECKLIST not in files:
        verify_input(files, options.input_display, names)  # says why nothing is checked
        return None
    identities = file_identities({name: files[name] for name in (*names, CHECKLIST) if name in files})
    if Ledger(out).md5_unchanged(identities):
        LOG.info("md5 of %d files was checked against %s by an earlier run into this output, and none has changed "
                 "since (size, mtime and inode; GCS generation): not hashed again", len(names), CHECKLIST)
        return Md5Gate(identities)
    if all("://" not in files[name] for name in (*names, CHECKLIST)):
        return Md5Gate(identities, hash_in_background(files, options.input_display, names))
    verify_input(files, options.input_display, names)
    return Md5Gate(identities)


def convert(options: ConvertOptions) -> ConvertResult:
    start = time.monotonic()
    started_ns = time.time_ns()
    timer = PhaseTimer()
    md5: Md5Gate | None = None
    tunables.install(options.tunables)  # this process's timeouts and read sizes; the workers' come in the JobContext
    if options.acquire is not None:  # the first phase: list, resolve, stage or generate the input (rayconv.acquire)
        options = acquire(options)
        timer.lap("acquire")
    LOG.info("Reading checkpoint index from %s", options.input_display)
    checkpoint = open_checkpoint(options)
    timer.lap("index")
    spec = checkpoint.spec
    if options.verify_md5 and checkpoint.checklist_note:
        LOG.info(checkpoint.checklist_note)
    elif options.verify_md5:
        md5 = _check_md5(checkpoint, options)
        timer.lap("md5")
    kv = "" if spec.params_kv_heads == spec.n_kv_heads else f" (params.json says {spec.params_kv_heads})"
    LOG.info("Model %s: %d layers, dim %d, %d heads, %d kv heads%s, %s, vocab %d, %s, %s",
             spec.maxtext_name, spec.n_layers, spec.dim, spec.n_heads, spec.n_kv_heads, kv, spec.mlp_summary,
             spec.vocab_size, checkpoint.describe_files(), human_bytes(checkpoint.nbytes))
    if checkpoint.fp8:
        LOG.info("Source is Meta's FP8 SKU: FFN weights of layers 1..%d are float8 with row scales, dequantized to "
                 "bf16 on the fly; the bf16 outputs hold these FP8-rounded weights (not the original bf16 model) "
                 "and int8 is quantized from them", spec.n_layers - 2)
    try:
        out = Location.parse(options.output)
        out.check_writable()
        lock = OutputLock(out).acquire()
        try:
            return _convert_locked(options, checkpoint, out, lock, start, started_ns, timer, md5)
        finally:
            lock.release()
    except ConversionError:
        known = md5.pending.failure() if md5 is not None and md5.pending is not None else None
        if known is not None:  # a unit tripped over a file whose md5 is already known wrong: say the cause
            raise known[1] from None
        raise
    finally:
        if md5 is not None:
            md5.cancel()  # a run that ends before its md5 pass does (failed, interrupted) stops hashing


def _convert_locked(options: ConvertOptions, checkpoint: Checkpoint, out: Location, lock: OutputLock,
                    start: float, started_ns: int, timer: PhaseTimer, md5: Md5Gate | None) -> ConvertResult:
    ledger = Ledger(out)
    if not options.restart:
        options = resume_options(options, checkpoint, ledger.plan_record(), out)
    plan = make_plan(checkpoint, options)
    summary = describe(plan)
    LOG.info("Plan %s: %d units, %d pieces, largest piece %s, outputs %s", summary["fingerprint"], summary["units"],
             summary["pieces"], human_bytes(summary["largest_piece_bytes"]), ", ".join(summary["outputs"]))

    target = plan.target
    places = target.places(out, plan.quantize_type, plan.tree)
    shard_identities = source_identities(checkpoint)
    identities = read_identities(plan, shard_identities)
    content = content_identities(checkpoint, identities)
    piece_bytes, unit_bytes = budgets(options)
    scale_indexes = checkpoint.scales.indexes if checkpoint.scales is not None else ()
    fields = {"source": source_digest(shard_identities, scale_indexes), "piece_budget": piece_bytes,
              "unit_budget": unit_bytes, "quantize_type": plan.quantize_type, "compression": options.compression,
              "outputs": {k.name: relative(out, places[k].final_root) for k in plan.kinds}}
    record = _prepare_output(out, ledger, places, plan, options.restart, summary, started_ns, fields, content)
    if md5 is not None:
        md5.poll(ledger, plan)  # records the md5 memo once every file matched (at once if checked already)
    started_ns = record.get("started_ns", started_ns)
    committed = [k for k in plan.kinds if ledger.commit_state(k.name) == COMMITTED]
    pending = [k for k in plan.kinds if k not in committed]
    # Outputs whose commit finished before an interruption need no units; the rest are built.
    to_build = [k for k in pending if not target.is_complete(places[k])]
    done = resumable(ledger, plan, identities, places, to_build) if to_build else {}
    todo = [u for u in plan.units if u.id not in done] if to_build else []
    if done:
        LOG.info("Resuming: %d of %d units already done", len(done), len(plan.units))
    # An output whose interrupted commit was building it from other bytes: whatever its staging holds (a complete
    # local staging directory, a GCS bf16 item marker) is not this source's and must be rebuilt, not renamed.
    rebuild = [k for k in to_build if todo or ledger.commit_sources(k.name) != content]

    timer.lap("plan")
    executor = _make_executor(options) if todo or to_build else None
    timer.lap("ray start")
    receipts = [done[u.id] for u in plan.units if u.id in done]
    bytes_total = plan.input_bytes
    progress = Progress(bytes_total, len(plan.units), done_bytes=sum(r.bytes_read for r in receipts),
                        done_units=len(receipts), enabled=options.progress)
    try:
        for kind in rebuild:  # new databases or bytes: a complete staging area must be rebuilt, not kept
            target.reset_staging(places[kind])
        if todo:
            LOG.info("Converting %s with %d %s worker(s)", human_bytes(sum(u.read_bytes for u in todo)),
                     executor.workers, executor.name)
            ctx = JobContext.create(dataclasses.replace(plan, kinds=tuple(to_build)), places, options.compression,
                                    batch_bytes=commit_batch_bytes(options))
            units = {u.id: u for u in todo}
            executor.start(ctx)
            timer.lap("ray start")
            for n, receipt in enumerate(executor.run(ctx, todo), 1):
                ledger.record(receipt, {k: identities[k] for k in unit_sources(units[receipt.unit])})
                if md5 is not None:
                    md5.poll(ledger, plan)
                receipts.append(receipt)
                progress.update(receipt.bytes_read, 1)
                stop_point("units", str(n))
        progress.close()
        timer.lap("convert")
        if md5 is not None:  # nothing is committed before every md5 matched; a mismatch forgets what it made
            md5.settle(ledger, plan)
            timer.lap("md5")
        if to_build:
            verified, failed = crc_check(checkpoint, receipts)
            if failed:
                # Forget what the corrupt bytes produced, so a rerun after re-downloading re-reads them.
                bad = set(failed)
                ledger.forget([r.unit for r in receipts if any((c[0], c[1]) in bad for c in r.crcs)])
                raise crc_error(checkpoint, failed, "corrupt shard; re-download it and rerun: only the units "
                                 "that read it are redone")
            LOG.info("Verified CRC-32 of %d source tensors", verified)
        timer.lap("verify")

        by_unit = {r.unit: r for r in receipts}
        outputs = {kind: places[kind].items_path.uri for kind in committed}
        lock.check()
        for kind in pending:  # the intent, with the bytes it is built from (checked for visible outputs above)
            if kind in to_build or ledger.commit_state(kind.name) != COMMITTING:
                ledger.set_commit_state(kind.name, COMMITTING, places[kind].items_path.uri, content)
        if pending:
            stop_point("intent")
        calls, results = [], {}
        kwargs = {"compression": options.compression, "started_ns": started_ns}
        for kind in pending:
            if kind not in to_build:  # only to be checked and recorded: no need for a committer
                LOG.info("Found the %s checkpoint committed by an interrupted run; checking and recording it",
                         kind.name)
                results[kind] = target.commit(places[kind], plan.arrays(kind), None, **kwargs)
                continue
            written = [by_unit[u.id].dbs for u in plan.units]  # what each unit's writer returned
            LOG.info("Committing %s checkpoint (%d arrays from %d databases)", kind.name, len(plan.arrays(kind)),
                     len(written))
            calls.append((target.commit, (places[kind], plan.arrays(kind), written), kwargs))
        results.update(zip([k for k in pending if k in to_build], executor.call_all(calls) if calls else []))
        failure: Exception | None = None
        for kind in pending:
            result = results[kind]
            if isinstance(result, Exception):
                failure = failure or result
                continue
            ledger.mark_committed(kind.name, result.uri, content)
            stop_point("ledger", kind.name)
            outputs[kind] = result.uri
            LOG.info("Wrote %s checkpoint to %s", kind.name, result.uri)
        if failure is not None:
            raise failure
        timer.lap("commit")
    finally:
        progress.close()
        if executor is not None:
            executor.shutdown()
        timer.lap("shutdown")

    for line in target.completion_lines(plan, {k: outputs[k] for k in target.kinds if k in outputs}):
        LOG.info("%s", line)
    return ConvertResult(
        outputs={kind.name: uri for kind, uri in outputs.items()}, plan=summary, seconds=time.monotonic() - start,
        bytes_read=sum(r.bytes_read for r in receipts), bytes_written=sum(r.bytes_written for r in receipts),
        units_run=len(todo), units_skipped=len(done), workers=executor.workers if executor else 0,
        worker_peak_rss=max((r.peak_rss for r in receipts), default=0), phases=dict(timer.seconds),
        unit_seconds=sum(r.seconds for r in receipts if r.unit not in done),
        local_ray=bool(getattr(executor, "local", False)))
