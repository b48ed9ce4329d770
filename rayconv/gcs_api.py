"""GCS object operations and the one ``gs://`` parser: a leaf module (imports nothing else of rayconv's
but :mod:`rayconv.errors` and :mod:`rayconv.process_local`).

Bytes move through tensorstore (:mod:`rayconv.storage`, :mod:`rayconv.source.gcs`); what tensorstore's
kvstore cannot do — object metadata (size, md5, crc32c, generation), compose, batch delete — goes
through google-cloud-storage here. It honours ``STORAGE_EMULATOR_HOST`` and the same ADC / Workload
Identity credentials tensorstore finds. Nothing here logs a credential or token.
"""

from __future__ import annotations

import base64
import logging
import os

from rayconv.errors import ConversionError, OutputError, SourceError, one_line_reason
from rayconv.process_local import per_process

log = logging.getLogger(__name__)


def parse_gs(uri: str, error: type[ConversionError] = SourceError) -> tuple[str, str]:
    """``gs://bucket/a/b`` → (``bucket``, ``a/b``); ``error`` is raised (one line) for anything else."""
    if not uri.startswith("gs://"):
        raise error(f"not a gs:// URI: {uri}")
    bucket, _, name = uri[len("gs://"):].partition("/")
    if not bucket:
        raise error(f"{uri!r} names no bucket")
    return bucket, name


def emulator_endpoint() -> str | None:
    """The GCS emulator URL from STORAGE_EMULATOR_HOST or TENSORSTORE_GCS_HTTP_URL, if any."""
    url = os.environ.get("STORAGE_EMULATOR_HOST") or os.environ.get("TENSORSTORE_GCS_HTTP_URL")
    if url and "://" not in url:
        url = "http://" + url
    return url or None


def _make_client():
    from google.auth.credentials import AnonymousCredentials
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    endpoint = emulator_endpoint()
    if endpoint:
        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "rayconv"),
                              credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint})
    try:
        return storage.Client()
    except DefaultCredentialsError:
        log.warning("no Google Cloud credentials found (ADC / Workload Identity); using anonymous access to GCS")
        return storage.Client.create_anonymous_client()


#: The process-wide google-cloud-storage client: ADC / Workload Identity, or the emulator.
client = per_process(_make_client)


def _gcs_call(what: str, uri: str, fn, error: type[ConversionError] = SourceError):
    from google.api_core import exceptions as gexc

    try:
        return fn()
    except gexc.NotFound:
        raise error(f"missing {what} {uri}") from None
    except gexc.Forbidden:
        raise error(f"permission denied on {uri} (check the credentials' IAM roles on the bucket)") from None
    except gexc.GoogleAPICallError as exc:
        raise error(f"{uri}: GCS error: {one_line_reason(exc)}") from None


#: Custom metadata key under which staging records the md5 it verified for a composed object (GCS keeps
#: none for composites). Set only after the object's crc32c matched the hashed bytes; an object
#: replaced later is a new object without it.
VERIFIED_MD5_KEY = "rayconv-verified-md5"


def object_info(bucket: str, name: str) -> dict | None:
    """``{'size', 'md5' (hex or None: composite objects have none), 'crc32c', 'generation',
    'component_count', 'verified_md5'}``, or None when the object does not exist."""
    from google.api_core import exceptions as gexc

    uri = f"gs://{bucket}/{name}"
    try:
        blob = client().bucket(bucket).get_blob(name)
    except gexc.Forbidden:
        raise SourceError(f"permission denied reading {uri} (check the credentials' IAM roles)") from None
    except gexc.GoogleAPICallError as exc:
        raise SourceError(f"{uri}: GCS error: {one_line_reason(exc)}") from None
    if blob is None:
        return None
    md5 = None
    if blob.md5_hash and blob.component_count is None:
        md5 = base64.b64decode(blob.md5_hash).hex()
    return {"size": int(blob.size), "md5": md5, "crc32c": blob.crc32c, "generation": blob.generation,
            "component_count": blob.component_count, "verified_md5": (blob.metadata or {}).get(VERIFIED_MD5_KEY)}


def record_verified_md5(bucket: str, name: str, md5: str, generation: int) -> None:
    """Attach ``md5`` to generation ``generation`` of a composed object (fails if it was replaced)."""
    from google.api_core.retry import Retry

    blob = client().bucket(bucket).blob(name, generation=generation)
    blob.metadata = {VERIFIED_MD5_KEY: md5}
    _gcs_call("object", f"gs://{bucket}/{name}", lambda: blob.patch(if_generation_match=generation, retry=Retry()),
              OutputError)


def compose(bucket: str, sources: list[str], dest: str, *, scratch_prefix: str) -> None:
    """Concatenate ``sources`` (in order) into ``dest``; more than 32 goes through a tree."""
    from google.api_core.retry import Retry

    b = client().bucket(bucket)
    level = 0
    names = list(sources)
    temps: list[str] = []
    while len(names) > 32:
        grouped = []
        for i in range(0, len(names), 32):
            target = f"{scratch_prefix}compose-{level}-{i // 32:05d}"
            _gcs_call("object", f"gs://{bucket}/{target}",
                      lambda t=target, g=names[i:i + 32]: b.blob(t).compose([b.blob(s) for s in g], retry=Retry()),
                      OutputError)
            grouped.append(target)
        temps += grouped
        names = grouped
        level += 1
    _gcs_call("object", f"gs://{bucket}/{dest}",
              lambda: b.blob(dest).compose([b.blob(s) for s in names], retry=Retry()), OutputError)
    delete_objects(bucket, temps)


def list_folders(bucket: str, prefix: str) -> list[str]:
    """Names of the "folders" directly under ``prefix`` (one delimiter listing, not every object below)."""
    uri = f"gs://{bucket}/{prefix}"

    def folders() -> list[str]:
        pages = client().list_blobs(bucket, prefix=prefix, delimiter="/")
        for _ in pages:  # the prefixes are filled in while the pages are read
            pass
        return sorted(p[len(prefix):].rstrip("/") for p in pages.prefixes)

    return _gcs_call("folder", uri, folders, OutputError)


def delete_objects(bucket: str, names: list[str]) -> None:
    """Delete objects; absent ones are not an error."""
    from google.api_core import exceptions as gexc

    b = client().bucket(bucket)
    for name in names:
        try:
            b.blob(name).delete()
        except gexc.NotFound:
            pass
