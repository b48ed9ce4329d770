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
