"""Process-wide singletons that survive ``fork``: connection pools, clients, semaphores.

Ray workers and multiprocessing children fork from processes that already hold an HTTP pool, a
google-cloud-storage client or a tensorstore Context; none of those may be shared across a fork. One
helper builds each lazily, once per process id, instead of a hand-written pid check per module.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class PerProcess(Generic[T]):
    """``get()`` returns ``factory()``'s value, built once per process (again in a forked child)."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._pid = -1
        self._value: T | None = None

    def get(self) -> T:
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._value = self._factory()
                    self._pid = os.getpid()
        return self._value  # type: ignore[return-value]

    __call__ = get


def per_process(factory: Callable[[], T]) -> PerProcess[T]:
    return PerProcess(factory)
