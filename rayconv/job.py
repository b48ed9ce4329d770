"""What a conversion job is, as pure data and pure functions: its options, memory budgets and plan.

Nothing here runs units, touches the output or starts Ray: ``rayconv convert`` (engine/driver.py),
``rayconv plan`` (forecast.py) and ``rayconv verify`` (verify.py) all derive the same plan
from the same options through these functions, so they cannot disagree about it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from rayconv.acquire import Acquisition
from rayconv import targets
from rayconv.errors import OutputError, SpecError
from rayconv.families import Descriptor
from rayconv.plan import Plan, build_plan
from rayconv.progress import LOG, human_bytes
from rayconv.source.checkpoint import MetaCheckpoint
from rayconv.source.protocol import Checkpoint
from rayconv.storage import Location
from rayconv.tunables import Tunables
from rayconv.targets.maxtext_kinds import DEFAULT_KINDS

GiB = 1 << 30
#: Peak worker memory per piece byte: the read buffer, the transformed copy, float32 temporaries
#: of the query scaling / int8 math and tensorstore's write buffer (measured; see docs/benchmarks.md).
MEMORY_PER_PIECE_BYTE = 8
#: Output bytes staged per OCDBT commit on a local disk. Per-chunk commits cost ~20 fsyncs per MB of output;
#: 64 MiB batches stall on one big write; 8-16 MiB measured fastest (docs/benchmarks.md).
COMMIT_BATCH_BYTES = 16 << 20
#: Output bytes staged per OCDBT commit on gs:// (see :func:`commit_batch_bytes`): a worker converting 58-104 MB/s
#: of input (per-worker rates measured at real widths) writes ~150-260 MB/s of output for three outputs, so
#: 256 MiB batches commit each database about once per second, Cloud Storage's rate for one object name.
GCS_COMMIT_BATCH_BYTES = 256 << 20
#: The share of a gs:// worker's usable memory the two in-flight commit batches may take at most.
GCS_BATCH_MEMORY_SHARE = 0.5
#: Fixed overhead per worker (Python, numpy, tensorstore, Ray worker) observed in receipts.
WORKER_BASE_BYTES = 300 * (1 << 20)


@dataclasses.dataclass
class ConvertOptions:
    files: dict[str, str]  # input file name → uri
    input_display: str
    output: str
    model_name: str | None = None
    model_path: str | None = None
    kinds: tuple[Any, ...] = DEFAULT_KINDS  # the target's output kinds (objects, or their names)
    quantize_type: str | None = None
    #: GiB each worker reserves. 1: at the 405B's real widths as fast as 4 GiB and half the memory (docs/benchmarks.md).
    worker_memory_gb: float = 1.0
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
    #: MaxText tree layout (rayconv.trees): linen (0.2.4 classic, JetStream), nnx (0.2.5), to_maxtext; None: the
    #: family's default (Llama: linen)
    maxtext_layout: str | None = None
    #: Check the shards and params.json against the input's checklist.chk (if any) before converting.
    verify_md5: bool = False
    source_format: str = "auto"  # meta | hf | auto (see source/hf.detect_format)
    input_directory: str | None = None  # where files were listed from (finds a Hub snapshot's original/)
    #: What the job's first phase fetches or writes to fill ``files`` (rayconv.acquire); None: ``files`` is the input.
    acquire: Acquisition | None = None
    #: Timeouts, read sizes, concurrency: installed in the driver, carried to the workers (rayconv.tunables).
    tunables: Tunables = dataclasses.field(default_factory=Tunables)


def on_gcs(output: str) -> bool:
    """Whether ``output`` is in a Cloud Storage bucket (its commits are bound by the per-object write rate)."""
    return str(output).startswith("gs://")


def _usable_memory(options: ConvertOptions) -> float:
    return options.worker_memory_gb * GiB - WORKER_BASE_BYTES


def _gcs_batch(options: ConvertOptions) -> int:
    """The gs:// commit batch: GCS_COMMIT_BATCH_BYTES, unless two batches would take more than
    GCS_BATCH_MEMORY_SHARE of the worker's usable memory (1 GiB workers: ~181 MiB)."""
    share = int(_usable_memory(options) * GCS_BATCH_MEMORY_SHARE / 2)
    return max(1 << 20, min(GCS_COMMIT_BATCH_BYTES, share))


def batch_reserve_bytes(options: ConvertOptions) -> int:
    """Worker memory set aside for commit batches beside the pieces: two gs:// batches (one committing, one
    filling). Local batches (16 MiB, at most a piece) are small beside the pieces and are not reserved; the
    measured worker peaks stay within the per-piece model with them (docs/benchmarks.md)."""
    return 2 * _gcs_batch(options) if on_gcs(options.output) else 0


