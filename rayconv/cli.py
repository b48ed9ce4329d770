"""``rayconv``: the command line. Flag names follow the GKE tutorial's checkpoint-converter job.

Every user-caused failure ends as one line on stderr (``rayconv: error: …``) and exit status 1;
usage mistakes exit 2 (click's convention).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import click

from rayconv.errors import ConversionError, SpecError, user_error
from rayconv.progress import LOG, human_bytes, setup_logging

#: --inference_server → the MaxText tree layout it loads (rayconv.trees); --maxtext_layout overrides.
SERVER_LAYOUTS = {"jetstream-maxtext": "linen", "maxtext": "nnx"}
MAXTEXT_LAYOUT_HELP = ("MaxText tree layout: linen (MaxText 0.2.4 classic trees, JetStream-MaxText; default for "
                       "--inference_server jetstream-maxtext) or nnx (what MaxText >= 0.2.5 writes and loads; default "
                       "for --inference_server maxtext).")
DEFAULT_OUTPUT = "rayconv-output"


def _option(name: str, *args: Any, **kwargs: Any) -> Callable:
    """A flag spelled as in the tutorial (--model_name) that also accepts --model-name."""
    dashed = name.replace("_", "-")
    names = [name] if dashed == name else [name, dashed]
    return click.option(*names, name.lstrip("-"), *args, **kwargs)


def _http_timeout(ctx: click.Context, param: click.Parameter, value: float | None) -> None:
    """Publish --http_timeout_s as RAYCONV_HTTP_TIMEOUT_S: HttpFile reads it, and Ray workers get RAYCONV_*."""
    if value is None:
        return
    if not 0 < value < float("inf"):
        raise click.BadParameter("must be a positive number of seconds", ctx, param)
    os.environ["RAYCONV_HTTP_TIMEOUT_S"] = repr(value)


SOURCE_FORMAT = _option(
    "--source_format", type=click.Choice(["auto", "meta", "hf"]), default="auto", show_default=True,
    help="Input checkpoint format: meta (consolidated.NN.pth; at a Hub snapshot's root, its original/ folder), "
         "hf (config.json + *.safetensors), auto: whichever the directory holds.")


def input_options(fn: Callable) -> Callable:
    for decorator in reversed([
        _option("--model_name", default=None, help="llama-2, llama-3, llama-3.1 or llama-3.3."),
        _option("--model_path", default=None,
                help="Meta model descriptor, e.g. Llama3.1-405B-Instruct:bf16-mp16 (sets family, size, shard count)."),
        _option("--input_directory", default=None,
                help="Directory (local or gs://bucket/prefix) holding a Meta checkpoint (consolidated.NN.pth, "
                     "params.json) or a Hugging Face one (config.json, *.safetensors)."),
        _option("--meta_url", default=None, envvar="RAYCONV_META_URL", show_envvar=True,
                help="Meta's signed download URL (with the '*' placeholder). Prefer the environment variable "
                     "(e.g. from a Kubernetes Secret): a flag is echoed by Ray's job log."),
        _option("--download_directory", default=None,
                help="With --meta_url: stage the raw files here (local dir or gs://) before converting; "
                     "default with --bucket_name: gs://<bucket>/base/<model>. Without it, stream from the URL."),
        _option("--synthetic", default=None, metavar="PRESET",
                help="Use a built-in synthetic checkpoint (demo, 405b-2gb) as input."),
        _option("--num_kv_heads", type=int, default=None,
                help="Real kv-head count when params.json counts repeated heads and --model_path is not given."),
        _option("--http_timeout_s", type=float, default=None, envvar="RAYCONV_HTTP_TIMEOUT_S", show_envvar=True,
                callback=_http_timeout, expose_value=False,
                help="With --meta_url: seconds without a byte from the server before a read is retried "
                     "(each retry is logged with the file and byte range). Default 60."),
        SOURCE_FORMAT,
    ]):
        fn = decorator(fn)
    return fn


def engine_options(fn: Callable) -> Callable:
    for decorator in reversed([
        _option("--executor", type=click.Choice(["ray", "local"]), default="ray", show_default=True,
                help="ray: worker actors on local or existing Ray; local: this process, one unit at a time."),
        _option("--address", default=None, help="Ray cluster address (e.g. auto inside a Ray job). "
                                                 "Default: start Ray locally."),
        _option("--num_workers", type=int, default=None, help="Worker actors (default: CPUs / memory allow)."),
        _option("--worker_memory_gb", type=float, default=4.0, show_default=True,
                help="Memory each worker actor reserves; the planner cuts work to fit it."),
        _option("--worker_start_timeout", type=float, default=600.0, show_default=True,
                help="Seconds to wait for worker actors to be scheduled (e.g. while a cluster scales up); "
                     "then continue with those that started, or fail if none did."),
    ]):
        fn = decorator(fn)
    return fn


def _resolve_input(model_name, model_path, input_directory, meta_url, download_directory, synthetic,
                   bucket_name) -> tuple[dict[str, str], str, str | None, str | None, int | None]:
    """→ (files, display, model_name, model_path, kv_heads)"""
    from rayconv.source.checkpoint import list_input

    chosen = [x for x in (input_directory, meta_url, synthetic) if x]
    if len(chosen) > 1:
        raise click.UsageError("give only one of --input_directory, --meta_url, --synthetic")
    if not chosen:
        LOG.info("No input given: converting the built-in synthetic demo checkpoint (use --input_directory or "
                 "--meta_url for a real one)")
        synthetic = "demo"
    if synthetic:
        from rayconv import synthetic as syn

        if synthetic not in syn.PRESETS:
            raise click.UsageError(f"unknown --synthetic preset {synthetic!r} (choose from {', '.join(syn.PRESETS)})")
        model = syn.PRESETS[synthetic]
        cache = Path(os.environ.get("RAYCONV_CACHE", Path.home() / ".cache" / "rayconv")) / "synthetic"
        LOG.info("Preparing synthetic %s checkpoint (%s) in %s", synthetic, human_bytes(model.nbytes()), cache)
        directory = syn.ensure_checkpoint(model, cache)
        return (list_input(str(directory)), str(directory), model_name or model.family,
                model_path or model.descriptor, model.n_kv_heads)
    if meta_url:
        if not model_path:
            raise click.UsageError("--meta_url needs --model_path (e.g. Llama3.1-405B-Instruct:bf16-mp16)")
        from rayconv import download

        if download_directory is None and bucket_name:
            download_directory = f"gs://{bucket_name}/base/{model_path.replace(':', '-')}"
        if download_directory:
            from rayconv.staging import stage

            staged = stage(meta_url, model_path, download_directory)
            return list_input(str(staged)), str(staged), model_name, model_path, None
        files = download.resolve_input(meta_url, model_path)
        from rayconv.source.http import redact

        return files, f"{redact(meta_url)} ({model_path})", model_name, model_path, None
    return list_input(input_directory), input_directory, model_name, model_path, None


def _md5_policy(skip_md5: bool, meta_url: str | None, staged: str | None) -> bool:
    """Check md5 against checklist.chk for a directory input (unless --skip_md5); say why not otherwise."""
    if skip_md5:
        LOG.info("--skip_md5: the input is not checked against checklist.chk (each tensor's CRC-32 still is)")
        return False
    if meta_url and staged:
        return False  # stage() verified every file it wrote or kept, this run
    if meta_url:
        LOG.info("md5 of files streamed from --meta_url is not checked (it needs a second full download); each "
                 "tensor's CRC-32 is. Use --download_directory to stage the files md5-verified first")
        return False
    return True


def _kinds(quantize_type: str | None, quantize_weights: bool | None, skip_scanned: bool) -> tuple[
        tuple[str, ...], str | None]:
    from rayconv.quantize import QUANT_TYPES

    if quantize_weights is False and quantize_type:
        raise click.UsageError("--quantize_type given but --quantize_weights False")
    if quantize_weights and not quantize_type:
        raise click.UsageError("--quantize_weights True needs --quantize_type (int8, int8w, int4w)")
    if quantize_type and quantize_type not in QUANT_TYPES:
        raise SpecError(f"unsupported --quantize_type {quantize_type!r}: rayconv writes MaxText's AQT "
                        f"{', '.join(QUANT_TYPES)} checkpoints; fp8 and other types have no MaxText serving "
                        "checkpoint format to convert to")
    kinds = ("unscanned",) if skip_scanned else ("scanned", "unscanned")
    if quantize_type:
        kinds += ("int8",)
    return kinds, quantize_type


def _default_output(output_directory: str | None, bucket_name: str | None, model_path: str | None,
                    model_name: str | None) -> str:
    if output_directory:
        return output_directory
    if bucket_name:
        return f"gs://{bucket_name}/{(model_path or model_name or 'model').replace(':', '-')}"
    return DEFAULT_OUTPUT


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
    except interrupt.Interrupted as exc:
        _fail(str(exc))
    except Exception as exc:
        error = user_error(exc)
        if error is None:
            raise
        if verbose:
            traceback.print_exception(exc)
        _fail(error)


def _check_engine_flags(num_workers: int | None, worker_memory_gb: float | None, num_kv_heads: int | None,
                        worker_start_timeout: float | None = None) -> None:
    """Numbers the planner divides by or sizes memory with: refused up front, before Ray starts."""
    if num_workers is not None and num_workers < 1:
        raise ConversionError(f"--num_workers must be at least 1, got {num_workers}")
    if worker_memory_gb is not None:
        from rayconv.job import GiB, WORKER_BASE_BYTES

        floor = WORKER_BASE_BYTES / GiB  # a worker's fixed overhead: below it no piece fits at all
        if not (math.isfinite(worker_memory_gb) and floor < worker_memory_gb <= 1 << 20):
            raise ConversionError(f"--worker_memory_gb must be a number of GiB above {floor:.2f} (a worker's fixed "
                                  f"overhead), got {worker_memory_gb}")
    if num_kv_heads is not None and num_kv_heads < 1:
        raise ConversionError(f"--num_kv_heads must be at least 1, got {num_kv_heads}")
    if worker_start_timeout is not None and not (math.isfinite(worker_start_timeout) and worker_start_timeout > 0):
        raise ConversionError(f"--worker_start_timeout must be a positive number of seconds, got {worker_start_timeout}")


@click.group()
@click.version_option(package_name="rayconv")
def main() -> None:
    """Convert Meta Llama checkpoints to MaxText (bf16 scanned/unscanned, int8) with Ray."""


def output_options(fn: Callable) -> Callable:
    for decorator in reversed([
        _option("--bucket_name", default=None, help="GCS bucket; output defaults to gs://<bucket>/<model>."),
        _option("--output_directory", default=None, help=f"Output root (local or gs://). Default ./{DEFAULT_OUTPUT}."),
        _option("--inference_server", default="jetstream-maxtext", show_default=True,
                help="Target server: jetstream-maxtext (classic trees) or maxtext (MaxText >= 0.2.5, NNX trees)."),
        _option("--maxtext_layout", type=click.Choice(["linen", "nnx"]), default=None, help=MAXTEXT_LAYOUT_HELP),
        _option("--quantize_type", default=None, help="int8 (AQT weights + dynamic activations), int8w or int4w."),
        _option("--quantize_weights", type=click.BOOL, default=None, help="True to also write <out>/int8."),
        _option("--skip_scanned", is_flag=True, help="Only the unscanned (serving) bf16 checkpoint, not the scanned one."),
        _option("--restart", is_flag=True, help="Discard a partial or earlier output at the destination and start over."),
        _option("--compression", type=click.Choice(["none", "zstd"]), default="none", show_default=True,
                help="zarr codec for the arrays (weights compress little)."),
        _option("--skip_md5", is_flag=True,
                help="Do not check the input files against the checklist.chk next to them (one extra read of each "
                     "file; every tensor's CRC-32 is checked either way)."),
    ]):
        fn = decorator(fn)
    return fn


def convert_options(fn: Callable) -> Callable:
    """Every flag of ``convert``. ``plan`` takes them all too, so the same command line plans what it converts."""
    for decorator in reversed([
        input_options, output_options, engine_options,
        _option("--no_progress", is_flag=True, help="No progress bar / status lines."),
        click.option("--verbose", "-v", is_flag=True),
    ]):
        fn = decorator(fn)
    return fn


def _build_options(flags: dict[str, Any], *, for_plan: bool = False, simulate: bool = False) -> Any:
    """ConvertOptions from convert's flags. ``for_plan``: nothing is downloaded or checked (the shard indexes are
    read where the files are, from the signed URL if that is where they are); ``simulate``: no input at all."""
    from rayconv import trees
    from rayconv.job import ConvertOptions

    inference_server = flags["inference_server"]
    if inference_server not in SERVER_LAYOUTS:
        raise SpecError(f"unsupported --inference_server {inference_server!r} (supported: "
                        f"{', '.join(sorted(SERVER_LAYOUTS))})")
    maxtext_layout = flags["maxtext_layout"] or SERVER_LAYOUTS.get(inference_server, "linen")
    kinds, quantize_type = _kinds(flags["quantize_type"], flags["quantize_weights"], flags["skip_scanned"])
    trees.get(maxtext_layout).check_quantize_type(quantize_type)  # before any download or write
    meta_url, bucket_name = flags["meta_url"], flags["bucket_name"]
    download_directory = None if for_plan else flags["download_directory"]
    if simulate:
        files, display, model_name, model_path, kv = {}, flags["model_path"], flags["model_name"], flags["model_path"], None
    else:
        files, display, model_name, model_path, kv = _resolve_input(
            flags["model_name"], flags["model_path"], flags["input_directory"], meta_url, download_directory,
            flags["synthetic"], None if for_plan else bucket_name)
    verify_md5 = False if for_plan else _md5_policy(flags["skip_md5"], meta_url, download_directory or bucket_name)
    compression = flags["compression"]
    return ConvertOptions(
        files=files, input_display=display,
        output=_default_output(flags["output_directory"], bucket_name, model_path, model_name),
        model_name=model_name, model_path=model_path, kinds=kinds, quantize_type=quantize_type,
        worker_memory_gb=flags["worker_memory_gb"], executor=flags["executor"], address=flags["address"],
        num_workers=flags["num_workers"], worker_start_timeout=flags["worker_start_timeout"], restart=flags["restart"],
        compression=None if compression == "none" else compression, kv_heads=flags["num_kv_heads"] or kv,
        progress=not flags["no_progress"], maxtext_layout=maxtext_layout, verify_md5=verify_md5,
        source_format=flags["source_format"], input_directory=flags["input_directory"])


@main.command()
@convert_options
def convert(**flags: Any) -> None:
    """Convert a Meta (or Hugging Face) checkpoint into MaxText checkpoints under the output directory."""
    setup_logging(flags["verbose"])
    with _one_line_errors(flags["verbose"], signals=True):
        _check_engine_flags(flags["num_workers"], flags["worker_memory_gb"], flags["num_kv_heads"],
                            flags["worker_start_timeout"])
        from rayconv.engine.driver import convert as run

        result = run(_build_options(flags))
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


def plan_options(fn: Callable) -> Callable:
    """The flags only `plan` has: what to print, and the rates of the wall-time model (rayconv.engine.planning)."""
    from rayconv.engine.planning import Environment

    env = Environment()
    for decorator in reversed([
        _option("--simulate", is_flag=True,
                help="Plan from --model_path's published dimensions without reading any file (e.g. 405B)."),
        click.option("--json", "json_output", is_flag=True, help="Print the report as JSON (for machines)."),
        _option("--throughput_mb_s", type=float, default=env.worker_mb_s, show_default=True,
                help="Per-worker conversion rate, input MB/s (measured at the 405B's real widths; docs/benchmarks.md)."),
        click.option("--source", "source_kind", type=click.Choice(["gcs", "meta", "local"]), default=None,
                help="Where the shards are read from, for the estimate (default: from the input; gcs with --simulate)."),
        _option("--workers_per_vm", type=int, default=env.workers_per_vm, show_default=True,
                help="Workers sharing one VM's network."),
        _option("--vm_gbps", type=float, default=env.vm_gbps, show_default=True,
                help="Network bandwidth of one VM, each direction, Gbit/s."),
        _option("--gcs_read_gbps", type=float, default=env.gcs_read_gbps, show_default=True,
                help="Cloud Storage read bandwidth quota of the bucket's region, Gbit/s."),
        _option("--gcs_writes_per_s", type=float, default=env.gcs_writes_per_s, show_default=True,
                help="Object writes per second the output bucket accepts."),
        _option("--gcs_object_writes_per_s", type=float, default=env.gcs_object_writes_per_s, show_default=True,
                help="Writes per second Cloud Storage accepts to one object name (each commit rewrites a manifest)."),
        _option("--meta_mb_s", type=float, default=env.meta_mb_s, show_default=True,
                help="Rate of one connection to Meta's signed URL, MB/s."),
    ]):
        fn = decorator(fn)
    return fn


def _destination(options: Any, flags: dict[str, Any], simulate: bool) -> str:
    """gcs for gs:// outputs, and for a simulated plan given no output (the 405B goes to a bucket)."""
    if options.output.startswith("gs://"):
        return "gcs"
    return "gcs" if simulate and not flags["output_directory"] else "local"


