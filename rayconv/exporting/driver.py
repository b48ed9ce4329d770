"""The export job, start to finish: open → model → check → plan → lock → resume → units → publish → small files.

The driver holds metadata only (the checkpoint's leaf list, the file plan, receipts); workers read their regions
and write their byte ranges directly. What is visible, and when:

* each safetensors file appears under its final name only once every region of it is written (local: the
  preallocated ``.rayconv-partial`` file fsynced and renamed; gs://: the checked parts composed) and is never
  rewritten afterwards (a resumed export skips a published file's units);
* then tokenizer files (``--tokenizer_from``), ``generation_config.json``, ``config.json`` and, last, the
  index ``model.safetensors.index.json`` (several files) — the file transformers opens first — so a directory
  whose index (or, for one file, config.json) is there is complete;
* then the ledger's ``export-complete.json``: a rerun has nothing to do.

Every user-caused failure is one line (:class:`rayconv.errors.ConversionError`), raised before anything is
written when it is about the input or the model.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from rayconv import tunables
from rayconv.errors import OutputError, SpecError
from rayconv.exporting import model as models
from rayconv.exporting.ledger import ExportLedger, source_digest
from rayconv.exporting.plan import ExportPlan, build_plan, describe, piece_budget
from rayconv.exporting.worker import ExportContext
from rayconv.progress import LOG, Progress, human_bytes
from rayconv.sink.commit import stop_point
from rayconv.sink.lock import OutputLock
from rayconv.source.orbax import MaxTextCheckpoint, open_checkpoint
from rayconv.storage import Location
from rayconv.targets import safetensors_writer
from rayconv.targets.safetensors_files import DEFAULT_MAX_SHARD_SIZE, INDEX_FILE
from rayconv.tunables import Tunables

CONFIG, GENERATION_CONFIG = "config.json", "generation_config.json"
#: Tokenizer files ``--tokenizer_from`` copies when present (what ``save_pretrained`` of Llama's tokenizers writes).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
MAX_SMALL_FILE_BYTES = 64 << 20


@dataclasses.dataclass
class ExportOptions:
    input: str  # a MaxText items directory (or its step directory), local or gs://
    output: str
    model_name: str | None = None  # as MaxText names it: llama3.1-405b
    config: str | None = None  # an HF config.json instead
    dtype: str = "bfloat16"
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
    tokenizer_from: str | None = None
    executor: str = "ray"
    address: str | None = None
    num_workers: int | None = None
    worker_memory_gb: float = 1.0
    piece_budget: int | None = None  # bytes per piece; default from worker_memory_gb (tests cut smaller pieces)
    worker_start_timeout: float = 600.0
    restart: bool = False
    progress: bool = True
    tunables: Tunables = dataclasses.field(default_factory=Tunables)


@dataclasses.dataclass
class ExportResult:
    output: str
    files: list[str]
    plan: dict[str, Any]
    seconds: float
    bytes_read: int
    bytes_written: int
    units_run: int
    units_skipped: int
    workers: int
    worker_peak_rss: int
    local_ray: bool = False


def _read_small(uri: str, what: str) -> bytes:
    """A small file (config.json, a tokenizer file) at a local path or gs:// URI, size-checked before it is read."""
    location = Location.parse(uri)
    parent, name = location.parent, location.name
    size = parent.size(name)
    if size is None and location.is_local and os.path.isdir(location.path):
        raise SpecError(f"{what} {uri} is a directory, not a file")
    if size is None:
        raise SpecError(f"{what} {uri} does not exist")
    if size > MAX_SMALL_FILE_BYTES:
        raise SpecError(f"{what} {uri} is {size} bytes (at most {MAX_SMALL_FILE_BYTES})")
    return parent.read_bytes(name) or b""


