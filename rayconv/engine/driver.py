"""The conversion job, start to finish: open → plan → run units → verify → commit.

The driver holds only metadata: shard indexes, the plan, receipts. Tensor bytes move between
storage and workers directly.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

from rayconv import checksum
from rayconv.engine.ledger import (COMMITTED, COMMITTING, Ledger, relative, remove_output, restart_targets, resumable,
                                   source_digest, source_identities, unit_shards)
from rayconv.errors import OutputError, SourceError, SpecError
from rayconv.mapping import source_format
from rayconv.models import Descriptor
from rayconv.plan import Plan, build_plan, describe
from rayconv.progress import LOG, Progress, human_bytes
from rayconv.sink.commit import MARKER, commit_or_error, is_complete, occupied, stop_point
from rayconv.sink.layout import OutputLayout, output_layouts
from rayconv.sink.lock import OutputLock
from rayconv.source.checkpoint import MetaCheckpoint
from rayconv.storage import Location
from rayconv.worker import JobContext, Receipt

GiB = 1 << 30
#: Peak worker memory per piece byte: the read buffer, the transformed copy, float32 temporaries
#: of the query scaling / int8 math and tensorstore's write buffer (measured; see docs/benchmarks.md).
MEMORY_PER_PIECE_BYTE = 8
#: Output bytes staged per OCDBT commit. Per-chunk commits cost ~20 fsyncs per MB of output; 64 MiB
#: batches stall on one big write; 8-16 MiB measured fastest (docs/benchmarks.md).
COMMIT_BATCH_BYTES = 16 << 20
#: Fixed overhead per worker (Python, numpy, tensorstore, Ray worker) observed in receipts.
WORKER_BASE_BYTES = 300 * (1 << 20)


@dataclasses.dataclass
class ConvertOptions:
    files: dict[str, str]  # input file name → uri
    input_display: str
    output: str
    model_name: str | None = None
    model_path: str | None = None
    kinds: tuple[str, ...] = ("scanned", "unscanned")
    quantize_type: str | None = None
    worker_memory_gb: float = 4.0
    piece_budget: int | None = None
    unit_budget: int = 1 << 30
    executor: str = "ray"
    address: str | None = None
    num_workers: int | None = None
    worker_start_timeout: float = 600.0  # seconds to wait for worker actors to be scheduled
    restart: bool = False
    compression: str | None = None
    kv_heads: int | None = None
    progress: bool = True
    maxtext_layout: str | None = "linen"  # MaxText tree layout: linen (0.2.4 classic, JetStream) or nnx (0.2.5); rayconv.trees
    #: Check the shards and params.json against the input's checklist.chk (if any) before converting.
    verify_md5: bool = False
    source_format: str = "auto"  # meta | hf | auto (see source/hf.detect_format)
    input_directory: str | None = None  # where files were listed from (finds a Hub snapshot's original/)


#: The phases of a run, in order, as the closing log line and the benchmark name them.
PHASES = ("index", "plan", "ray start", "convert", "verify", "commit", "shutdown")


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

    def summary(self) -> str:
        """``index 0.1 s, plan 0.2 s, …`` in :data:`PHASES` order (phases that did not run are left out)."""
        names = [p for p in PHASES if p in self.seconds] + [p for p in self.seconds if p not in PHASES]
        return ", ".join(f"{p} {self.seconds[p]:.1f} s" for p in names)


@dataclasses.dataclass
class ConvertResult:
    outputs: dict[str, str]  # kind → items uri
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


def piece_budget(options: ConvertOptions) -> int:
    if options.piece_budget:
        return options.piece_budget
    usable = options.worker_memory_gb * GiB - WORKER_BASE_BYTES
    return max(1 << 20, int(usable / MEMORY_PER_PIECE_BYTE))


def open_checkpoint(options: ConvertOptions) -> MetaCheckpoint:  # or an HFCheckpoint (same interface)
    """Open the input as a Meta or a Hugging Face checkpoint (``options.source_format``, detected when auto)."""
    from rayconv.source.hf import HFCheckpoint, detect_format

    descriptor = None
    if options.model_path and options.source_format != "hf":
        try:  # a Hub repo id (meta-llama/Llama-3.1-8B) names HF files but is no Meta descriptor
            descriptor = Descriptor.parse(options.model_path)
        except SpecError:
            pass  # parsed again below if the input turns out to be Meta's
    fmt, files, display = detect_format(options.files, options.source_format, options.input_display,
                                        input_directory=options.input_directory,
                                        descriptor_shards=descriptor.shards if descriptor else None)
    if fmt == "hf":
        return HFCheckpoint.open(files, display=display, model_name=options.model_name,
                                 model_path=options.model_path, kv_heads=options.kv_heads)
    descriptor = Descriptor.parse(options.model_path) if options.model_path else None
    return MetaCheckpoint.open(files, display=display, model_name=options.model_name,
                               descriptor=descriptor, kv_heads=options.kv_heads)


def make_plan(checkpoint: MetaCheckpoint, options: ConvertOptions) -> Plan:
    return build_plan(checkpoint.spec, checkpoint.shards, checkpoint.indexes, kinds=options.kinds,
                      quantize_type=options.quantize_type, piece_budget=piece_budget(options),
                      unit_budget=max(options.unit_budget, piece_budget(options)), scales=checkpoint.scales,
                      layout=options.maxtext_layout,
                      locate=getattr(checkpoint, "locate", None))  # HF: tensors live in several files


def crc_check(checkpoint: MetaCheckpoint, receipts: Sequence[Receipt]) -> tuple[int, list[tuple[int, str]]]:
    """Combine per-range CRCs into per-record CRCs and compare with the zip directory.

    Returns (records verified, (shard, tensor) of every record that fails)."""
    segments: dict[tuple[int, str], list[tuple[int, int, int]]] = {}
    for receipt in receipts:
        for shard, tensor, offset, length, crc in receipt.crcs:
            segments.setdefault((shard, tensor), []).append((offset, length, crc))
    verified = 0
    failed: list[tuple[int, str]] = []
    for (shard, tensor), parts in segments.items():
        # shard -1-r: the row scales in fp8_scales_{r}.pt of an FP8 checkpoint (see worker._read_fp8).
        info = (checkpoint.indexes[shard] if shard >= 0 else checkpoint.scales.indexes[-1 - shard])[tensor]
        if info.crc32 is None:
            continue
        unique = sorted({(off - info.offset, length, crc) for off, length, crc in parts})
        combined = checksum.combine_segments(unique)
        if combined is None or combined[1] != info.nbytes:
            continue
        if combined[0] != info.crc32:
            failed.append((shard, tensor))
            continue
        verified += 1
    return verified, failed


def _crc_error(checkpoint: MetaCheckpoint, failed: Sequence[tuple[int, str]],
               hint: str = "corrupt shard; re-download it") -> SourceError:
    shard, tensor = failed[0]
    # shard -1-r: the row scales in fp8_scales_{r}.pt of an FP8 checkpoint (see worker._read_fp8).
    uri = checkpoint.shards[shard] if shard >= 0 else checkpoint.scales.files[-1 - shard]
    name = uri.split("?", 1)[0]
    return SourceError(f"{name}: tensor {tensor} fails its CRC-32 check ({hint})")


def verify_crcs(checkpoint: MetaCheckpoint, receipts: Sequence[Receipt]) -> int:
    """:func:`crc_check`, raising on the first record that fails."""
    verified, failed = crc_check(checkpoint, receipts)
    if failed:
        raise _crc_error(checkpoint, failed)
    return verified


def _make_executor(options: ConvertOptions):
    from rayconv.engine.executors import LocalExecutor, RayExecutor

    if options.executor == "local":
        return LocalExecutor()
    return RayExecutor(address=options.address, num_workers=options.num_workers,
                       worker_memory_gb=options.worker_memory_gb, start_timeout=options.worker_start_timeout)


def _budgets(options: ConvertOptions) -> tuple[int, int]:
    piece = piece_budget(options)
    return piece, max(options.unit_budget, piece)


def resume_options(options: ConvertOptions, checkpoint: MetaCheckpoint, record: dict[str, Any] | None,
                   out: Location) -> ConvertOptions:
    """Plan a resume with the budgets the output was started with, so its finished units stay valid
    after --worker_memory_gb changed (e.g. raised after an out-of-memory kill) — as long as the new
    workers can hold that plan's largest piece."""
    if not isinstance(record, dict) or "piece_budget" not in record:
        return options
    try:
        recorded = (int(record["piece_budget"]), int(record["unit_budget"]))
    except (KeyError, TypeError, ValueError):
        raise OutputError(f"{out.uri}/.rayconv/plan.json is damaged (piece_budget, unit_budget); rerun with --restart "
                          "to start this output over") from None
    current = _budgets(options)
    if recorded == current:
        return options
    resumed = dataclasses.replace(options, piece_budget=recorded[0], unit_budget=recorded[1])
    plan = make_plan(checkpoint, resumed)
    if plan.fingerprint() != record.get("fingerprint"):
        return options  # another conversion whatever the budget: the ledger refuses it with the reason
    largest = max((p.nbytes for u in plan.units for p in u.pieces), default=0)
    if largest > current[0]:
        need = (largest * MEMORY_PER_PIECE_BYTE + WORKER_BASE_BYTES) / GiB
        raise OutputError(f"{out.uri} holds a partial conversion planned for workers of at least {need:.2f} GiB "
                          f"(pieces up to {human_bytes(largest)}); resume with --worker_memory_gb {need:.2f} or more, "
                          "or rerun with --restart to replan for the smaller workers")
    LOG.info("Resuming with the plan this output was started with (pieces up to %s; --worker_memory_gb %s would "
             "cut pieces of up to %s): finished units are kept", human_bytes(largest), options.worker_memory_gb,
             human_bytes(current[0]))
    return resumed


