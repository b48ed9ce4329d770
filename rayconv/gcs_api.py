"""GCS object operations and the one ``gs://`` parser: a leaf module (imports nothing else of rayconv's
but :mod:`rayconv.errors`, :mod:`rayconv.process_local` and :mod:`rayconv.tunables`).

Bytes move through tensorstore (:mod:`rayconv.storage`, :mod:`rayconv.source.gcs`); what tensorstore's
kvstore cannot do — object metadata (size, md5, crc32c, generation), compose, batch delete — goes
through google-cloud-storage here. It honours ``STORAGE_EMULATOR_HOST`` and the same ADC / Workload
Identity credentials tensorstore finds. Nothing here logs a credential or token.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
from typing import Iterator

from rayconv import tunables
from rayconv.errors import ConversionError, OutputError, SourceError, one_line_reason
from rayconv.process_local import per_process

log = logging.getLogger(__name__)


def timeout() -> float:
    """The bound on one storage call (a small object's read or write, a sub-read of a large one, a metadata
    request), in seconds: this process's ``--storage_timeout_s`` (:attr:`rayconv.tunables.Tunables.storage_timeout_s`,
    installed by the driver and by every worker from the job context). Without it a run with no network or no
    credentials is silent for minutes while tensorstore and google-cloud-storage retry (#21: > 90 s)."""
    return tunables.current().storage_timeout_s


def _credentials_file() -> str | None:
    """The credentials file ADC would use, if any (for the diagnosis only; never read here)."""
    path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if path:
        return path
    adc = os.path.join(os.path.expanduser("~"), ".config", "gcloud", "application_default_credentials.json")
    return adc if os.path.exists(adc) else None


def no_answer(bucket: str, seconds: float, error: type[ConversionError] = OutputError) -> ConversionError:
    """The one line for a storage call that did not finish within ``seconds``: which bucket, and the likely why."""
    endpoint = emulator_endpoint()
    if endpoint:
        why = f"the storage endpoint {endpoint} does not answer"
    elif _credentials_file() is None:
        why = ("no Google Cloud credentials found (GOOGLE_APPLICATION_CREDENTIALS, gcloud application-default "
               "login or a GCE/GKE metadata server) or no network route to storage.googleapis.com")
    else:
        why = "no network route to storage.googleapis.com, or GCS keeps failing"
    return error(f"gs://{bucket}: no answer from Cloud Storage within {seconds:.0f} s ({why}); "
                 f"--storage_timeout_s sets the limit")


def request_args() -> dict:
    """``timeout`` and ``retry`` for one google-cloud-storage request: the whole call, retries included, is bounded."""
    from google.api_core.retry import Retry

    seconds = timeout()
    return {"timeout": seconds, "retry": Retry(timeout=seconds)}


def gave_up(exc: BaseException) -> bool:
    """A request that timed out or ran out of retries (no network, no answer) rather than a GCS error reply."""
    import requests
    from google.api_core import exceptions as gexc

    return isinstance(exc, (gexc.RetryError, requests.exceptions.RequestException, TimeoutError))


@contextlib.contextmanager
def answered(bucket: str, error: type[ConversionError]) -> Iterator[None]:
    """Turns a google-cloud-storage request that got no answer (:func:`gave_up`) into :func:`no_answer`'s one
    line; GCS's own error replies pass through to the caller's handling."""
    try:
        yield
    except Exception as exc:
        if gave_up(exc):
            raise no_answer(bucket, timeout(), error) from None
        raise


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

    with answered(parse_gs(uri)[0], error):
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
    with answered(bucket, SourceError):
        try:
            blob = client().bucket(bucket).get_blob(name, **request_args())
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
    blob = client().bucket(bucket).blob(name, generation=generation)
    blob.metadata = {VERIFIED_MD5_KEY: md5}
    _gcs_call("object", f"gs://{bucket}/{name}", lambda: blob.patch(if_generation_match=generation, **request_args()),
              OutputError)


def compose(bucket: str, sources: list[str], dest: str, *, scratch_prefix: str) -> None:
    """Concatenate ``sources`` (in order) into ``dest``; more than 32 goes through a tree."""
    b = client().bucket(bucket)
    level = 0
    names = list(sources)
    temps: list[str] = []
    while len(names) > 32:
        grouped = []
        for i in range(0, len(names), 32):
            target = f"{scratch_prefix}compose-{level}-{i // 32:05d}"
            _gcs_call("object", f"gs://{bucket}/{target}",
                      lambda t=target, g=names[i:i + 32]: b.blob(t).compose([b.blob(s) for s in g], **request_args()),
                      OutputError)
            grouped.append(target)
        temps += grouped
        names = grouped
        level += 1
    _gcs_call("object", f"gs://{bucket}/{dest}",
              lambda: b.blob(dest).compose([b.blob(s) for s in names], **request_args()), OutputError)
    delete_objects(bucket, temps)


def list_folders(bucket: str, prefix: str) -> list[str]:
    """Names of the "folders" directly under ``prefix`` (one delimiter listing, not every object below)."""
    uri = f"gs://{bucket}/{prefix}"

    def folders() -> list[str]:
        pages = client().list_blobs(bucket, prefix=prefix, delimiter="/", **request_args())
        for _ in pages:  # the prefixes are filled in while the pages are read
            pass
        return sorted(p[len(prefix):].rstrip("/") for p in pages.prefixes)

    return _gcs_call("folder", uri, folders, OutputError)


def delete_objects(bucket: str, names: list[str]) -> None:
    """Delete objects; absent ones are not an error."""
    from google.api_core import exceptions as gexc

    b = client().bucket(bucket)
    for name in names:
        with answered(bucket, OutputError), contextlib.suppress(gexc.NotFound):
            b.blob(name).delete(**request_args())
