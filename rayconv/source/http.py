"""HTTP(S) byte source with Range requests, made for Meta's CloudFront signed URLs.

* Size comes from the ``Content-Range`` of a one-byte ranged GET: CloudFront rejects HEAD on these
  URLs (llama-models hard-codes 405B sizes for that reason).
* A large ``readinto`` is split into ``chunk_size`` sub-ranges fetched in parallel by a bounded,
  process-wide thread pool, each streamed straight into the caller's buffer (no whole-range copy).
* A dropped connection is resumed from the last byte received, with a fresh ``Range`` for the
  rest; bytes are written at absolute offsets into the buffer, so a retry can never duplicate data
  (the append-on-retry bug of ``llama download``).
* 403 → "signed URL expired" (when the policy's epoch time is past) or "invalid"; 404 → missing
  file (both :class:`HttpStatusError`, with ``.status``); 416 / short object → truncated. Messages
  name the file; the query string (the signature) is never put in a message or log line: use
  :func:`redact` for anything shown to a user.
* A server that stops sending is noticed after ``--http_timeout_s`` (default 60 s) without a byte; every
  retry is logged with the file and the byte range it waits for.
* Sizes, concurrency, retries and the timeout are this process's :class:`rayconv.tunables.Tunables` (installed
  by the driver, and by each Ray worker from its job context), unless a caller passes them.
"""

from __future__ import annotations

import base64
import concurrent.futures
import datetime
import logging
import os
import random
import re
import threading
import time
import urllib.parse

import urllib3

from rayconv import jsonio, tunables
from rayconv.errors import SourceError
from rayconv.process_local import per_process
from rayconv.source.bytesource import RangeSource, register_scheme

log = logging.getLogger(__name__)

MiB = 1 << 20
#: CloudFront refuses single GETs larger than this (llama-models: "Cloudfront max chunk size").
MAX_GET = 27_000_000_000
_READ_BLOCK = 4 * MiB  # bytes per socket read call (bounded copy through urllib3)

RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class HttpStatusError(SourceError):
    """The server answered with an HTTP error status (``.status``) that retrying does not fix."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def check_url(url: str, what: str = "URL") -> urllib.parse.SplitResult:
    """Parse an http(s) URL or raise one line naming what is wrong (host, port, scheme), never the query."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises ValueError when out of range or not a number
    except ValueError as exc:
        raise SourceError(f"{what} {redact(url)} is malformed: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise SourceError(f"{what} {redact(url)} is not an http(s) URL")
    if not parts.hostname:
        raise SourceError(f"{what} {redact(url)} names no host")
    if port == 0:
        raise SourceError(f"{what} {redact(url)} has port 0")
    return parts


def redact(url: str) -> str:
    """The URL without query string, fragment or credentials: safe to print or log (never raises)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
    except ValueError:
        # Malformed host or port: show what precedes the query and any credentials, nothing else.
        head = url.split("?", 1)[0].split("#", 1)[0]
        scheme, sep, rest = head.partition("://")
        netloc, slash, path = rest.partition("/")
        return f"{scheme}{sep}{netloc.rsplit('@', 1)[-1]}{slash}{path}" if sep else head


def display_name(url: str) -> str:
    """The file's path on the server (e.g. ``Llama-3.1-405B-MP16/consolidated.00.pth``)."""
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path).lstrip("/")
    return path or redact(url)


#: 2100-01-01 UTC: later than any signed URL's expiry, and a time datetime can format.
MAX_EPOCH = 4102444800.0