def _source_kind(options: Any, simulate: bool) -> str:
    if simulate:
        return "gcs"
    uris = list(options.files.values())
    if any(u.startswith(("http://", "https://")) for u in uris):
        return "meta"
    return "gcs" if any(u.startswith("gs://") for u in uris) else "local"


@main.command()
@convert_options
@plan_options
def plan(simulate: bool, json_output: bool, throughput_mb_s: float, source_kind: str | None, workers_per_vm: int,
         vm_gbps: float, gcs_read_gbps: float, gcs_writes_per_s: float, gcs_object_writes_per_s: float,
         meta_mb_s: float, **flags: Any) -> None:
    """Print the plan `convert` would execute with the same flags, and wall-time estimates for 8/16/32 workers."""
    setup_logging(flags["verbose"])
    from rayconv.engine import planning

    with _one_line_errors(flags["verbose"], signals=True):
        _check_engine_flags(flags["num_workers"], flags["worker_memory_gb"], flags["num_kv_heads"],
                            flags["worker_start_timeout"])
        rates = {"--throughput_mb_s": throughput_mb_s, "--workers_per_vm": workers_per_vm, "--vm_gbps": vm_gbps,
                 "--gcs_read_gbps": gcs_read_gbps, "--gcs_writes_per_s": gcs_writes_per_s,
                 "--gcs_object_writes_per_s": gcs_object_writes_per_s, "--meta_mb_s": meta_mb_s}
        for name, value in rates.items():
            if not 0 < value < float("inf"):
                raise ConversionError(f"{name} must be a positive number, got {value}")
        if simulate and not flags["model_path"]:
            raise SpecError("--simulate needs --model_path (e.g. Llama3.1-405B-Instruct:bf16-mp16)")
        options = _build_options(flags, for_plan=True, simulate=simulate)
        env = planning.Environment(worker_mb_s=throughput_mb_s, workers_per_vm=workers_per_vm, vm_gbps=vm_gbps,
                                   gcs_read_gbps=gcs_read_gbps, gcs_writes_per_s=gcs_writes_per_s,
                                   gcs_object_writes_per_s=gcs_object_writes_per_s, meta_mb_s=meta_mb_s,
                                   source=source_kind or _source_kind(options, simulate),
                                   destination=_destination(options, flags, simulate))
        report = planning.simulate(options, env) if simulate else planning.report_for_files(options, env)
    if json_output:
        click.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console

    Console(width=None if sys.stdout.isatty() else 140).print(planning.render(report))


