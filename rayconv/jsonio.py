"""The one JSON reader for everything rayconv reads from disk, a bucket or a URL.

``json.loads`` on untrusted bytes can fail in ways that are not ``ValueError`` about the text: deeply nested
arrays exhaust the recursion limit (``RecursionError``, not a ``ValueError``), a 5000-digit integer trips CPython's int-conversion
limit, and ``Infinity`` / ``NaN`` parse into floats that then make a wait last forever. Every file rayconv
reads (safetensors headers, config.json, the index, params.json, the ledger's records, a lock, Orbax's
``_METADATA``) goes through :func:`loads`, which bounds size, nesting depth and number length and
refuses non-finite numbers, so a hostile file ends in one :class:`JSONError` line, never a traceback.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

#: Longer than any real integer or float literal (an int64 has 19 digits).
MAX_NUMBER_CHARS = 64
#: The largest JSON document read whole: safetensors caps its header at 100 MB.
MAX_BYTES = 100 * 1000 * 1000


_LONG_DIGITS = re.compile(r"[0-9]{%d}" % (MAX_NUMBER_CHARS + 1))


class JSONError(ValueError):
    """The bytes are not a JSON document rayconv accepts; the message says why (without the file's name)."""


def _number(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if len(text) > MAX_NUMBER_CHARS:
            raise JSONError(f"a number of {len(text)} characters (at most {MAX_NUMBER_CHARS})")
        value = kind(text)
        if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
            raise JSONError(f"the number {text[:20]} is not finite")
        return value
    return parse


def _no_constant(name: str) -> Any:
    raise JSONError(f"{name} is not a JSON number")


def loads(data: bytes | str, *, max_bytes: int = MAX_BYTES,
          object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """Parse ``data`` as strict JSON (UTF-8), or raise :class:`JSONError`.

    Refused: more than ``max_bytes``, nesting deeper than the interpreter's recursion limit, a number literal longer than
    :data:`MAX_NUMBER_CHARS` characters, ``NaN``/``Infinity`` and numbers that overflow to them, invalid UTF-8.
    ``object_pairs_hook`` is passed to :func:`json.loads` (e.g. to refuse duplicate keys).
    """
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise JSONError(f"{len(raw)} bytes of JSON (at most {max_bytes})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JSONError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        # int literals are checked only when a long digit run exists: the hook costs ~60% on a 6 MB header.
        ints = _number(int) if _LONG_DIGITS.search(text) else int
        return json.loads(text, parse_int=ints, parse_float=_number(float), parse_constant=_no_constant,
                          object_pairs_hook=object_pairs_hook)
    except RecursionError:  # the C scanner's nesting guard
        raise JSONError("JSON nested too deeply") from None
    except JSONError:
        raise
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise JSONError(f"not valid JSON ({exc})") from None


def loads_object(data: bytes | str, **kwargs: Any) -> dict[str, Any]:
    """:func:`loads`, and the document must be an object (``{...}``)."""
    value = loads(data, **kwargs)
    if not isinstance(value, dict):
        raise JSONError(f"a JSON {type(value).__name__}, not an object")
    return value
