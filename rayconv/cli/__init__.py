"""``rayconv``: the commands. Flags are defined in :mod:`rayconv.cli.flags`, turned into a job in
:mod:`rayconv.cli.options`.

Every user-caused failure ends as one line on stderr (``rayconv: error: …``) and exit status 1;
usage mistakes exit 2 (click's convention).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from typing import Any

import click

from rayconv import tunables
from rayconv.acquire import acquire
from rayconv.cli.flags import (MAXTEXT_LAYOUT_HELP, RATE_FLAGS, SOURCE_FORMAT, convert_options, export_options, option,
                               plan_options)
from rayconv.cli.options import build_options, check_engine_flags, destination, source_kind_of
from rayconv.errors import ConversionError, SpecError, user_error
from rayconv.progress import LOG, human_bytes, setup_logging
from rayconv.trees import LAYOUTS


def _fail(exc: ConversionError | str) -> None:
    click.echo(f"rayconv: error: {exc}", err=True)
    sys.exit(1)


# -- error and signal handling (one line per user-caused failure) --------------------------------------------


@contextlib.contextmanager
def _one_line_errors(verbose: bool = False, *, signals: bool = False):
    """Turn a user-caused failure into ``rayconv: error: …`` and exit status 1; let a bug keep its traceback.

    What counts as user-caused is decided in one place, :func:`rayconv.errors.user_error` (ConversionError,
    also when Ray wrapped it; OS errors of the environment). With ``--verbose`` the traceback of a user
    error is printed too. ``signals``: SIGTERM/SIGINT stop the run with one line (:mod:`rayconv.interrupt`).
    """
    from rayconv import interrupt

    if signals:
        interrupt.install()
    try:
        yield
    except KeyboardInterrupt as exc:  # Interrupted, or what Ray's core worker made of it (interrupt.reason)
        _fail(interrupt.reason(exc))
    except Exception as exc:
        error = user_error(exc)
        if error is None:
            raise
        if verbose:
            traceback.print_exception(exc)
        _fail(error)


@click.group()
@click.version_option(package_name="rayconv")
def main() -> None:
    """Convert Meta Llama checkpoints to MaxText (bf16 scanned/unscanned, int8) with Ray."""


@main.command()
@convert_options
def convert(**flags: Any) -> None:
    """Convert a Meta (or Hugging Face) checkpoint into MaxText checkpoints under the output directory."""
    setup_logging(flags["verbose"])
    with _one_line_errors(flags["verbose"], signals=True):
        check_engine_flags(flags["num_workers"], flags["worker_memory_gb"], flags["num_kv_heads"],
                           flags["worker_start_timeout"])
        from rayconv.engine.driver import convert as run

        result = run(build_options(flags))
    rate = f", per-worker rate {result.bytes_read / result.unit_seconds / 1e6:.1f} MB/s" if result.unit_seconds else ""
    LOG.info("Done in %.1f s (%s): read %s, wrote %s, %d units (%d resumed), %d workers, worker peak RSS %s%s",
             result.seconds, _phases(result.phases), human_bytes(result.bytes_read), human_bytes(result.bytes_written),
             result.units_run, result.units_skipped, result.workers, human_bytes(result.worker_peak_rss), rate)
    for kind, path in result.outputs.items():
        click.echo(f"{kind}: {path}")
    if result.local_ray:
        _exit_without_waiting_for_ray()


def _exit_without_waiting_for_ray() -> None:
    """Exit now instead of in Ray's atexit shutdown, which stops the local Ray's processes one by one (~2 s).

    Only called once every output is committed and recorded in the ledger, the lock released and the
    actors killed; what is left is flushed here. The local Ray dies with this process either way: its
    gcs_server and raylet by the kernel (Ray starts them with PR_SET_PDEATHSIG), the agents and workers by
    rayconv's watchdog, which sees this process exit (rayconv.engine.watchdog).
    """
    import logging

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def _phases(seconds: dict[str, float]) -> str:
    from rayconv.engine.driver import PHASES

    names = [p for p in PHASES if p in seconds] + [p for p in seconds if p not in PHASES]
    return ", ".join(f"{p} {seconds[p]:.1f} s" for p in names)


@main.command()
@convert_options
@plan_options
def plan(simulate: bool, json_output: bool, throughput_mb_s: float, source_kind: str | None, **flags: Any) -> None:
    """Print the plan `convert` would execute with the same flags, and wall-time estimates for 8/16/32 workers."""
    setup_logging(flags["verbose"])
    from rayconv import forecast

    with _one_line_errors(flags["verbose"], signals=True):
        check_engine_flags(flags["num_workers"], flags["worker_memory_gb"], flags["num_kv_heads"],
                           flags["worker_start_timeout"])
        rates = {field: flags.pop(field) for field in RATE_FLAGS}
        for name, value in {"throughput_mb_s": throughput_mb_s, **rates}.items():
            if not 0 < value < float("inf"):
                raise ConversionError(f"--{name} must be a positive number, got {value}")
        if simulate and not flags["model_path"]:
            raise SpecError("--simulate needs --model_path (e.g. Llama3.1-405B-Instruct:bf16-mp16)")
        options = build_options(flags, for_plan=True, simulate=simulate)
        tunables.install(options.tunables)  # before the first read (convert's driver does the same)
        options = acquire(options)  # the input's files: resolved where they are, never staged for a plan
        env = forecast.Environment(worker_mb_s=throughput_mb_s, **rates,
                                   source=source_kind or source_kind_of(options, simulate),
                                   destination=destination(options))
        report = forecast.simulate(options, env) if simulate else forecast.report_for_files(options, env)
    if json_output:
        click.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console

    Console(width=None if sys.stdout.isatty() else 140).print(forecast.render(report))


@main.command()
@export_options
def export(**flags: Any) -> None:
    """Export a MaxText checkpoint (bf16 or a trainer's) to Hugging Face safetensors, config.json and index."""
    setup_logging(flags["verbose"])
    with _one_line_errors(flags["verbose"], signals=True):
        check_engine_flags(flags["num_workers"], flags["worker_memory_gb"], None, flags["worker_start_timeout"])
        from rayconv.exporting.driver import ExportOptions
        from rayconv.exporting.driver import export as run

        knobs = tunables.from_env(os.environ, storage_timeout_s=flags["storage_timeout_s"])
        result = run(ExportOptions(
            input=flags["input_directory"], output=flags["output_directory"], model_name=flags["model_name"],
            config=flags["config"], dtype=flags["dtype"], max_shard_size=flags["max_shard_size"],
            tokenizer_from=flags["tokenizer_from"], executor=flags["executor"], address=flags["address"],
            num_workers=flags["num_workers"], worker_memory_gb=flags["worker_memory_gb"],
            worker_start_timeout=flags["worker_start_timeout"], restart=flags["restart"],
            progress=not flags["no_progress"], tunables=knobs))
    LOG.info("Done in %.1f s: read %s, wrote %s, %d units (%d resumed), %d workers, worker peak RSS %s",
             result.seconds, human_bytes(result.bytes_read), human_bytes(result.bytes_written), result.units_run,
             result.units_skipped, result.workers, human_bytes(result.worker_peak_rss))
    click.echo(f"exported: {result.output}")
    if result.local_ray:
        _exit_without_waiting_for_ray()


@main.command()
@click.argument("source")
@click.argument("output")
@option("--model_name", default=None, help="llama-2, llama-3, llama-3.1 or llama-3.3.")
@option("--model_path", default=None, help="Meta model descriptor, e.g. Llama3.1-405B-Instruct:bf16-mp16.")
@option("--num_kv_heads", type=int, default=None)
@option("--maxtext_layout", type=click.Choice(list(LAYOUTS)), default=None,
         help="The tree layout OUTPUT must have (default: the one it has). " + MAXTEXT_LAYOUT_HELP)
@SOURCE_FORMAT
def verify(source, output, model_name, model_path, num_kv_heads, maxtext_layout, source_format) -> None:
    """Re-read SOURCE (Meta shards or HF safetensors) and prove every leaf under OUTPUT equals its mapping; or, for
    OUTPUT a `rayconv export` directory and SOURCE its MaxText checkpoint, every byte of its tensors."""
    setup_logging()
    from rayconv.exporting.verify import is_export, verify_export

    with _one_line_errors(signals=True):
        tunables.install(tunables.from_env(os.environ))
        exported = is_export(output)
        if exported:
            found = verify_export(source, output)
    if exported:
        click.echo(f"verified {found.tensors} tensors in {found.files} files ({found.pieces} pieces, "
                   f"{human_bytes(found.bytes_compared)}) in {output}: identical to the export of {source}")
        return
    from rayconv.job import ConvertOptions
    from rayconv.source.checkpoint import list_input
    from rayconv.verify import verify as run

    with _one_line_errors(signals=True):
        check_engine_flags(None, None, num_kv_heads)
        knobs = tunables.from_env(os.environ)  # the RAYCONV_* read sizes and lock settings, read once
        tunables.install(knobs)
        options = ConvertOptions(files=list_input(source), input_display=source, output=output,
                                 model_name=model_name, model_path=model_path, kv_heads=num_kv_heads,
                                 maxtext_layout=maxtext_layout, source_format=source_format,
                                 input_directory=source, tunables=knobs)
        report = run(options, output)
    click.echo(f"verified {report.arrays} arrays ({report.regions} regions, {human_bytes(report.bytes_compared)}) "
               f"in {', '.join(report.outputs)}: identical to the mapping of {source}")


@main.command()
@click.argument("preset_or_dims", default="demo")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@click.option("--n_shards", type=int, default=None)
@click.option("--n_layers", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--fp8", is_flag=True, default=False,
              help="Write Meta's FP8 SKU files (float8 FFN weights of layers 1..n-2 + fp8_scales_{r}.pt).")
def synthetic(preset_or_dims, out, n_shards, n_layers, seed, fp8) -> None:
    """Write a synthetic Meta-format checkpoint (PRESET: demo, 405b-2gb, demo-fp8)."""
    import dataclasses

    from rayconv import synthetic as syn

    if preset_or_dims not in syn.PRESETS:
        raise click.UsageError(f"unknown preset {preset_or_dims!r} (choose from {', '.join(syn.PRESETS)})")
    model = syn.PRESETS[preset_or_dims]
    changes = {k: v for k, v in {"n_shards": n_shards, "n_layers": n_layers, "seed": seed}.items() if v is not None}
    if fp8:
        changes["fp8"] = True
    model = dataclasses.replace(model, **changes)
    with _one_line_errors(signals=True):
        model.validate()
        syn.write_checkpoint(model, out)
    click.echo(f"wrote {human_bytes(model.nbytes())} synthetic {model.family} checkpoint to {out}")