def resolve_model(options: ExportOptions) -> models.ExportModel:
    if (options.model_name is None) == (options.config is None):
        raise SpecError("say which model the checkpoint is: --model_name (as MaxText names it, e.g. llama3.1-8b) "
                        "or --config (its Hugging Face config.json), not both")
    if options.model_name is not None:
        return models.from_model_name(options.model_name)
    return models.from_config_file(options.config, _read_small(options.config, "--config"))


def _tokenizer_files(directory: str | None) -> dict[str, bytes]:
    if directory is None:
        return {}
    location = Location.parse(directory)
    names = [n for n in TOKENIZER_FILES if location.size(n) is not None]
    if not names:
        raise SpecError(f"--tokenizer_from {directory} holds none of {', '.join(TOKENIZER_FILES)}")
    return {n: _read_small(location.join(n).uri, "tokenizer file") for n in names}


def _make_executor(options: ExportOptions):
    from rayconv.engine.executors import make_executor  # ray and its actors only when units run

    return make_executor(options)


def _sizes(out: Location, names: list[str]) -> dict[str, int | None]:
    """Each name's size (None: absent). On gs:// one listing first, so a 405B export's ~400 files cost one request
    plus one per file that exists, not one per planned file."""
    if out.is_local:
        return {name: out.size(name) for name in names}
    present = set(out.list_keys())
    return {name: out.size(name) if name in present else None for name in names}


def _small_files(plan: ExportPlan) -> list[str]:
    """The files the export writes besides the safetensors, the last one last (the index, or config.json)."""
    return [GENERATION_CONFIG, CONFIG] + ([INDEX_FILE] if plan.files.index is not None else [])


def _prepare(out: Location, ledger: ExportLedger, plan: ExportPlan, tokenizer: dict[str, bytes], restart: bool,
             fields: dict[str, Any]) -> None:
    """Restart, or refuse an output this export did not start, then record (or check) the export."""
    names = [f.name for f in plan.files.files] + _small_files(plan) + list(tokenizer)
    if restart:
        ledger.clear()
        for file in plan.files.files:
            out.delete(file.name + safetensors_writer.PARTIAL_SUFFIX)
        for name in names:
            out.delete(name)
        if not out.is_local:
            out.join(safetensors_writer.STAGING_DIR).delete_all()
    if ledger.record() is None:
        sizes = _sizes(out, names)
        for name in names:
            if sizes[name] is not None:
                raise OutputError(f"{out.join(name).uri} already exists and was not written by this export; choose "
                                  "another --output_directory or pass --restart to replace it")
    ledger.start(fields)


def export(options: ExportOptions) -> ExportResult:
    start = time.monotonic()
    tunables.install(options.tunables)
    LOG.info("Reading the MaxText checkpoint's tree from %s", options.input)
    checkpoint = open_checkpoint(options.input)
    model = resolve_model(options)
    models.check_checkpoint(checkpoint, model)
    spec = model.spec
    LOG.info("%s of %s: %d layers, dim %d, %d heads, %d kv heads, ffn %d, vocab %d", checkpoint.describe(),
             model.name, spec.n_layers, spec.dim, spec.n_heads, spec.n_kv_heads, spec.ffn_dim, spec.vocab_size)
    tokenizer = _tokenizer_files(options.tokenizer_from)
    out = Location.parse(options.output)
    plan = build_plan(checkpoint, spec, dtype=options.dtype, max_shard_size=options.max_shard_size,
                      budget=options.piece_budget or piece_budget(options.worker_memory_gb), gcs=not out.is_local)
    summary = describe(plan)
    LOG.info("Plan %s: %d files, %d units, %d pieces, largest piece %s, %s of %s", summary["fingerprint"],
             summary["files"], summary["units"], summary["pieces"], human_bytes(summary["largest_piece_bytes"]),
             human_bytes(summary["bytes"]), plan.dtype)
    out.check_writable()
    with OutputLock(out) as lock:
        return _export_locked(options, checkpoint, model, plan, tokenizer, out, lock, start)


