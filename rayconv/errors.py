"""User-facing errors.

Every problem a user can cause (bad input, bad flags, unwritable output) is raised as a
:class:`ConversionError` whose message is one line that names the offending thing. The CLI prints
exactly that line and exits non-zero; anything else is a bug and keeps its traceback.
"""


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