def policy_expiry(url: str) -> float | None:
    """``DateLessThan.AWS:EpochTime`` of a CloudFront ``Policy`` query parameter, or None."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    policy = (query.get("Policy") or [""])[0]
    if not policy:
        return None
    try:
        # CloudFront's URL-safe base64 uses '-', '_', '~' for '+', '=', '/'.
        raw = policy.translate(str.maketrans("-_~", "+=/"))
        raw += "=" * (-len(raw) % 4)
        doc = jsonio.loads(base64.b64decode(raw))  # JSONError is a ValueError
        epochs = [st["Condition"]["DateLessThan"]["AWS:EpochTime"] for st in doc.get("Statement", [])]
        expiry = float(min(epochs)) if epochs else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    # A time a date can show (CloudFront's are seconds since 1970, ten digits): no inf, no year 33658.
    return expiry if expiry is not None and 0 <= expiry < MAX_EPOCH else None


def format_time(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _make_pool() -> urllib3.PoolManager:
    kwargs = dict(num_pools=16, maxsize=max(4, 2 * tunables.current().http_concurrency), block=False, retries=False)
    try:
        import certifi

        kwargs["ca_certs"] = certifi.where()
    except ImportError:
        pass
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        return urllib3.ProxyManager(proxy, **kwargs)
    return urllib3.PoolManager(**kwargs)


#: Per-process connection pool and sub-request threads (rebuilt after fork), sized by the tunables installed
#: before the process's first read.
_pool = per_process(_make_pool)
_executor = per_process(lambda: concurrent.futures.ThreadPoolExecutor(tunables.current().http_concurrency,
                                                                      thread_name_prefix="rayconv-http"))


#: Sizes already probed, per full signed URL (the query names one grant): a file probed under one URL keeps its
#: size for this process. Not per path: the same path under another URL may be another file (republished, or
#: another server on a reused host:port), and a size assumed from it fails "changed size on the server".
_SIZES: dict[str, int] = {}


class HttpFile(RangeSource):
    """A ByteSource over an HTTP(S) URL (``uri`` keeps the full URL so workers can reopen it)."""

    def __init__(self, url: str, *, size: int | None = None, chunk_size: int | None = None,
                 retries: int | None = None, timeout: float | None = None) -> None:
        check_url(url)
        self.uri = url
        self.name = display_name(url)
        knobs = tunables.current()
        self.chunk_size = max(1, min(chunk_size or knobs.http_chunk_mb * MiB, MAX_GET))
        self.retries = knobs.http_retries if retries is None else retries
        self.timeout_s = knobs.http_timeout_s if timeout is None else timeout
        self.timeout = urllib3.Timeout(connect=min(30.0, self.timeout_s), read=self.timeout_s)
        self._size = size if size is not None else _SIZES.get(url)

    def __repr__(self) -> str:
        return f"HttpFile({redact(self.uri)!r})"

    # -- errors -----------------------------------------------------------------------------------
    def _status_error(self, status: int, what: str) -> HttpStatusError:
        if status == 403:
            expiry = policy_expiry(self.uri)
            if expiry is not None and time.time() >= expiry:
                return HttpStatusError(f"{self.name}: the signed URL expired at {format_time(expiry)} (HTTP 403); "
                                       f"request a new URL from Meta and rerun (finished work is kept)", status)
            return HttpStatusError(f"{self.name}: access denied (HTTP 403): the signed URL is expired or "
                                   f"invalid, or does not cover this file", status)
        if status == 404:
            return HttpStatusError(f"missing file {self.name} on {redact(self.uri)} (HTTP 404)", status)
        return HttpStatusError(f"{self.name}: HTTP {status} while {what}", status)

    def _reason(self, exc: BaseException) -> str:
        """Why an attempt failed, for logs and the final error (no URL: urllib3 messages carry it)."""
        if isinstance(exc, _Transient):
            return str(exc)
        if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
            return f"no connection within {min(30.0, self.timeout_s):g} s"
        if isinstance(exc, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
            return f"no data for {self.timeout_s:g} s (--http_timeout_s)"
        return type(exc).__name__

    # -- ByteSource -------------------------------------------------------------------------------
    def size(self) -> int:
        if self._size is None:
            self._size = self._probe_size()
            _SIZES[self.uri] = self._size
        return self._size

    def _probe_size(self) -> int:
        failures = 0
        while True:
            try:
                resp = _pool().request(
                    "GET", self.uri, headers={"Range": "bytes=0-0", "Accept-Encoding": "identity"},
                    preload_content=False, decode_content=False, timeout=self.timeout, redirect=True)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                failures += 1
                if failures > self.retries:
                    raise SourceError(f"{self.name}: cannot connect to {redact(self.uri)} after {self.retries} "
                                      f"retries: {self._reason(exc)}") from None
                log.warning("%s: waiting for its size (bytes 0-0): %s; retry %d of %d", self.name,
                            self._reason(exc), failures, self.retries)
                _backoff(failures)
                continue
            try:
                status = resp.status
                if status in RETRYABLE_STATUS and failures < self.retries:
                    failures += 1
                    log.warning("%s: HTTP %d while reading its size; retry %d of %d", self.name, status,
                                failures, self.retries)
                    _backoff(failures)
                    continue
                if status == 206:
                    total = _content_range_total(resp.headers.get("Content-Range"))
                    if total is None:
                        raise SourceError(f"{self.name}: server sent no usable Content-Range header")
                    return total
                if status == 416:  # empty file
                    total = _content_range_total(resp.headers.get("Content-Range"))
                    return total or 0
                if status == 200 and resp.headers.get("Content-Length") is not None:
                    return int(resp.headers["Content-Length"])
                raise self._status_error(status, "reading its size")
            finally:
                if resp.status == 200:  # the server ignored Range: don't download the whole body
                    resp.close()
                    resp.release_conn()
                else:
                    resp.drain_conn()

    def readinto(self, offset: int, buffer: memoryview) -> None:
        buffer = memoryview(buffer).cast("B")
        length = len(buffer)
        if length == 0:
            return
        self.check_range(offset, length, self.name, holder="the server")
        step = self.chunk_size
        if length <= step:
            self._get_range(offset, buffer, None)
            return
        abort = threading.Event()
        executor = _executor()
        futures = [executor.submit(self._get_range, offset + a, buffer[a:a + step], abort)
                   for a in range(0, length, step)]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
        except BaseException:
            abort.set()
            for future in futures:
                future.cancel()
            concurrent.futures.wait(futures)
            raise

    def _get_range(self, start: int, view: memoryview, abort: threading.Event | None) -> None:
        """Fill ``view`` with bytes [start, start+len(view)); resume after drops, never duplicate."""
        n = len(view)
        got = 0
        failures = 0
        last_reason = ""
        while got < n:
            if abort is not None and abort.is_set():
                raise SourceError(f"{self.name}: read aborted")
            first = start + got
            resp = None
            try:
                resp = _pool().request(
                    "GET", self.uri,
                    headers={"Range": f"bytes={first}-{start + n - 1}", "Accept-Encoding": "identity"},
                    preload_content=False, decode_content=False, timeout=self.timeout, redirect=True)
                status = resp.status
                if status == 206:
                    rng = _content_range(resp.headers.get("Content-Range"))
                    if rng is None or rng[0] != first:
                        raise SourceError(f"{self.name}: server answered a range request with a wrong "
                                          f"Content-Range")
                    if self._size is not None and rng[2] is not None and rng[2] != self._size:
                        raise SourceError(f"{self.name} changed size on the server "
                                          f"({self._size} → {rng[2]} bytes)")
                elif status == 200:
                    if first != 0:
                        raise SourceError(f"{self.name}: the server ignores HTTP Range requests")
                elif status == 416:
                    total = _content_range_total(resp.headers.get("Content-Range"))
                    raise SourceError(f"{self.name} is truncated: needs bytes up to {start + n}, "
                                      f"the server has {total if total is not None else 'fewer'}")
                elif status in RETRYABLE_STATUS:
                    raise _Transient(f"HTTP {status}")
                else:
                    raise self._status_error(status, f"reading bytes {first}-{start + n - 1}")
                while got < n:
                    block = resp.read(min(_READ_BLOCK, n - got))
                    if not block:
                        raise _Transient("connection closed early")
                    view[got:got + len(block)] = block
                    got += len(block)
                    failures = 0  # progress resets the retry budget
                    if abort is not None and abort.is_set():
                        break
            except SourceError:
                raise
            except (_Transient, urllib3.exceptions.HTTPError, OSError) as exc:
                failures += 1
                last_reason = self._reason(exc)
                if failures > self.retries:
                    raise SourceError(f"{self.name}: download failed at byte {start + got} (reading bytes "
                                      f"{start}-{start + n - 1}) after {self.retries} retries: {last_reason}") from None
                log.warning("%s: waiting for bytes %d-%d: %s; retry %d of %d", self.name, start + got,
                            start + n - 1, last_reason, failures, self.retries)
                _backoff(failures)
            finally:
                if resp is not None:
                    if got >= n and resp.status == 206:
                        resp.release_conn()
                    else:  # unread body left: drop the connection rather than drain it
                        resp.close()
                        resp.release_conn()


class _Transient(Exception):
    pass


def _backoff(failures: int) -> None:
    time.sleep(min(30.0, 0.2 * 2 ** (failures - 1)) * (0.75 + 0.5 * random.random()))


_CR = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _content_range(value: str | None) -> tuple[int, int, int | None] | None:
    m = _CR.match(value or "")
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), None if m.group(3) == "*" else int(m.group(3))


def _content_range_total(value: str | None) -> int | None:
    m = re.search(r"/(\d+)\s*$", value or "")
    return int(m.group(1)) if m else None


register_scheme("http://", HttpFile)
register_scheme("https://", HttpFile)