def _export_locked(options: ExportOptions, checkpoint: MaxTextCheckpoint, model: models.ExportModel,
                   plan: ExportPlan, tokenizer: dict[str, bytes], out: Location, lock: OutputLock,
                   start: float) -> ExportResult:
    ledger = ExportLedger(out)
    summary = describe(plan)
    fields = {"fingerprint": plan.fingerprint(), "source": source_digest(checkpoint), "dtype": plan.dtype,
              "input": checkpoint.location.uri, "model": model.name, "summary": summary}
    _prepare(out, ledger, plan, tokenizer, options.restart, fields)
    files = [f.name for f in plan.files.files]
    result = ExportResult(out.uri, files, summary, 0.0, 0, 0, 0, 0, 0, 0)
    sizes = _sizes(out, files)
    if ledger.complete() and all(sizes[f.name] == f.size for f in plan.files.files):
        LOG.info("%s is a finished export of %s: nothing to do", out.uri, checkpoint.location.uri)
        result.units_skipped = len(plan.units)
        result.seconds = time.monotonic() - start
        return result
    by_file = plan.unit_files()
    published = {f.name for f in plan.files.files if sizes[f.name] == f.size}
    for name in published - ledger.published():  # published by a run stopped before it said so
        ledger.mark_published(name, plan.files.file(name).size)
    receipts = {u: r for u, r in ledger.receipts().items()}
    todo = [u for name, units in by_file.items() if name not in published for u in units if u.id not in receipts]
    skipped = len(plan.units) - len(todo)
    if skipped:
        LOG.info("Resuming: %d of %d units already done (%d of %d files published)", skipped, len(plan.units),
                 len(published), len(files))
    for file in plan.files.files:
        if file.name not in published:
            safetensors_writer.create(out, file)
    executor = _make_executor(options) if todo else None
    ctx = ExportContext(checkpoint=checkpoint, spec=model.spec, output=out.uri,
                        files={f.name: f for f in plan.files.files}, dtype=plan.dtype,
                        tunables=tunables.current())
    progress = Progress(sum(u.nbytes for u in todo), len(todo), enabled=options.progress)
    try:
        if todo:
            LOG.info("Exporting %s with %d %s worker(s)", human_bytes(sum(u.nbytes for u in todo)), executor.workers,
                     executor.name)
            for n, receipt in enumerate(executor.run(ctx, todo), 1):
                ledger.add_receipt(receipt)
                receipts[receipt.unit] = receipt
                result.bytes_read += receipt.bytes_read
                result.bytes_written += receipt.bytes_written
                result.worker_peak_rss = max(result.worker_peak_rss, receipt.peak_rss)
                progress.update(receipt.bytes_written, 1)
                stop_point("export_units", str(n))
        progress.close()
        lock.check()
        for file in plan.files.files:
            if file.name in published:
                continue
            regions = [r for unit in by_file[file.name] for r in receipts[unit.id].regions]
            safetensors_writer.finish(out, file, regions)
            ledger.mark_published(file.name, file.size)
            stop_point("export_file", file.name)
        for name, data in tokenizer.items():
            out.write_bytes(name, data)
        small = {GENERATION_CONFIG: models.generation_config_json(model), CONFIG: models.config_json(model, plan.dtype),
                 INDEX_FILE: plan.files.index}
        for name in _small_files(plan):  # the index (or config.json) last: then the directory is complete
            lock.check()
            out.write_bytes(name, small[name])
            stop_point("export_small", name)
        ledger.mark_complete(files)
    finally:
        progress.close()
        if executor is not None:
            executor.shutdown()
    LOG.info("Exported %s to %s: %s", checkpoint.location.uri, out.uri, ", ".join(files))
    result.units_run, result.units_skipped = len(todo), skipped
    result.workers = executor.workers if executor else 0
    result.local_ray = bool(getattr(executor, "local", False))
    result.seconds = time.monotonic() - start
    return result
