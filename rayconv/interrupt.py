"""SIGTERM / SIGINT: stop cleanly with one line instead of Ray's C++ stack dump.

The first signal raises :class:`Interrupted` in the main thread, so the conversion unwinds
through its ``finally`` blocks (the executor kills the actors it started, a local Ray is shut down at exit)
and the CLI prints ``rayconv: error: interrupted (SIGTERM); …``. Receipts already in the ledger stay, so
rerunning the same command resumes. A second signal while unwinding exits at once.

Ray's core worker installs its own failure handler for SIGTERM when it connects (it prints a C++ stack
dump), so :func:`install` is called again right after ``ray.init``, and while ``ray.init`` runs the signals
are :func:`held` (recorded, acted on once it returns). And Ray's core worker, when a handler raises inside
``ray.get``/``ray.wait``, drops that exception and raises a plain ``KeyboardInterrupt``: :func:`reason`
names the signal all the same.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator


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


def reason(exc: KeyboardInterrupt) -> str:
    """The one line's text for an interruption, whether it arrives as :class:`Interrupted` or, through Ray's
    core worker (which turns a handler's exception inside ``ray.get``/``ray.wait`` into a new
    ``KeyboardInterrupt``), as a plain one — then the signal recorded by :func:`_handler` is named."""
    if isinstance(exc, Interrupted):
        return str(exc)
    return message(_received[0] if _received else signal.SIGINT.name)


@contextlib.contextmanager
def held() -> Iterator[Callable[[], None]]:
    """Hold SIGTERM and SIGINT while the block runs: record them, then act once it has ended.

    For ``ray.init``, which must not be left half-way (its own handlers would exit mid-way through starting a
    local Ray, or with a C++ stack dump). On leaving the block rayconv's handlers are installed again, and a
    held signal raises :class:`Interrupted` (instead of any error of the block, which the signal likely
    caused). A second signal is the user insisting, as in :func:`_handler`. The block gets a function that
    takes the signals back from whatever replaced the holding handler meanwhile.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def hold(signum: int, frame: object) -> None:
        if _received:
            _handler(signum, frame)  # exits at once
        _received.append(signal.Signals(signum).name)

    def retake() -> None:
        for sig in SIGNALS:
            signal.signal(sig, hold)

    retake()
    try:
        yield retake
    except Exception:
        if not _received:
            raise
    finally:
        install()
    if _received:
        raise Interrupted(message(_received[0])) from None
