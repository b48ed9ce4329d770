"""One conversion per output: ``<out>/.rayconv/lock``, with an owner, a heartbeat and safe takeover.

Two conversions writing one output would merge each other's databases and mark each other's
work committed. The lock is a small JSON object (owner id, host, pid, start and heartbeat times):

* **acquire**: create it only if absent — ``O_CREAT | O_EXCL`` on a local disk, an upload with
  ``ifGenerationMatch=0`` on GCS. If it exists and its holder is alive, refuse with one line naming
  the holder (host, pid, age of its heartbeat). A holder on this host is alive while its pid is; a
  holder on another host is watched until its heartbeat advances (alive: refuse) or goes stale (take
  over), so a job retried on a fresh cluster right after its driver's node died waits, not fails.
* **stale** means: the holder ran on this host and its pid is gone, or its heartbeat is older than
  the stale timeout (``rayconv.tunables.Tunables.lock_stale_s``, 120 s; ``RAYCONV_LOCK_STALE_SECONDS``). A
  stale lock is replaced with a compare-and-swap — a generation precondition on GCS; locally a
  ``flock``-guarded read-compare-replace — so of two processes that both saw it stale exactly one
  wins; the other sees a fresh holder and refuses.
* **heartbeat**: a daemon thread rewrites the lock every ``stale/4`` seconds with the same
  compare-and-swap; if the lock is no longer ours (taken over after this process stalled), it
  records that, and :meth:`OutputLock.check` makes the driver stop before committing anything.
* **release**: deleted at the end of the run, success or error, only if still ours. A killed run
  leaves it behind; the next run on the same host takes it over at once (dead pid), any other host
  after the heartbeat timeout.

Heartbeat ages compare the holder's clock with ours: hosts sharing an output should keep time
(NTP). A heartbeat more than :data:`CLOCK_SKEW_SECONDS` ahead of our clock is not evidence of life
(no clock drifts that far under NTP; a lock written with a far-future or absurd time would otherwise
hold an output for years): such a lock, like one that does not parse (garbage, ``Infinity``, deep
nesting, huge numbers, a pid that cannot exist), is judged *unreadable*, by the age of the lock
object itself; and an object whose modified time lies that far ahead shows no life at all (stale).
So every wait for a holder is bounded by the stale timeout plus the skew allowance. The local guard
(``flock``) is per host; a local output shared by several hosts over NFS is protected by the heartbeat timeout only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from rayconv import jsonio, tunables
from rayconv.errors import OutputError, one_line_reason
from rayconv.gcs_api import answered
from rayconv.sink.lock_backends import Backend, backend
from rayconv.storage import Location

log = logging.getLogger("rayconv")

#: How far a holder's heartbeat (or the lock object's modified time) may lie ahead of our clock and
#: still be believed (seconds). Hosts under NTP agree to well under a second; beyond this a future
#: time is treated as no time at all, so it can never stretch a wait.
CLOCK_SKEW_SECONDS = 30.0
#: Linux's largest pid is 2**22; anything outside (0, 2**31) cannot name a process.
_MAX_PID = 2**31 - 1


class OutputLocked(OutputError):
    """Another live conversion holds the output."""


@dataclasses.dataclass(frozen=True)
class Holder:
    owner: str
    host: str
    pid: int
    started: float
    heartbeat: float

    @classmethod
    def parse(cls, data: bytes) -> "Holder | None":
        """The holder ``data`` describes, or None when it is unreadable (not a well-formed lock of ours).

        Parsed with the bounded reader, so hostile bytes (deep nesting, 5000-digit numbers, ``Infinity``)
        make an unreadable lock like any other garbage, never an exception.
        """
        try:
            d = jsonio.loads_object(data, max_bytes=64 * 1024)
        except jsonio.JSONError:
            return None
        owner, host, pid, started, beat = (d.get(k) for k in ("owner", "host", "pid", "started", "heartbeat"))
        if not (isinstance(owner, str) and isinstance(host, str) and type(pid) is int and 0 < pid <= _MAX_PID):
            return None
        if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in (started, beat)):
            return None
        return cls(owner, host, pid, float(started), float(beat))

    def encode(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    def describe(self, now: float) -> str:
        return f"host {self.host}, pid {self.pid}, last heartbeat {max(0.0, now - self.heartbeat):.0f} s ago"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """Exclusive ownership of an output directory for one conversion (a context manager)."""

    def __init__(self, out: Location, *, stale: float | None = None, heartbeat: float | None = None) -> None:
        self.out = out
        self.stale = tunables.current().lock_stale_s if stale is None else stale
        self.interval = heartbeat if heartbeat is not None else max(0.5, self.stale / 4)
        self._backend: Backend = backend(out)
        self._holder: Holder | None = None
        self._token: Any = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()
        self.took_over: Holder | None = None

    @property
    def uri(self) -> str:
        return self._backend.uri

    def _new_holder(self) -> Holder:
        now = time.time()
        return Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now)

    @staticmethod
    def believable(holder: Holder | None, now: float) -> Holder | None:
        """``holder``, or None when its heartbeat lies beyond the clock-skew allowance in the future.

        Such a heartbeat says nothing about whether its holder lives; the lock is then judged as an
        unreadable one (by the object's age), so a far-future time cannot hold the output.
        """
        if holder is not None and holder.heartbeat > now + CLOCK_SKEW_SECONDS:
            return None
        return holder

    def last_sign_of_life(self, holder: Holder | None, modified: float, now: float) -> float:
        """When the holder last showed life: its heartbeat, or the lock object's modified time if unreadable.

        A modified time beyond the clock-skew allowance (a file touched into the future) is no evidence
        either: then ``-inf`` (stale now). So ``last + stale`` never lies further ahead than the allowance
        plus the stale timeout, and every wait is bounded by them.
        """
        last = holder.heartbeat if holder is not None else modified
        return last if last <= now + CLOCK_SKEW_SECONDS else float("-inf")  # NaN compares False too

    def is_stale(self, holder: Holder | None, modified: float, now: float) -> bool:
        holder = self.believable(holder, now)
        if holder is not None and holder.host == socket.gethostname() and not pid_alive(holder.pid):
            return True
        # unreadable (being written, garbage, or a heartbeat from the future): judge by the object's age
        return now - self.last_sign_of_life(holder, modified, now) > self.stale

    def acquire(self) -> "OutputLock":
        # On GCS a request that gets no answer is the one line naming the bucket (gcs_api.answered).
        bounded = contextlib.nullcontext() if self.out.is_local else answered(self.out.bucket, OutputError)
        try:
            with bounded:
                self._acquire()
        except OutputError:
            raise
        except Exception as exc:  # OSError locally; google.api_core errors on GCS
            raise OutputError(f"cannot lock {self.out.uri}: {one_line_reason(exc)}") from None
        self._thread = threading.Thread(target=self._beat, name="rayconv-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _acquire(self) -> None:
        seen_alive = False
        for _ in range(10):
            mine = self._new_holder()
            token = self._backend.create(mine.encode())
            if token is not None:
                self._holder, self._token = mine, token
                return
            current = self._backend.read()
            if current is None:
                continue  # released meanwhile: try to create again
            data, token, modified = current
            now = time.time()
            holder = self.believable(Holder.parse(data), now)
            if not self.is_stale(holder, modified, now):
                who = holder.describe(now) if holder else f"unreadable lock, written {max(0.0, now - modified):.0f} s ago"
                local = holder is not None and holder.host == socket.gethostname()
                if seen_alive or local:  # a live pid here, or a heartbeat seen to advance
                    raise OutputLocked(f"{self.out.uri} is being written by another conversion ({who}); wait for "
                                       f"it to finish, or remove {self.uri} if that process is gone")
                # Another host: alive if it beats again, dead if it goes stale (a retried job on a new cluster).
                stale_at = self.last_sign_of_life(holder, modified, now) + self.stale
                log.warning("The output lock of %s is held by %s; waiting up to %.0f s for it to beat again (then "
                            "this run stops) or go stale (then this run takes it over)", self.out.uri, who,
                            stale_at - now)
                seen_alive = self._watch(token, stale_at)
                continue
            new = self._backend.replace(mine.encode(), token)
            if new is not None:
                self._holder, self._token, self.took_over = mine, new, holder
                log.warning("Took over the stale output lock of %s", holder.describe(now) if holder else "an unknown "
                            "holder")
                return
            # Someone else replaced or removed it first: look again (they may have won).
        raise OutputLocked(f"could not lock {self.out.uri}: the lock keeps changing hands")

    def _watch(self, token: Any, until: float) -> bool:
        """Poll the lock until ``until``; True as soon as it changed (rewritten, released or replaced)."""
        poll = max(0.2, min(2.0, self.interval / 4))
        while time.time() < until:
            time.sleep(min(poll, max(0.0, until - time.time())))
            current = self._backend.read()
            if current is None or current[1] != token:
                return True
        return False

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except Exception as exc:  # transient storage trouble: the next beat retries
                log.warning("output lock heartbeat failed: %s", one_line_reason(exc))
            if self._lost:
                return

    def refresh(self) -> None:
        """Rewrite the heartbeat, if the lock is still ours."""
        with self._mutex:
            if self._holder is None or self._lost:
                return
            beat = dataclasses.replace(self._holder, heartbeat=time.time())
            token = self._backend.replace(beat.encode(), self._token)
            if token is None:
                current = self._backend.read()
                other = Holder.parse(current[0]) if current else None
                self._lost = other.describe(time.time()) if other else "nobody (the lock was removed)"
                log.error("lost the output lock of %s to %s", self.out.uri, self._lost)
                return
            self._holder, self._token = beat, token

    def check(self) -> None:
        """Raise if the lock was taken from us (before any step that makes output visible)."""
        if self._lost:
            raise OutputLocked(f"lost the lock on {self.out.uri} to {self._lost} (a run that stalls for over "
                               f"{self.stale:.0f} s counts as dead); stopped before committing: rerun to resume")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 30)
        with self._mutex:
            if self._holder is not None and not self._lost:
                try:
                    self._backend.delete(self._token)
                except Exception as exc:  # the next run takes a leftover lock over (dead pid / timeout)
                    log.warning("could not release the output lock %s: %s", self.uri, one_line_reason(exc))
            self._holder = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_holder(out: Location) -> Holder | None:
    """The current holder of ``out``'s lock, if any (for tests and diagnostics)."""
    current = backend(out).read()
    return Holder.parse(current[0]) if current else None