def worker_memory_bytes(largest_piece: int, batch_reserve: int = 0) -> int:
    """Peak memory of a worker whose largest piece is ``largest_piece`` bytes (the driver's model), plus the
    commit batches a gs:// writer holds (``batch_reserve``: :func:`batch_reserve_bytes`); :func:`piece_budget`
    is its inverse."""
    return largest_piece * MEMORY_PER_PIECE_BYTE + batch_reserve + WORKER_BASE_BYTES


def piece_budget(options: ConvertOptions) -> int:
    """Bytes of G one piece may hold: the usable worker memory (less the gs:// batch reserve) / 8."""
    if options.piece_budget:
        return options.piece_budget
    usable = _usable_memory(options) - batch_reserve_bytes(options)
    return max(1 << 20, int(usable / MEMORY_PER_PIECE_BYTE))


def commit_batch_bytes(options: ConvertOptions, gcs: bool | None = None) -> int:
    """Output bytes a worker stages before committing its unit databases (``JobContext.batch_bytes``).

    The single home of this rule: ``convert`` (engine/driver.py) gives it to the workers and ``rayconv plan``
    (forecast.py) models commits with it. Every OCDBT commit rewrites each written database's
    ``manifest.ocdbt``: on a local disk that costs fsyncs, and 16 MiB batches measured fastest
    (COMMIT_BATCH_BYTES; never above a piece, so small budgets stay small). On Cloud Storage it is a rewrite
    of the same object name, which is limited to about one write per second (faster rewrites are answered
    429 and retried with backoff). At 58-104 MB/s of input per worker (measured), 150-260 MB/s of output, 16 MiB
    batches would rewrite each manifest up to ~15 times a second; GCS_COMMIT_BATCH_BYTES (256 MiB) brings that
    to about once a second. The writer holds up to two batches of output arrays (one committing while the next
    fills), so the batch is capped at GCS_BATCH_MEMORY_SHARE of the usable worker memory for both, and
    :func:`piece_budget` shrinks pieces by that reserve (:func:`batch_reserve_bytes`). The per-object limit is
    Cloud Storage's documented one, modelled in forecast.estimate, not measured against real Cloud Storage.
    ``gcs`` overrides where the output is (the planner's estimate for a GCS destination).
    """
    if on_gcs(options.output) if gcs is None else gcs:
        return _gcs_batch(options)
    return min(COMMIT_BATCH_BYTES, piece_budget(options))


def open_checkpoint(options: ConvertOptions) -> Checkpoint:
    """Open the input with its format's reader (``options.source_format``, detected when auto)."""
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
    readers: dict[str, Callable[[], Checkpoint]] = {
        "hf": lambda: HFCheckpoint.open(files, display=display, model_name=options.model_name,
                                        model_path=options.model_path, kv_heads=options.kv_heads),
        "meta": lambda: MetaCheckpoint.open(files, display=display, model_name=options.model_name,
                                            descriptor=Descriptor.parse(options.model_path) if options.model_path
                                            else None, kv_heads=options.kv_heads),
    }
    return readers[fmt]()


def make_plan(checkpoint: Checkpoint, options: ConvertOptions) -> Plan:
    return build_plan(checkpoint.spec, checkpoint.tensor_files, checkpoint.indexes, kinds=options.kinds,
                      target=targets.get(), quantize_type=options.quantize_type, piece_budget=piece_budget(options),
                      unit_budget=max(options.unit_budget, piece_budget(options)), scales=checkpoint.scales,
                      layout=options.maxtext_layout, locate=checkpoint.locate)


def budgets(options: ConvertOptions) -> tuple[int, int]:
    """(piece budget, unit budget) in bytes: a unit holds at least one whole piece."""
    piece = piece_budget(options)
    return piece, max(options.unit_budget, piece)


def resume_options(options: ConvertOptions, checkpoint: Checkpoint, record: dict[str, Any] | None,
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
    current = budgets(options)
    if recorded == current:
        return options
    resumed = dataclasses.replace(options, piece_budget=recorded[0], unit_budget=recorded[1])
    plan = make_plan(checkpoint, resumed)
    if plan.fingerprint() != record.get("fingerprint"):
        return options  # another conversion whatever the budget: the ledger refuses it with the reason
    largest = max((p.nbytes for u in plan.units for p in u.pieces), default=0)
    if largest > current[0]:
        reserve = 2 * GCS_COMMIT_BATCH_BYTES if on_gcs(options.output) else 0  # the most batch_reserve_bytes takes
        need = math.ceil(worker_memory_bytes(largest, reserve) / GiB * 100) / 100
        raise OutputError(f"{out.uri} holds a partial conversion planned for workers of at least {need:.2f} GiB "
                          f"(pieces up to {human_bytes(largest)}); resume with --worker_memory_gb {need:.2f} or more, "
                          "or rerun with --restart to replan for the smaller workers")
    LOG.info("Resuming with the plan this output was started with (pieces up to %s; --worker_memory_gb %s would "
             "cut pieces of up to %s): finished units are kept", human_bytes(largest), options.worker_memory_gb,
             human_bytes(current[0]))
    return resumed
