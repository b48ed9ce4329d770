"""One interface over local directories and gs:// buckets, built on tensorstore's kvstore.

Everything rayconv reads or writes outside the tensor arrays (params.json, ledgers, Orbax JSON
metadata, commit markers) goes through :class:`Location`, so the commit protocol is written once and
local FS and GCS differ only in the kvstore spec. Tensor arrays use :meth:`Location.kvstore_spec`
directly in their tensorstore specs. GCS credentials come from the environment (ADC / Workload
Identity, resolved by tensorstore); ``TENSORSTORE_GCS_HTTP_URL`` points it at an emulator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import posixpath
import threading
from typing import Any, Iterator

import tensorstore as ts

from rayconv.errors import ConversionError, OutputError, one_line_reason
from rayconv.gcs_api import list_folders, no_answer, object_info, parse_gs, timeout
from rayconv.process_local import per_process

#: Per process (tensorstore handles do not survive a fork): one Context, the kvstores opened in it.
_kvstores = per_process(lambda: (ts.Context(), {}, threading.Lock()))


def bounded(future: Any, spec: dict[str, Any], error: type[ConversionError] = OutputError) -> Any:
    """``future.result()``, waiting at most :func:`rayconv.gcs_api.timeout` seconds.

    Tensorstore retries a GCS request it gets no answer to for minutes (32 attempts with backoff), and
    without network or credentials every call would: past the bound the request is cancelled and the
    run stops with one line naming the bucket (or the local path) and the likely cause.
    """
    seconds = timeout()
    try:
        return future.result(timeout=seconds)
    except TimeoutError:
        future.cancel()
        if spec.get("driver") == "gcs":
            raise no_answer(spec.get("bucket", "?"), seconds, error) from None
        raise error(f"{spec.get('path', '?')}: no answer from the file system within {seconds:.0f} s") from None


def open_kvstore(spec: dict[str, Any], error: type[ConversionError] = OutputError) -> ts.KvStore:
    """Open (once per process) a kvstore; all share one tensorstore Context, so GCS request
    concurrency and connection pools are shared rather than created per call."""
    context, stores, lock = _kvstores()
    key = json.dumps(spec, sort_keys=True)
    with lock:
        store = stores.get(key)
        if store is None:
            store = stores[key] = bounded(ts.KvStore.open(spec, context=context), spec, error)
        return store


def _prefix_range(prefix: str) -> ts.KvStore.KeyRange:
    """All keys starting with ``prefix`` (byte-wise successor as the exclusive end)."""
    low = prefix.encode()
    high = low.rstrip(b"\xff")
    high = high[:-1] + bytes([high[-1] + 1]) if high else b""
    return ts.KvStore.KeyRange(low, high)


@contextlib.contextmanager
def output_errors(location: "Location") -> Iterator[None]:
    """Storage failures (disk full, permission, bucket gone) become one-line OutputErrors."""
    try:
        yield
    except (ValueError, OSError) as exc:
        raise OutputError(f"cannot write to {location.uri}: {one_line_reason(exc)}") from None


@dataclasses.dataclass(frozen=True)
class Location:
    """A directory-like prefix: ``/abs/path`` or ``gs://bucket/prefix``."""

    scheme: str  # "file" or "gs"
    bucket: str  # "" for file
    path: str  # absolute path (file) or object prefix without leading slash (gs)

    @classmethod
    def parse(cls, uri: str) -> "Location":
        uri = str(uri)
        if uri.startswith("gs://"):
            bucket, prefix = parse_gs(uri, OutputError)
            return cls("gs", bucket, prefix.strip("/"))
        if "://" in uri:
            raise OutputError(f"unsupported location {uri!r} (use a local path or gs://bucket/path)")
        return cls("file", "", os.path.abspath(os.path.expanduser(uri)))

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def uri(self) -> str:
        if self.is_local:
            return self.path
        return f"gs://{self.bucket}/{self.path}" if self.path else f"gs://{self.bucket}"

    def __str__(self) -> str:
        return self.uri

    def join(self, *parts: str) -> "Location":
        path = posixpath.join(self.path, *parts) if self.path else posixpath.join(*parts)
        return dataclasses.replace(self, path=path)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def parent(self) -> "Location":
        return dataclasses.replace(self, path=posixpath.dirname(self.path.rstrip("/")))

    def kvstore_spec(self) -> dict[str, Any]:
        """Tensorstore kvstore spec for this prefix (a directory: path ends with '/')."""
        if self.is_local:
            return {"driver": "file", "path": self.path.rstrip("/") + "/"}
        return {"driver": "gcs", "bucket": self.bucket, "path": (self.path.rstrip("/") + "/") if self.path else ""}

    def _kvstore(self) -> ts.KvStore:
        return open_kvstore(self.kvstore_spec())

    def _wait(self, future: Any) -> Any:
        """A kvstore operation's result, bounded in time (:func:`bounded`)."""
        return bounded(future, self.kvstore_spec())

    # Small-object operations. Keys are relative to this location.
    def read_bytes(self, key: str) -> bytes | None:
        result = self._wait(self._kvstore().read(key))
        return bytes(result.value) if result.state == "value" else None

    def read_range(self, key: str, start: int, stop: int) -> bytes:
        result = self._wait(self._kvstore().read(key, byte_range=slice(start, stop)))
        if result.state != "value":
            raise OutputError(f"missing {self.join(key).uri}")
        return bytes(result.value)

    def write_bytes(self, key: str, data: bytes) -> None:
        try:
            if self.is_local:
                os.makedirs(os.path.dirname(os.path.join(self.path, key)), exist_ok=True)
            self._wait(self._kvstore().write(key, data))
        except (OSError, ValueError) as exc:
            raise OutputError(f"cannot write to {self.join(key).uri}: {one_line_reason(exc)}") from None

    def exists(self, key: str = "") -> bool:
        if not key:
            return bool(self.list_keys())
        if self.is_local:
            return os.path.isfile(os.path.join(self.path, key))
        return self._wait(self._kvstore().read(key, byte_range=slice(0, 0))).state == "value"

    def list_keys(self, prefix: str = "") -> list[str]:
        if self.is_local and not os.path.isdir(self.path):
            return []
        store = self._kvstore()
        keys = self._wait(store.list(_prefix_range(prefix) if prefix else None))
        return sorted(k.decode() if isinstance(k, bytes) else k for k in keys)

    def list_folders(self, *, follow_symlinks: bool = False) -> list[str]:
        """Names of the directories directly under this location (on GCS: the common prefixes). A local link to a
        directory counts only with ``follow_symlinks`` (an input's folders may be links; what a cleanup deletes
        must never be one)."""
        if self.is_local:
            if not os.path.isdir(self.path):
                return []
            return sorted(e.name for e in os.scandir(self.path) if e.is_dir(follow_symlinks=follow_symlinks))
        return list_folders(self.bucket, self.path.rstrip("/") + "/" if self.path else "")

    def size(self, key: str) -> int | None:
        """Object size in bytes, or None when it does not exist (gs://: object metadata only)."""
        if self.is_local:
            path = os.path.join(self.path, key)
            return os.path.getsize(path) if os.path.isfile(path) else None
        info = object_info(self.bucket, self.join(key).path)
        return None if info is None else info["size"]

    def delete(self, key: str) -> None:
        """Remove one key (no error when it is absent)."""
        if self.is_local:
            try:
                os.remove(os.path.join(self.path, key))
            except FileNotFoundError:
                pass
            return
        exact = key.encode()
        self._wait(self._kvstore().delete_range(ts.KvStore.KeyRange(exact, exact + b"\x00")))

    def delete_all(self) -> None:
        """Remove everything under this prefix."""
        if self.is_local:
            import shutil

            shutil.rmtree(self.path, ignore_errors=True)
            return
        self._wait(self._kvstore().delete_range(ts.KvStore.KeyRange()))

    def rename(self, target: "Location") -> None:
        """Atomic directory rename; only local filesystems have one."""
        if not (self.is_local and target.is_local):
            raise OutputError("rename is only atomic on a local filesystem")
        os.makedirs(os.path.dirname(target.path), exist_ok=True)
        os.replace(self.path, target.path)

    def check_writable(self) -> None:
        """Fail early, with one line, when the output cannot be written."""
        probe = ".rayconv-write-probe"
        try:
            self.write_bytes(probe, b"ok")
            self.delete(probe)
        except (OSError, ValueError) as exc:
            raise OutputError(f"cannot write to {self.uri}: {one_line_reason(exc)}") from None

