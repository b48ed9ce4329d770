"""Where an output lock lives: compare-and-swap primitives over one lock object, locally and on GCS.

Kept apart from the lock's rules (:mod:`rayconv.sink.lock`): these only create, read, replace and delete one
small object atomically; who may hold it is decided there.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Any, Iterator, Protocol

from rayconv.storage import Location

LOCK_KEY = ".rayconv/lock"


class Backend(Protocol):
    """Compare-and-swap primitives over one lock object. ``token`` identifies a version."""

    uri: str

    def create(self, data: bytes) -> Any | None: ...  # token, or None when it exists

    def read(self) -> tuple[bytes, Any, float] | None: ...  # (data, token, modified time) or None

    def replace(self, data: bytes, token: Any) -> Any | None: ...  # new token, or None when token is stale

    def delete(self, token: Any) -> None: ...


class LocalBackend:
    """O_EXCL create; a ``flock`` on a guard file serialises read-compare-replace (takeover, heartbeat)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.uri = path
        self._guard = path + ".guard"

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        import fcntl

        fd = os.open(self._guard, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def create(self, data: bytes) -> Any | None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return data

    def read(self) -> tuple[bytes, Any, float] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
                return data, data, os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None

    def replace(self, data: bytes, token: Any) -> Any | None:
        with self._guarded():
            current = self.read()
            if current is None or current[1] != token:
                return None
            tmp = f"{self.path}.{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            return data

    def delete(self, token: Any) -> None:
        with self._guarded():
            current = self.read()
            if current is not None and current[1] == token:
                os.remove(self.path)


class GcsBackend:
    """Generation preconditions: ``ifGenerationMatch=0`` to create, ``=<generation>`` to replace/delete."""

    def __init__(self, bucket: str, name: str) -> None:
        self.bucket, self.name = bucket, name
        self.uri = f"gs://{bucket}/{name}"

    def _blob(self):
        from rayconv.gcs_api import client

        return client().bucket(self.bucket).blob(self.name)

    @staticmethod
    def _bounded() -> dict:
        from rayconv.gcs_api import request_args

        return request_args()

    def _write(self, data: bytes, generation: int) -> Any | None:
        from google.api_core import exceptions as gexc

        blob = self._blob()
        try:
            blob.upload_from_string(data, content_type="application/json", if_generation_match=generation,
                                    **self._bounded())
        except gexc.PreconditionFailed:
            # A retried request whose first attempt succeeded also ends here: then the object is ours.
            current = self.read()
            return current[1] if current is not None and current[0] == data else None
        return blob.generation

    def create(self, data: bytes) -> Any | None:
        return self._write(data, 0)

    def read(self) -> tuple[bytes, Any, float] | None:
        from google.api_core import exceptions as gexc

        blob = self._blob().bucket.get_blob(self.name, **self._bounded())
        if blob is None:
            return None
        try:
            data = blob.download_as_bytes(if_generation_match=blob.generation, **self._bounded())
        except (gexc.NotFound, gexc.PreconditionFailed):
            return self.read()  # replaced or deleted between the two requests: look again
        modified = blob.updated.timestamp() if blob.updated else 0.0
        return data, blob.generation, modified

    def replace(self, data: bytes, token: Any) -> Any | None:
        return self._write(data, int(token))

    def delete(self, token: Any) -> None:
        from google.api_core import exceptions as gexc

        try:
            self._blob().delete(if_generation_match=int(token), **self._bounded())
        except (gexc.NotFound, gexc.PreconditionFailed):
            pass


def backend(out: Location) -> Backend:
    key = out.join(LOCK_KEY)
    if out.is_local:
        return LocalBackend(key.path)
    return GcsBackend(key.bucket, key.path)
