"""User-facing errors.

Every problem a user can cause (bad input, bad flags, unwritable output) is raised as a
:class:`ConversionError` whose message is one line that names the offending thing. The CLI prints
exactly that line and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys


class ConversionError(Exception):
    """A one-line, user-actionable failure."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class SourceError(ConversionError):
    """The input checkpoint is missing, truncated, corrupt or inconsistent."""


class SpecError(ConversionError):
    """Model name, descriptor or params.json cannot be mapped to a MaxText model."""


class OutputError(ConversionError):
    """The output location cannot be written or is in an unexpected state."""


def one_line_reason(exc: BaseException, limit: int = 300) -> str:
    """The informative part of a library error (OS, tensorstore, google-api-core, urllib3), on one line.

    tensorstore nests causes (``RESOURCE_EXHAUSTED: Error writing "k" in …: Failed writing: …: No space
    left on device [os_error_code='28']``): keep the innermost cause and the status code. Other
    libraries put details (response bodies, tracebacks of causes) on later lines: keep the first.
    """
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = " ".join(lines[0].split()) if lines else type(exc).__name__
    text = text.split(" [", 1)[0]
    status, _, rest = text.partition(": ")
    if status.isupper() and status.replace("_", "").isalpha() and rest:
        return f"{rest.rsplit(': ', 1)[-1]} ({status})"[:limit]
    return text[:limit]
#: OS errors that come from the user's environment (disks, permissions, paths, network), not from a bug.
_ENVIRONMENT_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
    errno.EEXIST, errno.ENOTEMPTY, errno.EIO, errno.ENAMETOOLONG, errno.EMFILE, errno.ENFILE, errno.EXDEV,
    errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT,
})


def _ray_cause(exc: BaseException) -> BaseException | None:
    """The exception a Ray task or actor raised remotely, if ``exc`` is Ray's wrapper for one.

    Ray re-raises a remote failure as a class deriving from both ``RayTaskError`` and the cause's class,
    whose message is the remote traceback: it must be unwrapped before its message is shown.
    """
    ray_exceptions = sys.modules.get("ray.exceptions")  # no Ray imported: no Ray wrapper to unwrap
    if ray_exceptions is not None and isinstance(exc, ray_exceptions.RayTaskError):
        return getattr(exc, "cause", None)
    return None


#: Ray failures of the infrastructure (a worker or node died, memory or disk ran out), not of rayconv's code.
_RAY_ENVIRONMENT_ERRORS = ("OutOfMemoryError", "ActorDiedError", "NodeDiedError", "WorkerCrashedError",
                           "LocalRayletDiedError", "ObjectStoreFullError", "OutOfDiskError", "RuntimeEnvSetupError",
                           "ActorUnschedulableError", "TaskUnschedulableError")


def _ray_environment_error(exc: BaseException) -> ConversionError | None:
    ray_exceptions = sys.modules.get("ray.exceptions")
    if ray_exceptions is None:
        return None
    kinds = tuple(getattr(ray_exceptions, name) for name in _RAY_ENVIRONMENT_ERRORS if hasattr(ray_exceptions, name))
    if not isinstance(exc, kinds):
        return None
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    first = first if len(first) <= 300 else first[:297] + "..."
    return ConversionError(f"Ray {type(exc).__name__}: {first} (finished units are kept: rerun the same command "
                           "to resume; if a worker ran out of memory, raise --worker_memory_gb)")


def user_error(exc: BaseException) -> ConversionError | None:
    """The one-line, user-facing error that ``exc`` is or wraps, or None when ``exc`` is a bug.

    The single place that unwraps: Ray task wrappers (from ``ray.get`` in either executor path), Ray's own
    infrastructure failures (a worker that died for good, out of memory), and OS errors from storage (a full
    disk, a read-only or missing path) that escaped as themselves.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = _ray_cause(exc)
        if cause is not None:
            exc = cause
            continue
        if isinstance(exc, ConversionError):
            return exc
        ray_error = _ray_environment_error(exc)
        if ray_error is not None:
            return ray_error
        if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:
            where = f": {exc.filename}" if exc.filename else ""
            return ConversionError(f"{exc.strerror or exc}{where}")
        return None
    return None
