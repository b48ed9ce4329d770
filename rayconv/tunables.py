"""The knobs of a run that are not what to convert: timeouts, read sizes, concurrency, the lock's patience.

One frozen value, :class:`Tunables`, made once at the command line's entry (flags, and the documented
``RAYCONV_*`` operator overrides read there from the environment, :func:`from_env`), carried in
``ConvertOptions.tunables`` to the driver and in ``JobContext.tunables`` to every Ray worker and the committer.
Each process *installs* the value it was given, once, before its first read or write (:func:`install`: the
driver at the start of the job, a worker actor when it is constructed); the byte sources, the GCS client
wrapper and the output lock ask :func:`current`. Nothing reads these from ``os.environ`` deep in the package
or at import time: an environment variable set after import, or one a remote Ray worker never saw, can no
longer make two processes of one run disagree.

A leaf module: imports nothing of rayconv's but :mod:`rayconv.errors`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

from rayconv.errors import ConversionError


@dataclasses.dataclass(frozen=True)
class Tunables:
    """Defaults are the values measured or reasoned about below; every field is positive."""

    #: Seconds without a byte from an HTTP(S) server before a read is retried and logged (``--http_timeout_s``).
    #: A minute rides out a CDN edge's pause without leaving a dead connection unnoticed for long.
    http_timeout_s: float = 60.0
    #: Sub-request size of a large HTTP read, MiB: each is one ranged GET streamed into the caller's buffer.
    #: 32 MiB keeps the per-request overhead small beside a ~60 MB/s connection, and a retry cheap.
    http_chunk_mb: int = 32
    #: Parallel ranged GETs per process (all HttpFiles and threads share them): one connection to CloudFront
    #: carries tens of MB/s, 8 fill a worker's share of a VM's network (docs/benchmarks.md).
    http_concurrency: int = 8
    #: Consecutive failed attempts (no byte received) before an HTTP sub-request gives up, with backoff
    #: (0.2 s doubling, capped at 30 s): about a minute of trying before the run stops.
    http_retries: int = 8
    #: Seconds one Cloud Storage call (retries included) may take before the run stops with one line naming the
    #: bucket (``--storage_timeout_s``); without a bound no network or no credentials is minutes of silence.
    storage_timeout_s: float = 60.0
    #: Ranged-read size of a large gs:// read, MiB.
    gcs_chunk_mb: int = 16
    #: gs:// sub-reads in flight per ``readinto`` call.
    gcs_concurrency: int = 8
    #: gs:// sub-reads in flight per process across all threads (each holds about two chunks while in flight),
    #: so many reading threads cannot multiply a worker's memory.
    gcs_process_inflight: int = 16
    #: A lock heartbeat older than this marks the output lock stale, seconds: long enough to ride out a stalled
    #: storage request, short enough that a crashed run on another host blocks a retry briefly.
    lock_stale_s: float = 120.0
    #: Check a 405B download's shard sizes against Meta's published ones before fetching anything; off
    #: (``RAYCONV_META_SHARD_SIZES=ignore``) for a re-published release or synthetic shards under a real
    #: descriptor, whose sizes then come from the server's Content-Range.
    meta_shard_sizes: bool = True

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "bool":
                continue
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)
                                               and value >= _least(field.name)):
                raise ConversionError(f"{field.name} must be a number of at least {_least(field.name)}, got {value!r}")


def _least(field: str) -> float:
    """The smallest value a field takes: 0 retries is "try once"; anything else must be positive."""
    return 0 if field == "http_retries" else 1e-9 if field.endswith("_s") else 1


#: The operator overrides (environment variable → field), read once by the command line (:func:`from_env`).
#: ``--http_timeout_s`` (``RAYCONV_HTTP_TIMEOUT_S``) and ``--storage_timeout_s`` are flags (rayconv.cli.flags).
ENV = {
    "RAYCONV_HTTP_CHUNK_MB": "http_chunk_mb",
    "RAYCONV_HTTP_CONCURRENCY": "http_concurrency",
    "RAYCONV_HTTP_RETRIES": "http_retries",
    "RAYCONV_GCS_CHUNK_MB": "gcs_chunk_mb",
    "RAYCONV_GCS_CONCURRENCY": "gcs_concurrency",
    "RAYCONV_GCS_PROCESS_INFLIGHT": "gcs_process_inflight",
    "RAYCONV_LOCK_STALE_SECONDS": "lock_stale_s",
    "RAYCONV_META_SHARD_SIZES": "meta_shard_sizes",
}


def _parse(variable: str, field: str, raw: str) -> object:
    kind = next(f.type for f in dataclasses.fields(Tunables) if f.name == field)
    if kind == "bool":
        if raw.lower() not in ("ignore", "check"):
            raise ConversionError(f"{variable}={raw!r}: use ignore (trust the server's sizes) or check")
        return raw.lower() == "check"
    try:
        value = int(raw) if kind == "int" else float(raw)
    except ValueError:
        value = None
    if value is None or not (_least(field) <= value < float("inf")):
        what = f"a whole number of at least {_least(field)}" if kind == "int" else "a positive number of seconds"
        raise ConversionError(f"{variable}={raw!r} is not {what}")
    return value


def from_env(environ: Mapping[str, str], **given: object) -> Tunables:
    """The defaults, overridden by the set ``RAYCONV_*`` variables of :data:`ENV` and then by ``given`` (flags;
    a None value means not given). A bad value is one line naming the variable (:class:`ConversionError`)."""
    values = {field: _parse(variable, field, environ[variable]) for variable, field in ENV.items()
              if environ.get(variable, "").strip()}
    values.update({field: value for field, value in given.items() if value is not None})
    return Tunables(**values)


_current = [Tunables()]


def install(tunables: Tunables) -> None:
    """Make ``tunables`` this process's (the driver at the start of a job, a worker actor at construction)."""
    _current[0] = tunables


def current() -> Tunables:
    """This process's tunables: what :func:`install` was last given (a forked child inherits its parent's)."""
    return _current[0]
