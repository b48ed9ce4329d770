"""The command line's flags, as click option groups. Names follow the GKE tutorial's checkpoint-converter job.

``plan`` takes every flag ``convert`` takes (``convert_options``), so a user pastes the same command line to see
what it will do; what the flags mean for a job is :mod:`rayconv.cli.options`' concern.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import click

from rayconv.source.hf import SOURCE_FORMATS
from rayconv.trees import LAYOUTS

DEFAULT_OUTPUT = "rayconv-output"
MAXTEXT_LAYOUT_HELP = ("MaxText tree layout: linen (MaxText 0.2.4 classic trees, JetStream-MaxText; default for "
                       "--inference_server jetstream-maxtext) or nnx (what MaxText >= 0.2.5 writes and loads; default "
                       "for --inference_server maxtext) or to_maxtext (what MaxText 0.2.5's to_maxtext.py "
                       "writes; default for Qwen3).")


def option(name: str, *args: Any, **kwargs: Any) -> Callable:
    """A flag spelled as in the tutorial (--model_name) that also accepts --model-name."""
    dashed = name.replace("_", "-")
    names = [name] if dashed == name else [name, dashed]
    return click.option(*names, name.lstrip("-"), *args, **kwargs)


def _seconds(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """A timeout flag: a positive number of seconds (a usage error otherwise), or None (not given). What it bounds
    travels in the job's tunables (rayconv.tunables: ``--http_timeout_s`` → ``http_timeout_s``,
    ``--storage_timeout_s`` → ``storage_timeout_s``), to the driver and every Ray worker."""
    if value is not None and not 0 < value < float("inf"):
        raise click.BadParameter("must be a positive number of seconds", ctx, param)
    return value


SOURCE_FORMAT = option(
    "--source_format", type=click.Choice(SOURCE_FORMATS), default="auto", show_default=True,
    help="Input checkpoint format: meta (consolidated.NN.pth; at a Hub snapshot's root, its original/ folder), "
         "hf (config.json + *.safetensors), auto: whichever the directory holds.")


def _stack(fn: Callable, decorators: list[Callable]) -> Callable:
    """Apply option decorators so they show in ``--help`` in list order (click lists the innermost last)."""
    for decorator in reversed(decorators):
        fn = decorator(fn)
    return fn


def input_options(fn: Callable) -> Callable:
    return _stack(fn, [
        option("--model_name", default=None, help="llama-2, llama-3, llama-3.1 or llama-3.3."),
        option("--model_path", default=None,
               help="Meta model descriptor, e.g. Llama3.1-405B-Instruct:bf16-mp16 (sets family, size, shard count)."),
        option("--input_directory", default=None,
               help="Directory (local or gs://bucket/prefix) holding a Meta checkpoint (consolidated.NN.pth, "
                    "params.json) or a Hugging Face one (config.json, *.safetensors)."),
        option("--meta_url", default=None, envvar="RAYCONV_META_URL", show_envvar=True,
               help="Meta's signed download URL (with the '*' placeholder). Prefer the environment variable "
                    "(e.g. from a Kubernetes Secret): a flag is echoed by Ray's job log."),
        option("--download_directory", default=None,
               help="With --meta_url: stage the raw files here (local dir or gs://) before converting; "
                    "default with --bucket_name: gs://<bucket>/base/<model>. Without it, stream from the URL."),
        option("--synthetic", default=None, metavar="PRESET",
               help="Use a built-in synthetic checkpoint (demo, 405b-2gb, demo-fp8) as input."),
        option("--num_kv_heads", type=int, default=None,
               help="Real kv-head count when params.json counts repeated heads and --model_path is not given."),
        option("--http_timeout_s", type=float, default=None, envvar="RAYCONV_HTTP_TIMEOUT_S", show_envvar=True,
               callback=_seconds,
               help="With --meta_url: seconds without a byte from the server before a read is retried "
                    "(each retry is logged with the file and byte range). Default 60."),
        SOURCE_FORMAT,
    ])


def engine_options(fn: Callable) -> Callable:
    return _stack(fn, [
        option("--executor", type=click.Choice(["ray", "local"]), default="ray", show_default=True,
               help="ray: worker actors on local or existing Ray; local: this process, one unit at a time."),
        option("--address", default=None, help="Ray cluster address (e.g. auto inside a Ray job). "
                                                "Default: start Ray locally."),
        option("--num_workers", type=int, default=None, help="Worker actors (default: CPUs / memory allow)."),
        option("--worker_memory_gb", type=float, default=1.0, show_default=True,
               help="Memory each worker actor reserves; the planner cuts work to fit it."),
        option("--storage_timeout_s", type=float, default=None, callback=_seconds,
               help="Seconds one Cloud Storage request may take (retries included) before the run stops with one "
                    "line naming the bucket (no network, no credentials, an endpoint that does not answer). "
                    "Default 60."),
        option("--worker_start_timeout", type=float, default=600.0, show_default=True,
               help="Seconds to wait for worker actors to be scheduled (e.g. while a cluster scales up); "
                    "then continue with those that started, or fail if none did."),
    ])


def output_options(fn: Callable) -> Callable:
    return _stack(fn, [
        option("--bucket_name", default=None, help="GCS bucket; output defaults to gs://<bucket>/<model>."),
        option("--output_directory", default=None, help=f"Output root (local or gs://). Default ./{DEFAULT_OUTPUT}."),
        option("--inference_server", default=None,
               help="Target server: jetstream-maxtext (classic trees; the default for Llama) or maxtext (MaxText >= "
                    "0.2.5, NNX trees). Not given: the family's default tree (Qwen3: to_maxtext.py's)."),
        option("--maxtext_layout", type=click.Choice(list(LAYOUTS)), default=None, help=MAXTEXT_LAYOUT_HELP),
        option("--quantize_type", default=None, help="int8 (AQT weights + dynamic activations), int8w or int4w."),
        option("--quantize_weights", type=click.BOOL, default=None, help="True to also write <out>/int8."),
        option("--skip_scanned", is_flag=True, help="Only the unscanned (serving) bf16 checkpoint, not the scanned one."),
        option("--restart", is_flag=True, help="Discard a partial or earlier output at the destination and start over."),
        option("--compression", type=click.Choice(["none", "zstd"]), default="none", show_default=True,
               help="zarr codec for the arrays (weights compress little)."),
        option("--skip_md5", is_flag=True,
               help="Do not check the input files against the checklist.chk next to them (one extra read of each "
                    "file; every tensor's CRC-32 is checked either way)."),
    ])


def convert_options(fn: Callable) -> Callable:
    """Every flag of ``convert``. ``plan`` takes them all too, so the same command line plans what it converts."""
    return _stack(fn, [
        input_options, output_options, engine_options,
        option("--no_progress", is_flag=True, help="No progress bar / status lines."),
        click.option("--verbose", "-v", is_flag=True),
    ])


#: The wall-time model's rates a user may override: rayconv.forecast.Environment field → help text.
RATE_FLAGS = {
    "workers_per_vm": "Workers sharing one VM's network.",
    "vm_gbps": "Network bandwidth of one VM, each direction, Gbit/s.",
    "gcs_read_gbps": "Cloud Storage read bandwidth quota of the bucket's region, Gbit/s.",
    "gcs_writes_per_s": "Object writes per second the output bucket accepts.",
    "gcs_object_writes_per_s": "Writes per second Cloud Storage accepts to one object name (each commit rewrites a "
                               "manifest).",
    "meta_mb_s": "Rate of one connection to Meta's signed URL, MB/s.",
}


def plan_options(fn: Callable) -> Callable:
    """The flags only `plan` has: what to print, and the rates of the wall-time model (rayconv.forecast)."""
    from rayconv.forecast import Environment

    env = Environment()
    return _stack(fn, [
        option("--simulate", is_flag=True,
               help="Plan from --model_path's published dimensions without reading any file (e.g. 405B)."),
        click.option("--json", "json_output", is_flag=True, help="Print the report as JSON (for machines)."),
        option("--throughput_mb_s", type=float, default=env.worker_mb_s, show_default=True,
               help="Per-worker conversion rate, input MB/s (measured at the 405B's real widths; docs/benchmarks.md)."),
        click.option("--source", "source_kind", type=click.Choice(["gcs", "meta", "local"]), default=None,
                help="Where the shards are read from, for the estimate (default: from the input; gcs with --simulate)."),
        *(option(f"--{field}", type=type(getattr(env, field)), default=getattr(env, field), show_default=True,
                 help=text) for field, text in RATE_FLAGS.items()),
    ])


_SIZE = re.compile(r"([0-9]+(?:\.[0-9]*)?)\s*([KMG]I?B|B)?", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """A byte count: an integer, or with a unit as transformers spells them (``3GiB``, ``500MB``, ``200KB``)."""
    if value is None:
        return None
    match = _SIZE.fullmatch(value.strip())
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()]) if match else 0
    if size <= 0:
        raise click.BadParameter(f"{value!r} is not a positive size (e.g. 3GiB, 500MB, 1000000)", ctx, param)
    return size


def export_options(fn: Callable) -> Callable:
    """``rayconv export``: a MaxText checkpoint in, a Hugging Face directory out, with convert's engine flags."""
    return _stack(engine_options(fn), [
        option("--input_directory", required=True,
               help="The MaxText checkpoint: its items directory (…/0/items, what load_parameters_path takes) or the "
                    "step directory holding it; local or gs://. Scanned or unscanned, linen or nnx trees, bf16 or a "
                    "trainer's float32 checkpoint (its params are exported, not the optimizer state)."),
        option("--output_directory", required=True, help="Where the Hugging Face files go (local or gs://)."),
        option("--model_name", default=None,
               help="The model as MaxText names it (llama3.1-8b, llama3.1-70b, llama3.1-405b, llama3-8b, llama2-7b, …)."),
        option("--config", default=None, help="Or the model's Hugging Face config.json (local or gs://)."),
        option("--dtype", type=click.Choice(["bfloat16", "float32"]), default="bfloat16", show_default=True,
               help="Tensor dtype (MaxText's weight_dtype): float32 restores and transforms in float32."),
        option("--max_shard_size", default="3GiB", show_default=True, callback=_size,
               help="Largest safetensors file (data bytes), as MaxText's exporter splits: 3GiB, 500MB, bytes."),
        option("--tokenizer_from", default=None,
               help="Copy the tokenizer files (tokenizer.json, tokenizer_config.json, …) from this directory."),
        option("--restart", is_flag=True, help="Discard a partial or earlier export at the destination and start over."),
        option("--no_progress", is_flag=True, help="No progress bar / status lines."),
        click.option("--verbose", "-v", is_flag=True),
    ])