@main.command()
@click.argument("source")
@click.argument("output")
@_option("--model_name", default=None, help="llama-2, llama-3, llama-3.1 or llama-3.3.")
@_option("--model_path", default=None, help="Meta model descriptor, e.g. Llama3.1-405B-Instruct:bf16-mp16.")
@_option("--num_kv_heads", type=int, default=None)
@_option("--maxtext_layout", type=click.Choice(["linen", "nnx"]), default=None,
         help="The tree layout OUTPUT must have (default: the one it has). " + MAXTEXT_LAYOUT_HELP)
@SOURCE_FORMAT
def verify(source, output, model_name, model_path, num_kv_heads, maxtext_layout, source_format) -> None:
    """Re-read SOURCE (Meta shards or HF safetensors) and prove every leaf under OUTPUT equals its mapping."""
    setup_logging()
    from rayconv.job import ConvertOptions
    from rayconv.source.checkpoint import list_input
    from rayconv.verify import verify as run

    with _one_line_errors(signals=True):
        _check_engine_flags(None, None, num_kv_heads)
        options = ConvertOptions(files=list_input(source), input_display=source, output=output,
                                 model_name=model_name, model_path=model_path, kv_heads=num_kv_heads,
                                 maxtext_layout=maxtext_layout, source_format=source_format,
                                 input_directory=source)
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
              help="Write Meta's FP8 SKU layout (float8 FFN weights of layers 1..n-2 + fp8_scales_{r}.pt).")
def synthetic(preset_or_dims, out, n_shards, n_layers, seed, fp8) -> None:
    """Write a synthetic Meta-format checkpoint (PRESET: demo, 405b-2gb)."""
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


if __name__ == "__main__":
    main()