def _prepare_output(out: Location, ledger: Ledger, layouts: dict[str, OutputLayout], plan: Plan, restart: bool,
                    summary: dict[str, Any], started_ns: int, fields: dict[str, Any]) -> dict[str, Any]:
    """Restart or resume: the ledger must describe this conversion, and storage must agree with it."""
    if restart:
        try:
            previous = ledger.plan_record()
        except OutputError:
            previous = None
        ledger.clear()
        for target in restart_targets(out, layouts, plan.kinds, previous):
            remove_output(target)
    record = ledger.plan_record()
    if record is None:
        for kind in plan.kinds:
            if occupied(layouts[kind].final_root):
                raise OutputError(f"{layouts[kind].final_root.uri} already exists and was not written by this "
                                  "conversion; choose another --output_directory or pass --restart to replace it")
        for kind in plan.kinds:  # rayconv's temporaries with no ledger to resume them: nothing may reuse them
            if layouts[kind].staging_root != layouts[kind].final_root:
                remove_output(layouts[kind].staging_root)
    record = ledger.start(plan.fingerprint(), summary, started_ns, **fields)
    for kind in plan.kinds:
        layout, state = layouts[kind], ledger.commit_state(kind)
        if state == COMMITTED and not is_complete(layout):
            raise OutputError(f"the ledger says the {kind} checkpoint was committed, but "
                              f"{layout.final_root.join(MARKER).uri} is missing (moved or deleted?); rerun with "
                              "--restart to write it again")
        if state is None:
            foreign = (occupied(layout.final_root) if layout.final_root != layout.staging_root
                       else is_complete(layout) or layout.item().exists(MARKER))
            if foreign:
                raise OutputError(f"{layout.final_root.uri} holds a checkpoint this conversion did not commit; move "
                                  "it away or rerun with --restart to replace it")
    return record


