"""From the command line's flags to a job (:class:`rayconv.job.ConvertOptions`): which input, which outputs, where.

Kept apart from the click definitions (:mod:`rayconv.cli.flags`) and the commands (:mod:`rayconv.cli`) so that
the rules (one input, the output default, quantization flags, the md5 policy, numbers refused before Ray starts)
have one home that ``convert``, ``plan`` and ``verify`` share.
"""

from __future__ import annotations

import math
import os
from typing import Any

import click

from rayconv import tunables
from rayconv.acquire import Acquisition
from rayconv import targets
from rayconv.cli.flags import DEFAULT_OUTPUT
from rayconv.errors import ConversionError, SpecError
from rayconv.progress import LOG

#: ``rayconv plan --simulate`` without an output plans for ``gs://BUCKET/<model>``: the 405B goes to a bucket, and
#: the plan (pieces, commit batches, worker memory) and the estimate must agree on where (rayconv.job).
SIMULATED_BUCKET = "BUCKET"

#: --inference_server → the MaxText tree layout it loads (rayconv.trees); --maxtext_layout overrides.
SERVER_LAYOUTS = {"jetstream-maxtext": "linen", "maxtext": "nnx"}


def choose_input(model_name, model_path, input_directory, meta_url, download_directory, synthetic,
                  bucket_name) -> tuple[Acquisition, str, str | None, str | None, int | None]:
    """→ (what to acquire, how to name the input until it is, model_name, model_path, kv_heads). Nothing is read,
    fetched or written here: the job's first phase does that (rayconv.acquire)."""
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
        # Where generated checkpoints are kept between runs: read here, once, like every other RAYCONV_* setting.
        what = Acquisition(synthetic=synthetic, cache=os.environ.get("RAYCONV_CACHE") or None)
        return (what, f"synthetic {synthetic}", model_name or model.family, model_path or model.descriptor,
                model.n_kv_heads)
    if meta_url:
        if not model_path:
            raise click.UsageError("--meta_url needs --model_path (e.g. Llama3.1-405B-Instruct:bf16-mp16)")
        from rayconv.source.http import redact

        if download_directory is None and bucket_name:
            download_directory = f"gs://{bucket_name}/base/{model_path.replace(':', '-')}"
        what = Acquisition(meta_url=meta_url, model_path=model_path, download_directory=download_directory)
        return what, f"{redact(meta_url)} ({model_path})", model_name, model_path, None
    return Acquisition(input_directory=input_directory), input_directory, model_name, model_path, None


def md5_policy(skip_md5: bool, meta_url: str | None, staged: str | None) -> bool:
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


def output_kinds(quantize_type: str | None, quantize_weights: bool | None, skip_scanned: bool) -> tuple[
        tuple[Any, ...], str | None]:
    from rayconv.quantize import QUANT_TYPES

    if quantize_weights is False and quantize_type:
        raise click.UsageError("--quantize_type given but --quantize_weights False")
    if quantize_weights and not quantize_type:
        raise click.UsageError("--quantize_weights True needs --quantize_type (int8, int8w, int4w)")
    if quantize_type and quantize_type not in QUANT_TYPES:
        raise SpecError(f"unsupported --quantize_type {quantize_type!r}: rayconv writes MaxText's AQT "
                        f"{', '.join(QUANT_TYPES)} checkpoints; fp8 and other types have no MaxText serving "
                        "checkpoint format to convert to")
    return targets.get().kinds_for(quantize_type, skip_scanned), quantize_type


def default_output(output_directory: str | None, bucket_name: str | None, model_path: str | None,
                   model_name: str | None) -> str:
    if output_directory:
        return output_directory
    if bucket_name:
        return f"gs://{bucket_name}/{(model_path or model_name or 'model').replace(':', '-')}"
    return DEFAULT_OUTPUT


#: Flags naming a place: an empty value would silently mean "not given" (./rayconv-output, the demo checkpoint).
PLACE_FLAGS = ("input_directory", "output_directory", "download_directory", "bucket_name")


