"""``gs://bucket/object`` as a ByteSource.

Reads go through tensorstore's gcs kvstore (``byte_range`` reads): it brings its own auth
(``GOOGLE_AUTH_TOKEN_FOR_TESTING`` → ADC file → GCE/GKE metadata server, i.e. Workload Identity),
retries transient errors with backoff (``gcs_request_retries``, 32 attempts by default) and honours
``TENSORSTORE_GCS_HTTP_URL`` for emulators. A large ``readinto`` is split into ``chunk_size``
sub-reads with a bounded number in flight; a process-wide byte budget caps the transient copies
when many threads read at once (sizes: :class:`rayconv.tunables.Tunables`).

Object metadata (the size) comes from :mod:`rayconv.gcs_api`. Nothing here logs a credential or token.
"""

from __future__ import annotations

import collections
import threading

from rayconv import tunables
from rayconv.errors import ConversionError, SourceError, one_line_reason
from rayconv.gcs_api import object_info, parse_gs
from rayconv.process_local import per_process
from rayconv.source.bytesource import RangeSource, register_scheme
from rayconv.storage import bounded, open_kvstore

MiB = 1 << 20

#: Sub-reads in flight in this process, across all GcsObjects and threads (``Tunables.gcs_process_inflight``,
#: as installed before the process's first read).
_semaphore = per_process(lambda: threading.BoundedSemaphore(tunables.current().gcs_process_inflight))


class GcsObject(RangeSource):
    """A ByteSource over ``gs://bucket/object`` using tensorstore ranged reads."""

    def __init__(self, uri: str, *, size: int | None = None, chunk_size: int | None = None,
                 concurrency: int | None = None) -> None:
        self.uri = uri
        self.bucket, self.key = parse_gs(uri)
        if not self.key:
            raise SourceError(f"{uri} names a bucket, not an object")
        knobs = tunables.current()  # chunk size and sub-reads in flight per call, unless given
        self.chunk_size = max(MiB, chunk_size or knobs.gcs_chunk_mb * MiB)
        self.concurrency = max(1, concurrency or knobs.gcs_concurrency)
        self._size = size
        self._kv = None

    def __repr__(self) -> str:
        return f"GcsObject({self.uri!r})"

    def _store(self):
        if self._kv is None:
            self._kv = open_kvstore({"driver": "gcs", "bucket": self.bucket}, SourceError)
        return self._kv

    def size(self) -> int:
        if self._size is None:
            info = object_info(self.bucket, self.key)
            if info is None:
                raise SourceError(f"missing file {self.uri}")
            self._size = info["size"]
        return self._size

    def readinto(self, offset: int, buffer: memoryview) -> None:
        buffer = memoryview(buffer).cast("B")
        n = len(buffer)
        if n == 0:
            return
        self.check_range(offset, n, holder="object")
        kv = self._store()
        sem = _semaphore()
        pending: collections.deque = collections.deque()
        try:
            for a in range(0, n, self.chunk_size):
                b = min(n, a + self.chunk_size)
                # Take a slot from the process budget; while waiting, finish our own oldest read so
                # threads holding slots always make progress (no deadlock).
                while len(pending) >= self.concurrency or not sem.acquire(blocking=not pending):
                    self._finish(pending.popleft(), buffer, sem)
                try:
                    future = kv.read(self.key, byte_range=slice(offset + a, offset + b))
                except BaseException:
                    sem.release()
                    raise
                pending.append((a, b, future))
            while pending:
                self._finish(pending.popleft(), buffer, sem)
        finally:
            for _, _, future in pending:  # only on error
                future.cancel()
                sem.release()

    def _finish(self, item, buffer: memoryview, sem) -> None:
        a, b, future = item
        try:
            # bounded: no answer ends in one line naming the bucket, not minutes of retries
            result = bounded(future, {"driver": "gcs", "bucket": self.bucket}, SourceError)
        except ConversionError:
            raise
        except Exception as exc:  # tensorstore raises ValueError/OSError with a status message
            raise SourceError(f"{self.uri}: read of bytes {a}-{b} failed: {one_line_reason(exc)}") from None
        finally:
            sem.release()
        if result.state != "value":
            raise SourceError(f"missing file {self.uri}")
        value = result.value
        if len(value) != b - a:
            raise SourceError(f"{self.uri} is truncated or changed while reading "
                              f"(got {len(value)} of {b - a} bytes)")
        buffer[a:b] = value


register_scheme("gs://", GcsObject)