def compatibility_note(plan: Plan) -> str:
    """Which MaxText versions load this run's AQT checkpoint, and how to get the other tree layout."""
    if plan.layout == "linen":
        return (f"The {plan.quantize_type} checkpoint has the classic (linen) AQT tree: JetStream-MaxText and MaxText "
                "<= 0.2.4 (with pure_nnx=false enable_nnx=false pure_nnx_decoder=false) load it; MaxText >= 0.2.5 "
                "does not: convert again with --maxtext_layout nnx (or --inference_server maxtext) for it")
    return (f"The {plan.quantize_type} checkpoint has MaxText 0.2.5's NNX AQT tree: MaxText >= 0.2.5 loads it "
            "(quantization=... checkpoint_is_quantized=true scan_layers=false); JetStream-MaxText and MaxText <= 0.2.4 "
            "do not: convert again with --maxtext_layout linen for them")


def convert(options: ConvertOptions) -> ConvertResult:
    start = time.monotonic()
    started_ns = time.time_ns()
    timer = PhaseTimer()
    LOG.info("Reading checkpoint index from %s", options.input_display)
    checkpoint = open_checkpoint(options)
    timer.lap("index")
    if options.verify_md5 and source_format(checkpoint.spec) == "hf":
        LOG.info("Hugging Face checkpoint: no checklist.chk to check md5 against, and safetensors have no CRCs")
    elif options.verify_md5:
        from rayconv.source.hashing import verify_input

        Location.parse(options.output).check_writable()  # fail fast, before a long md5 pass
        read = set(checkpoint.shards)
        files = checkpoint.files  # the folder actually opened (a Hub snapshot's original/, say)
        verify_input(files, options.input_display,
                     ["params.json", *(name for name, uri in files.items() if uri in read)])
        timer.lap("md5")
    spec = checkpoint.spec
    LOG.info("Model %s: %d layers, dim %d, %d heads, %d kv heads (params.json says %d), ffn %d, vocab %d, "
             "%d shards, %s", spec.maxtext_name, spec.n_layers, spec.dim, spec.n_heads, spec.n_kv_heads,
             spec.params_kv_heads, spec.ffn_dim, spec.vocab_size, spec.n_shards, human_bytes(checkpoint.nbytes))
    if checkpoint.fp8:
        LOG.info("Source is Meta's FP8 SKU: FFN weights of layers 1..%d are float8 with row scales, dequantized to "
                 "bf16 on the fly; the bf16 outputs hold these FP8-rounded weights (not the original bf16 model) "
                 "and int8 is quantized from them", spec.n_layers - 2)
    out = Location.parse(options.output)
    out.check_writable()
    lock = OutputLock(out).acquire()
    try:
        return _convert_locked(options, checkpoint, out, lock, start, started_ns, timer)
    finally:
        lock.release()


