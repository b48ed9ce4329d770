"""The conversion job, start to finish: open → plan → run units → verify → commit.

The driver holds only metadata: shard indexes, the plan, receipts. Tensor bytes move between
storage and workers directly.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

from rayconv import checksum
from rayconv.errors import OutputError, SourceError, SpecError
from rayconv.models import Descriptor
from rayconv.plan import Plan, build_plan, describe
from rayconv.progress import LOG, Progress, human_bytes
from rayconv.sink.commit import commit_output
from rayconv.sink.layout import OutputLayout, output_layouts
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
    restart: bool = False
    compression: str | None = None
    kv_heads: int | None = None
    progress: bool = True
    source_format: str = "auto"  # meta | hf | auto (see source/hf.detect_format)
    input_directory: str | None = None  # where files were listed from (finds a Hub snapshot's original/)


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
                      unit_budget=max(options.unit_budget, piece_budget(options)),
                      locate=getattr(checkpoint, "locate", None))  # HF: tensors live in several files


def verify_crcs(checkpoint: MetaCheckpoint, receipts: Sequence[Receipt]) -> int:
    """Combine per-range CRCs into per-record CRCs and compare with the zip directory."""
    segments: dict[tuple[int, str], list[tuple[int, int, int]]] = {}
    for receipt in receipts:
        for shard, tensor, offset, length, crc in receipt.crcs:
            segments.setdefault((shard, tensor), []).append((offset, length, crc))
    verified = 0
    for (shard, tensor), parts in segments.items():
        info = checkpoint.indexes[shard][tensor]
        if info.crc32 is None:
            continue
        unique = sorted({(off - info.offset, length, crc) for off, length, crc in parts})
        combined = checksum.combine_segments(unique)
        if combined is None or combined[1] != info.nbytes:
            continue
        if combined[0] != info.crc32:
            name = checkpoint.shards[shard].split("?", 1)[0]
            raise SourceError(f"{name}: tensor {tensor} fails its CRC-32 check (corrupt shard; re-download it)")
        verified += 1
    return verified


def _make_executor(options: ConvertOptions):
    from rayconv.engine.executors import LocalExecutor, RayExecutor

    if options.executor == "local":
        return LocalExecutor()
    return RayExecutor(address=options.address, num_workers=options.num_workers,
                       worker_memory_gb=options.worker_memory_gb)


def _prepare_output(out: Location, layouts: dict[str, OutputLayout], kinds: Sequence[str], restart: bool,
                    fingerprint: str, summary: dict[str, Any], started_ns: int):
    from rayconv.engine.ledger import Ledger

    out.check_writable()
    ledger = Ledger(out)
    if restart:
        ledger.clear()
        for kind in kinds:
            layouts[kind].staging_root.delete_all()
            layouts[kind].final_root.delete_all()
    record = ledger.plan_record()
    if record is None:
        for kind in kinds:
            if layouts[kind].final_root.exists():
                raise OutputError(f"{layouts[kind].final_root.uri} already exists and was not written by this "
                                  "conversion; choose another --output_directory or pass --restart to replace it")
    record = ledger.start(fingerprint, summary, started_ns)
    return ledger, record


def convert(options: ConvertOptions) -> ConvertResult:
    start = time.monotonic()
    started_ns = time.time_ns()
    LOG.info("Reading checkpoint index from %s", options.input_display)
    checkpoint = open_checkpoint(options)
    spec = checkpoint.spec
    LOG.info("Model %s: %d layers, dim %d, %d heads, %d kv heads (params.json says %d), ffn %d, vocab %d, "
             "%d shards, %s", spec.maxtext_name, spec.n_layers, spec.dim, spec.n_heads, spec.n_kv_heads,
             spec.params_kv_heads, spec.ffn_dim, spec.vocab_size, spec.n_shards, human_bytes(checkpoint.nbytes))
    plan = make_plan(checkpoint, options)
    summary = describe(plan)
    LOG.info("Plan %s: %d units, %d pieces, largest piece %s, outputs %s", summary["fingerprint"], summary["units"],
             summary["pieces"], human_bytes(summary["largest_piece_bytes"]), ", ".join(plan.kinds))

    out = Location.parse(options.output)
    layouts = output_layouts(out, plan.quantize_type)
    ledger, record = _prepare_output(out, layouts, plan.kinds, options.restart, plan.fingerprint(), summary,
                                     started_ns)
    started_ns = record.get("started_ns", started_ns)
    done = {} if options.restart else ledger.receipts()
    todo = [u for u in plan.units if u.id not in done]
    committed = set(record.get("committed", []))
    if done:
        LOG.info("Resuming: %d of %d units already done", len(done), len(plan.units))

    executor = _make_executor(options) if todo or set(plan.kinds) - committed else None
    receipts = [done[u.id] for u in plan.units if u.id in done]
    bytes_total = plan.input_bytes
    progress = Progress(bytes_total, len(plan.units), done_bytes=sum(r.bytes_read for r in receipts),
                        done_units=len(receipts), enabled=options.progress)
    try:
        if todo:
            LOG.info("Converting %s with %d %s worker(s)", human_bytes(sum(u.read_bytes for u in todo)),
                     executor.workers, executor.name)
            ctx = JobContext.create(plan, layouts, options.compression,
                                    batch_bytes=min(COMMIT_BATCH_BYTES, piece_budget(options)))
            for receipt in executor.run(ctx, todo):
                ledger.record(receipt)
                receipts.append(receipt)
                progress.update(receipt.bytes_read, 1)
        progress.close()
        verified = verify_crcs(checkpoint, receipts)
        LOG.info("Verified CRC-32 of %d source tensors", verified)

        by_unit = {r.unit: r for r in receipts}
        outputs = {kind: layouts[kind].items_path.uri for kind in plan.kinds if kind in committed}
        pending = [kind for kind in plan.kinds if kind not in committed]
        calls = []
        for kind in pending:
            dbs = [by_unit[u.id].dbs[kind] for u in plan.units]
            LOG.info("Committing %s checkpoint (%d arrays from %d databases)", kind, len(plan.arrays(kind)), len(dbs))
            custom = {"scan_layers": kind == "scanned", "converter": "rayconv"} if kind != "int8" else {}
            calls.append((commit_output, (layouts[kind], plan.arrays(kind), dbs),
                          {"compression": options.compression, "custom_metadata": custom, "started_ns": started_ns}))
        for kind, item in zip(pending, executor.call_all(calls) if calls else []):
            ledger.mark_committed(kind)
            outputs[kind] = item.uri
            LOG.info("Wrote %s checkpoint to %s", kind, item.uri)
    finally:
        progress.close()
        if executor is not None:
            executor.shutdown()

    if "scanned" in outputs:
        LOG.info("Completed conversion of %s to %s", spec.maxtext_name, outputs["scanned"])
    if "unscanned" in outputs:
        LOG.info("Completed unscanning checkpoint to %s", outputs["unscanned"])
    if "int8" in outputs:
        LOG.info("Completed quantizing model %s with %s to %s", spec.maxtext_name, plan.quantize_type,
                 outputs["int8"])
    return ConvertResult(
        outputs=outputs, plan=summary, seconds=time.monotonic() - start,
        bytes_read=sum(r.bytes_read for r in receipts), bytes_written=sum(r.bytes_written for r in receipts),
        units_run=len(todo), units_skipped=len(done), workers=executor.workers if executor else 0,
        worker_peak_rss=max((r.peak_rss for r in receipts), default=0))
