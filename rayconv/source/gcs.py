"""``gs://bucket/object`` as a ByteSource, plus the few GCS object operations rayconv needs.

Reads go through tensorstore's gcs kvstore (``byte_range`` reads): it brings its own auth
(``GOOGLE_AUTH_TOKEN_FOR_TESTING`` → ADC file → GCE/GKE metadata server, i.e. Workload Identity),
retries transient errors with backoff (``gcs_request_retries``, 32 attempts by default) and honours
``TENSORSTORE_GCS_HTTP_URL`` for emulators. A large ``readinto`` is split into ``chunk_size``
sub-reads with a bounded number in flight; a process-wide byte budget caps the transient copies
when many threads read at once.

Object metadata (size, md5), compose and batch delete use google-cloud-storage, which honours
``STORAGE_EMULATOR_HOST`` and the same ADC / Workload Identity credentials. Nothing here logs a
credential or token.
"""

from __future__ import annotations

import collections
import logging
import os
import threading

from rayconv.errors import SourceError
from rayconv.source.bytesource import RangeSource, register_scheme

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_CHUNK = int(os.environ.get("RAYCONV_GCS_CHUNK_MB", "16")) * MiB
#: Sub-reads in flight per readinto call.
DEFAULT_CONCURRENCY = int(os.environ.get("RAYCONV_GCS_CONCURRENCY", "8"))
#: Sub-reads in flight per process across all threads (each holds ~2 x chunk while in flight).
PROCESS_INFLIGHT = int(os.environ.get("RAYCONV_GCS_PROCESS_INFLIGHT", "16"))


def parse_gs(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` → (``bucket``, ``a/b``)."""
    if not uri.startswith("gs://"):
        raise SourceError(f"not a gs:// URI: {uri}")
    bucket, _, name = uri[len("gs://"):].partition("/")
    if not bucket:
        raise SourceError(f"{uri} names no bucket")
    return bucket, name


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    text = text[0] if text else type(exc).__name__
    return text[:limit]


# --------------------------------------------------------------------------------------------------
# google-cloud-storage client (metadata, compose, delete)

_client_lock = threading.Lock()
_client: tuple[int, object] | None = None


def emulator_endpoint() -> str | None:
    """The GCS emulator URL from STORAGE_EMULATOR_HOST or TENSORSTORE_GCS_HTTP_URL, if any."""
    url = os.environ.get("STORAGE_EMULATOR_HOST") or os.environ.get("TENSORSTORE_GCS_HTTP_URL")
    if url and "://" not in url:
        url = "http://" + url
    return url or None


def client():
    """A process-wide google-cloud-storage client: ADC / Workload Identity, or the emulator."""
    global _client
    with _client_lock:
        if _client is not None and _client[0] == os.getpid():
            return _client[1]
        from google.auth.credentials import AnonymousCredentials
        from google.auth.exceptions import DefaultCredentialsError
        from google.cloud import storage

        endpoint = emulator_endpoint()
        if endpoint:
            c = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "rayconv"),
                               credentials=AnonymousCredentials(),
                               client_options={"api_endpoint": endpoint})
        else:
            try:
                c = storage.Client()
            except DefaultCredentialsError:
                log.warning("no Google Cloud credentials found (ADC / Workload Identity); "
                            "using anonymous access to GCS")
                c = storage.Client.create_anonymous_client()
        _client = (os.getpid(), c)
        return c


def _gcs_call(what: str, uri: str, fn, error=SourceError):
    from google.api_core import exceptions as gexc

    try:
        return fn()
    except gexc.NotFound:
        raise error(f"missing {what} {uri}") from None
    except gexc.Forbidden:
        raise error(f"permission denied on {uri} (check the credentials' IAM roles on the bucket)") from None
    except gexc.GoogleAPICallError as exc:
        raise error(f"{uri}: GCS error: {first_line(exc)}") from None


def object_info(bucket: str, name: str) -> dict | None:
    """``{'size', 'md5' (hex or None: composite objects have none), 'crc32c', 'generation'}``."""
    from google.api_core import exceptions as gexc

    uri = f"gs://{bucket}/{name}"
    try:
        blob = client().bucket(bucket).get_blob(name)
    except gexc.Forbidden:
        raise SourceError(f"permission denied reading {uri} (check the credentials' IAM roles)") from None
    except gexc.GoogleAPICallError as exc:
        raise SourceError(f"{uri}: GCS error: {first_line(exc)}") from None
    if blob is None:
        return None
    md5 = None
    if blob.md5_hash and blob.component_count is None:
        import base64

        md5 = base64.b64decode(blob.md5_hash).hex()
    return {"size": int(blob.size), "md5": md5, "crc32c": blob.crc32c, "generation": blob.generation,
            "component_count": blob.component_count}


def compose(bucket: str, sources: list[str], dest: str, *, scratch_prefix: str) -> None:
    """Concatenate ``sources`` (in order) into ``dest``; more than 32 goes through a tree."""
    from google.api_core.retry import Retry

    from rayconv.errors import OutputError

    b = client().bucket(bucket)
    level = 0
    names = list(sources)
    temps: list[str] = []
    while len(names) > 32:
        grouped = []
        for i in range(0, len(names), 32):
            target = f"{scratch_prefix}compose-{level}-{i // 32:05d}"
            _gcs_call("object", f"gs://{bucket}/{target}",
                      lambda t=target, g=names[i:i + 32]: b.blob(t).compose([b.blob(s) for s in g],
                                                                            retry=Retry()),
                      OutputError)
            grouped.append(target)
        temps += grouped
        names = grouped
        level += 1
    _gcs_call("object", f"gs://{bucket}/{dest}",
              lambda: b.blob(dest).compose([b.blob(s) for s in names], retry=Retry()), OutputError)
    delete_objects(bucket, temps)


def delete_objects(bucket: str, names: list[str]) -> None:
    from google.api_core import exceptions as gexc

    b = client().bucket(bucket)
    for name in names:
        try:
            b.blob(name).delete()
        except gexc.NotFound:
            pass


# --------------------------------------------------------------------------------------------------
# The ByteSource

_budget = threading.BoundedSemaphore(PROCESS_INFLIGHT)
_budget_pid = os.getpid()


def _semaphore() -> threading.BoundedSemaphore:
    global _budget, _budget_pid
    if _budget_pid != os.getpid():
        _budget, _budget_pid = threading.BoundedSemaphore(PROCESS_INFLIGHT), os.getpid()
    return _budget


class GcsObject(RangeSource):
    """A ByteSource over ``gs://bucket/object`` using tensorstore ranged reads."""

    def __init__(self, uri: str, *, size: int | None = None, chunk_size: int | None = None,
                 concurrency: int | None = None) -> None:
        self.uri = uri
        self.bucket, self.key = parse_gs(uri)
        if not self.key:
            raise SourceError(f"{uri} names a bucket, not an object")
        self.chunk_size = max(MiB, chunk_size or DEFAULT_CHUNK)
        self.concurrency = max(1, concurrency or DEFAULT_CONCURRENCY)
        self._size = size
        self._kv = None

    def __repr__(self) -> str:
        return f"GcsObject({self.uri!r})"

    def _store(self):
        if self._kv is None:
            from rayconv.storage import open_kvstore

            self._kv = open_kvstore({"driver": "gcs", "bucket": self.bucket})
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
            result = future.result()
        except Exception as exc:  # tensorstore raises ValueError/OSError with a status message
            raise SourceError(f"{self.uri}: read of bytes {a}-{b} failed: {first_line(exc)}") from None
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
