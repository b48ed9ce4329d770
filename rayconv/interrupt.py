"""SIGTERM / SIGINT: stop cleanly with one line instead of Ray's C++ stack dump.

The first signal raises :class:`Interrupted` in the main thread, so the conversion unwinds
through its ``finally`` blocks (the executor kills the actors it started, a local Ray is shut down at exit)
and the CLI prints ``rayconv: error: interrupted (SIGTERM); …``. Receipts already in the ledger stay, so
rerunning the same command resumes. A second signal while unwinding exits at once.

Ray's core worker installs its own failure handler for SIGTERM when it connects (it prints a C++ stack
dump), so :func:`install` is called again right after ``ray.init``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal. A KeyboardInterrupt, so no ``except Exception`` on the way swallows it."""


SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[str] = []


def message(name: str) -> str:
    return f"interrupted ({name}); finished work is kept: rerun the same command to resume"


def _handler(signum: int, frame: object) -> None:
    name = signal.Signals(signum).name
    if _received:  # already unwinding: the user insists
        sys.stderr.write(f"rayconv: error: {message(name)}\n")
        sys.stderr.flush()
        os._exit(1)
    _received.append(name)
    raise Interrupted(message(name))


def install() -> None:
    """Route SIGTERM and SIGINT to :func:`_handler` (only possible from the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        signal.signal(sig, _handler)