def check_flag_combinations(flags: dict[str, Any]) -> None:
    """Flags that would otherwise be ignored without a word: refused in one line, before anything is read."""
    for name in PLACE_FLAGS:
        value = flags.get(name)
        if value is not None and not value.strip():
            what = "a bucket name" if name == "bucket_name" else "a local path or gs:// URI"
            raise ConversionError(f"--{name} is empty: give {what}, or leave the flag out")
    if flags.get("address") and flags.get("executor") == "local":
        raise ConversionError("--address connects to a Ray cluster, which --executor local does not use: drop "
                              "--address, or use --executor ray")


def check_engine_flags(num_workers: int | None, worker_memory_gb: float | None, num_kv_heads: int | None,
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


def build_options(flags: dict[str, Any], *, for_plan: bool = False, simulate: bool = False) -> Any:
    """ConvertOptions from convert's flags, reading nothing but the environment's RAYCONV_* settings: the input is
    acquired by the job (``options.acquire``, rayconv.acquire). ``for_plan``: nothing will be downloaded or checked
    (the shard indexes are read where the files are, from the signed URL if that is where they are);
    ``simulate``: no input at all."""
    from rayconv import trees
    from rayconv.job import ConvertOptions

    check_flag_combinations(flags)
    inference_server = flags["inference_server"]
    if inference_server is not None and inference_server not in SERVER_LAYOUTS:
        raise SpecError(f"unsupported --inference_server {inference_server!r} (supported: "
                        f"{', '.join(sorted(SERVER_LAYOUTS))})")
    # Neither flag: None, the plan takes the family's default layout (Llama: linen; Qwen3: to_maxtext's).
    maxtext_layout = flags["maxtext_layout"] or SERVER_LAYOUTS.get(inference_server)
    kinds, quantize_type = output_kinds(flags["quantize_type"], flags["quantize_weights"], flags["skip_scanned"])
    trees.get(maxtext_layout).check_quantize_type(quantize_type)  # before any download or write
    meta_url, bucket_name = flags["meta_url"], flags["bucket_name"]
    download_directory = None if for_plan else flags["download_directory"]
    if simulate:
        what, display, kv = None, flags["model_path"], None
        model_name, model_path = flags["model_name"], flags["model_path"]
    else:
        what, display, model_name, model_path, kv = choose_input(
            flags["model_name"], flags["model_path"], flags["input_directory"], meta_url, download_directory,
            flags["synthetic"], None if for_plan else bucket_name)
    verify_md5 = False if for_plan else md5_policy(flags["skip_md5"], meta_url, download_directory or bucket_name)
    compression = flags["compression"]
    # Timeouts and read sizes: the flags, over the RAYCONV_* overrides, read here once (rayconv.tunables.ENV).
    knobs = tunables.from_env(os.environ, http_timeout_s=flags["http_timeout_s"],
                              storage_timeout_s=flags["storage_timeout_s"])
    return ConvertOptions(
        files={}, acquire=what, tunables=knobs, input_display=display,
        output=default_output(flags["output_directory"], bucket_name or (SIMULATED_BUCKET if simulate else None),
                              model_path, model_name),
        model_name=model_name, model_path=model_path, kinds=kinds, quantize_type=quantize_type,
        worker_memory_gb=flags["worker_memory_gb"], executor=flags["executor"], address=flags["address"],
        num_workers=flags["num_workers"], worker_start_timeout=flags["worker_start_timeout"], restart=flags["restart"],
        compression=None if compression == "none" else compression, kv_heads=flags["num_kv_heads"] or kv,
        progress=not flags["no_progress"], maxtext_layout=maxtext_layout, verify_md5=verify_md5,
        source_format=flags["source_format"], input_directory=flags["input_directory"])


def destination(options: Any) -> str:
    """Where the estimate writes: gcs for gs:// outputs (a simulated plan given none writes to SIMULATED_BUCKET)."""
    from rayconv.job import on_gcs

    return "gcs" if on_gcs(options.output) else "local"


def source_kind_of(options: Any, simulate: bool) -> str:
    if simulate:
        return "gcs"
    uris = list(options.files.values())
    if any(u.startswith(("http://", "https://")) for u in uris):
        return "meta"
    return "gcs" if any(u.startswith("gs://") for u in uris) else "local"
