"""The JSON records a job keeps next to its output (``<out>/.rayconv/``): the convert ledger's and the export's.

One reader for both: every record is read with the bounded JSON reader, and a record that is not a JSON object
(a torn write, garbage, another tool's file) is one line naming it and how to start over, never a traceback.
"""

from __future__ import annotations

import json
from typing import Any

from rayconv import jsonio
from rayconv.errors import OutputError
from rayconv.storage import Location


def json_object(data: bytes) -> dict[str, Any] | None:
    """``data`` as a JSON object, or None when it is not one (torn write, garbage, another file, JSON nested too
    deeply or with a 5000-digit number: the bounded reader's refusals)."""
    try:
        return jsonio.loads_object(data)
    except jsonio.JSONError:
        return None


class Records:
    """Records under ``<out>/.rayconv/``; ``what`` names them in the one line a damaged record gets."""

    #: e.g. ("ledger", "output"): "… is damaged (not a rayconv ledger record); … to start this output over".
    kind: tuple[str, str] = ("ledger", "output")

    def __init__(self, out: Location) -> None:
        self.root = out.join(".rayconv")

    def _load(self, key: str) -> dict[str, Any] | None:
        data = self.root.read_bytes(key)
        if data is None:
            return None
        value = json_object(data)
        if value is None:
            record, job = self.kind
            raise OutputError(f"{self.root.join(key).uri} is damaged (not a rayconv {record} record); rerun with "
                              f"--restart to start this {job} over")
        return value

    def _write(self, key: str, value: dict[str, Any], indent: int | None = None) -> None:
        self.root.write_bytes(key, json.dumps(value, indent=indent).encode())