def _convert_locked(options: ConvertOptions, checkpoint: MetaCheckpoint, out: Location, lock: OutputLock,
                    start: float, started_ns: int, timer: PhaseTimer) -> ConvertResult:
    spec = checkpoint.spec
    ledger = Ledger(out)
    if not options.restart:
        options = resume_options(options, checkpoint, ledger.plan_record(), out)
    plan = make_plan(checkpoint, options)
    summary = describe(plan)
    LOG.info("Plan %s: %d units, %d pieces, largest piece %s, outputs %s", summary["fingerprint"], summary["units"],
             summary["pieces"], human_bytes(summary["largest_piece_bytes"]), ", ".join(plan.kinds))

    layouts = output_layouts(out, plan.quantize_type, plan.tree)
    identities = source_identities(checkpoint)
    budgets = _budgets(options)
    fields = {"source": source_digest(identities), "piece_budget": budgets[0], "unit_budget": budgets[1],
              "quantize_type": plan.quantize_type, "compression": options.compression,
              "outputs": {k: relative(out, layouts[k].final_root) for k in plan.kinds}}
    record = _prepare_output(out, ledger, layouts, plan, options.restart, summary, started_ns, fields)
    started_ns = record.get("started_ns", started_ns)
    committed = [k for k in plan.kinds if ledger.commit_state(k) == COMMITTED]
    pending = [k for k in plan.kinds if k not in committed]
    # Outputs whose commit finished before an interruption need no units; the rest are built.
    to_build = [k for k in pending if not is_complete(layouts[k])]
    done = resumable(ledger, plan, identities, layouts, to_build) if to_build else {}
    todo = [u for u in plan.units if u.id not in done] if to_build else []
    if done:
        LOG.info("Resuming: %d of %d units already done", len(done), len(plan.units))

    timer.lap("plan")
    executor = _make_executor(options) if todo or to_build else None
    timer.lap("ray start")
    receipts = [done[u.id] for u in plan.units if u.id in done]
    bytes_total = plan.input_bytes
    progress = Progress(bytes_total, len(plan.units), done_bytes=sum(r.bytes_read for r in receipts),
                        done_units=len(receipts), enabled=options.progress)
    try:
        if todo:
            for kind in to_build:  # new databases: a complete staging directory must be rebuilt, not renamed
                if layouts[kind].staging_root != layouts[kind].final_root:
                    layouts[kind].staging_root.delete(MARKER)
                    layouts[kind].item(staging=True).delete(MARKER)
            LOG.info("Converting %s with %d %s worker(s)", human_bytes(sum(u.read_bytes for u in todo)),
                     executor.workers, executor.name)
            ctx = JobContext.create(dataclasses.replace(plan, kinds=tuple(to_build)), layouts, options.compression,
                                    batch_bytes=min(COMMIT_BATCH_BYTES, piece_budget(options)))
            units = {u.id: u for u in todo}
            executor.start(ctx)
            timer.lap("ray start")
            for n, receipt in enumerate(executor.run(ctx, todo), 1):
                ledger.record(receipt, {s: identities[s] for s in unit_shards(units[receipt.unit])})
                receipts.append(receipt)
                progress.update(receipt.bytes_read, 1)
                stop_point("units", str(n))
        progress.close()
        timer.lap("convert")
        if to_build:
            verified, failed = crc_check(checkpoint, receipts)
            if failed:
                # Forget what the corrupt bytes produced, so a rerun after re-downloading re-reads them.
                bad = set(failed)
                ledger.forget([r.unit for r in receipts if any((c[0], c[1]) in bad for c in r.crcs)])
                raise _crc_error(checkpoint, failed, "corrupt shard; re-download it and rerun: only the units "
                                 "that read it are redone")
            LOG.info("Verified CRC-32 of %d source tensors", verified)
        timer.lap("verify")

        by_unit = {r.unit: r for r in receipts}
        outputs = {kind: layouts[kind].items_path.uri for kind in committed}
        lock.check()
        for kind in pending:
            if ledger.commit_state(kind) != COMMITTING:
                ledger.set_commit_state(kind, COMMITTING, layouts[kind].items_path.uri)
        if pending:
            stop_point("intent")
        calls, results = [], {}
        for kind in pending:
            custom = layouts[kind].tree.custom_metadata(kind)
            kwargs = {"compression": options.compression, "custom_metadata": custom, "started_ns": started_ns}
            if kind not in to_build:  # only to be checked and recorded: no need for a committer
                LOG.info("Found the %s checkpoint committed by an interrupted run; checking and recording it", kind)
                results[kind] = commit_or_error(layouts[kind], plan.arrays(kind), [], **kwargs)
                continue
            dbs = [by_unit[u.id].dbs[kind] for u in plan.units]
            LOG.info("Committing %s checkpoint (%d arrays from %d databases)", kind, len(plan.arrays(kind)), len(dbs))
            calls.append((commit_or_error, (layouts[kind], plan.arrays(kind), dbs), kwargs))
        results.update(zip([k for k in pending if k in to_build], executor.call_all(calls) if calls else []))
        failure: Exception | None = None
        for kind in pending:
            result = results[kind]
            if isinstance(result, Exception):
                failure = failure or result
                continue
            ledger.mark_committed(kind, result.uri)
            stop_point("ledger", kind)
            outputs[kind] = result.uri
            LOG.info("Wrote %s checkpoint to %s", kind, result.uri)
        if failure is not None:
            raise failure
        timer.lap("commit")
    finally:
        progress.close()
        if executor is not None:
            executor.shutdown()
        timer.lap("shutdown")

    if "scanned" in outputs:
        LOG.info("Completed conversion of %s to %s", spec.maxtext_name, outputs["scanned"])
    if "unscanned" in outputs:
        LOG.info("Completed unscanning checkpoint to %s", outputs["unscanned"])
    if "int8" in outputs:
        LOG.info("Completed quantizing model %s with %s to %s", spec.maxtext_name, plan.quantize_type,
                 outputs["int8"])
        LOG.info(compatibility_note(plan))
    return ConvertResult(
        outputs=outputs, plan=summary, seconds=time.monotonic() - start,
        bytes_read=sum(r.bytes_read for r in receipts), bytes_written=sum(r.bytes_written for r in receipts),
        units_run=len(todo), units_skipped=len(done), workers=executor.workers if executor else 0,
        worker_peak_rss=max((r.peak_rss for r in receipts), default=0), phases=dict(timer.seconds),
        unit_seconds=sum(r.seconds for r in receipts if r.unit not in done),
        local_ray=bool(getattr(executor, "local", False)))
