"""Meta's signed download URL: resolve per-file URLs, stage files into a bucket, verify md5.

Meta e-mails a CloudFront signed URL such as ``https://llama3-1.llamameta.net/*?Policy=…&Signature=…
&Key-Pair-Id=…``. Like ``llama download`` (llama-models ``cli/download.py``), each file's URL is the
URL with ``*`` replaced by ``<folder>/<file>``, where the folder depends on the model descriptor
(``Llama3.1-405B-Instruct:bf16-mp16`` → ``Llama-3.1-405B-Instruct-MP16``).

Two ways to use it:

* :func:`resolve_input` → ``{file name: url}`` for converting straight from the URL (the HTTP
  ByteSource reads tensors with Range requests). Each record's bytes are checked against the zip
  CRC-32 by the reader; a whole-file md5 needs every byte in order: see :class:`HashingSource`
  (inline, for a process reading a shard front to back) and :func:`verify_files` (a separate
  parallel pass).
* :func:`stage` copies the raw files into a local directory or ``gs://`` prefix (the tutorial's
  ``base/`` copy) with parallel ranged GETs into fixed-size parts, hashing in order as parts land.
  An interrupted stage resumes: finished parts are kept (read back from the destination to hash
  them), missing ones are fetched. Every write goes to an absolute offset or its own object, so a
  retry never appends twice. A file is published only after its md5 matches ``checklist.chk``.

Messages name the file, never the query string (which carries the signature).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import time
from typing import Callable, Iterable, Iterator

from rayconv.errors import ConversionError, SourceError
from rayconv.source.bytesource import ByteSource, RangeSource, open_source
from rayconv.source.http import HttpFile, format_time, policy_expiry, redact
from rayconv.storage import Location

log = logging.getLogger(__name__)

MiB = 1 << 20

# --------------------------------------------------------------------------------------------------
# Descriptors → server folders and file lists

#: Sizes hard-coded by llama-models (``llama_meta_pth_size``) because CloudFront rejects HEAD.
KNOWN_SHARD_BYTES = {
    "Llama-3.1-405B-MP16": 51_268_302_389,
    "Llama-3.1-405B-Instruct-MP16": 51_268_302_389,
    "Llama-3.1-405B-MP8": 101_470_976_045,
    "Llama-3.1-405B-Instruct-MP8": 101_470_976_045,
    "Llama-3.1-405B": 60_903_742_309,
    "Llama-3.1-405B-Instruct": 60_903_742_309,
}

_DESCRIPTOR = re.compile(
    r"^(?:meta-)?llama-?(?P<version>\d(?:\.\d)?)-(?P<size>\d+)b(?P<suffix>-instruct|-chat)?"
    r"(?::(?P<variant>[a-z0-9-]+))?$",
    re.IGNORECASE,
)


@dataclasses.dataclass(frozen=True)
class MetaModel:
    """Where a descriptor's files live on Meta's server."""

    descriptor: str
    folder: str
    shards: int
    fp8: bool
    shard_bytes: int | None
    #: Older folder names (``Meta-Llama-3.1-…``, llama3 ``download.sh`` paths), tried in order when
    #: the current name is not found.
    legacy_folders: tuple[str, ...] = ()

    @property
    def files(self) -> list[str]:
        """Files in ``llama download`` order: checklist, tokenizer, params, [fp8 scales], shards."""
        names = ["checklist.chk", "tokenizer.model", "params.json"]
        if self.fp8:
            names += [f"fp8_scales_{i}.pt" for i in range(self.shards)]
        return names + [f"consolidated.{i:02d}.pth" for i in range(self.shards)]


def meta_model(descriptor: str, folder: str | None = None) -> MetaModel:
    """Folder, shard count and known shard size for a Meta descriptor (``folder`` overrides)."""
    m = _DESCRIPTOR.match(descriptor.strip())
    if not m:
        raise SourceError(f"--model_path {descriptor!r} is not a Meta model descriptor "
                          f"(e.g. Llama3.1-405B-Instruct:bf16-mp16, Llama3.1-8B, Llama-2-7b)")
    version, size = m["version"], int(m["size"])
    suffix = (m["suffix"] or "").lower()
    variant = (m["variant"] or "").lower()
    instruct = suffix in ("-instruct", "-chat")
    legacy: list[str] = []
    fp8 = False
    if version == "2":
        name = f"llama-2-{size}b" + ("-chat" if instruct else "")
        shards = {7: 1, 13: 2, 70: 8}.get(size, 1)
    elif version == "3":
        base = f"Llama-3-{size}B" + ("-Instruct" if instruct else "")
        name = base
        legacy = [f"Meta-{base}", f"{size}b_" + ("instruction_tuned" if instruct else "pre_trained")]
        shards = 8 if size >= 70 else 1
    else:
        base = f"Llama-{version}-{size}B" + ("-Instruct" if instruct else "")
        name = base
        shards = 8 if size >= 70 else 1
        if version == "3.1" and size == 405:
            if variant == "bf16-mp16":
                name, shards = f"{base}-MP16", 16
            elif variant == "bf16-mp8":
                name, shards = f"{base}-MP8", 8
            elif variant in ("", "fp8", "fp8-mp8"):
                name, shards, fp8 = base, 8, True
                legacy.append(f"Meta-{base}-FP8")
            else:
                raise SourceError(f"--model_path {descriptor!r}: unknown 405B variant {variant!r} "
                                  f"(expected bf16-mp16, bf16-mp8, or none for FP8)")
        legacy.insert(0, f"Meta-{name}")
    return MetaModel(descriptor=descriptor, folder=folder or name, shards=shards, fp8=fp8,
                     shard_bytes=None if folder or _ignore_known_sizes() else KNOWN_SHARD_BYTES.get(name),
                     legacy_folders=() if folder else tuple(legacy))


def _ignore_known_sizes() -> bool:
    """``RAYCONV_META_SHARD_SIZES=ignore``: trust Content-Range instead of llama-models' published shard
    sizes (for a re-published release, or a synthetic checkpoint served under a real descriptor)."""
    return os.environ.get("RAYCONV_META_SHARD_SIZES", "").lower() == "ignore"


def descriptor_folder(descriptor: str, folder: str | None = None) -> str:
    """``Llama3.1-405B-Instruct:bf16-mp16`` → ``Llama-3.1-405B-Instruct-MP16``."""
    return meta_model(descriptor, folder).folder


def check_meta_url(meta_url: str) -> None:
    if "*" not in meta_url.split("?", 1)[0]:
        raise SourceError(f"--meta_url {redact(meta_url)} has no '*' placeholder; paste the whole URL "
                          f"from Meta's e-mail (it starts https://…llamameta.net/*)")
    if not meta_url.startswith(("https://", "http://")):
        raise SourceError(f"--meta_url {redact(meta_url)} is not an http(s) URL")


def file_urls(meta_url: str, descriptor: str, files: Iterable[str] | None = None,
              folder: str | None = None) -> dict[str, str]:
    """``{file: url}`` with every ``*`` replaced by ``<folder>/<file>`` (as ``llama download`` does)."""
    check_meta_url(meta_url)
    model = meta_model(descriptor, folder)
    names = list(files) if files is not None else model.files
    return {name: meta_url.replace("*", f"{model.folder}/{name}") for name in names}


def check_expiry(meta_url: str, *, warn_within: float = 3600.0, now: float | None = None) -> float | None:
    """Refuse an expired URL before starting; warn when it expires soon. Returns the expiry."""
    expiry = policy_expiry(meta_url)
    if expiry is None:
        log.warning("cannot read an expiry time from --meta_url (no CloudFront Policy parameter)")
        return None
    now = time.time() if now is None else now
    if expiry <= now:
        raise SourceError(f"--meta_url expired at {format_time(expiry)}; request a new download URL "
                          f"from Meta (links are valid for 24 hours)")
    if expiry - now < warn_within:
        log.warning("--meta_url expires at %s (in %d min); a download still running then fails with "
                    "403 and can be resumed with a fresh URL", format_time(expiry), (expiry - now) // 60)
    return expiry


def read_checklist(text: str | bytes, source: str = "checklist.chk") -> dict[str, str]:
    """Parse ``md5sum`` output (``<md5>  <name>`` per line; ``./`` and ``*`` prefixes allowed)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise SourceError(f"{source} is not a text md5 list") from None
    sums: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{32})\s+\*?(?:\./)?(.+)", line)
        if not m:
            raise SourceError(f"{source} line {number} is not '<md5>  <file>' (is it an error page "
                              f"saved by mistake?)")
        sums[m.group(2).strip()] = m.group(1).lower()
    if not sums:
        raise SourceError(f"{source} lists no files")
    return sums


@dataclasses.dataclass
class MetaFiles:
    """The resolved download: per-file URLs (in fetch order) and the md5 of each from checklist.chk."""

    model: MetaModel
    urls: dict[str, str]
    md5: dict[str, str]
    checklist: bytes


def resolve(meta_url: str, descriptor: str, *, folder: str | None = None,
            allow_unverified: bool = False) -> MetaFiles:
    """Check the URL, find the server folder (probing older names), read checklist.chk."""
    check_meta_url(meta_url)
    check_expiry(meta_url)
    model = meta_model(descriptor, folder)
    candidates = [model.folder, *model.legacy_folders]
    checklist = None
    first_error: SourceError | None = None
    for candidate in candidates:
        url = meta_url.replace("*", f"{candidate}/checklist.chk")
        try:
            source = HttpFile(url)
            checklist = source.read(0, source.size())
        except SourceError as exc:
            # CloudFront answers 403 for a missing key as well as for a bad signature.
            if "HTTP 404" not in str(exc) and "HTTP 403" not in str(exc):
                raise
            first_error = first_error or exc
            continue
        if candidate != model.folder:
            log.info("files for %s found under the older folder name %s", descriptor, candidate)
            model = dataclasses.replace(model, folder=candidate)
        break
    if checklist is None:
        tried = ", ".join(candidates)
        if "HTTP 403" in str(first_error):
            # Expired links and paths outside the signed resource both answer 403.
            raise SourceError(f"{model.folder}/checklist.chk: access denied (HTTP 403): the signed URL is "
                              f"expired or invalid, or does not cover {descriptor} (tried folders {tried})")
        if not allow_unverified:
            raise SourceError(f"missing file checklist.chk for {descriptor} on {redact(meta_url)} "
                              f"(HTTP 404; tried folders {tried}); pass the folder explicitly if Meta "
                              f"renamed it")
        log.warning("no checklist.chk for %s: files will be size-checked only", descriptor)
        md5: dict[str, str] = {}
        names = model.files[1:]
    else:
        md5 = read_checklist(checklist, f"{model.folder}/checklist.chk")
        names = _fetch_order(model, md5)
        missing = [n for n in names if n not in md5 and n != "checklist.chk"]
        if missing and not allow_unverified:
            raise SourceError(f"{model.folder}/checklist.chk has no md5 for {', '.join(missing)}")
        names = ["checklist.chk"] + [n for n in names if n != "checklist.chk"]
    urls = {name: meta_url.replace("*", f"{model.folder}/{name}") for name in names}
    return MetaFiles(model=model, urls=urls, md5=md5, checklist=checklist or b"")


def _fetch_order(model: MetaModel, md5: dict[str, str]) -> list[str]:
    """checklist.chk's files (the authority on what exists) ordered small-first like llama download."""
    names = list(md5)
    shards = sorted(n for n in names if re.fullmatch(r"consolidated\.\d+\.pth", n))
    if not shards:
        raise SourceError(f"{model.folder}/checklist.chk lists no consolidated.NN.pth shard")
    indices = [int(n.split(".")[1]) for n in shards]
    if indices != list(range(len(shards))):
        raise SourceError(f"{model.folder}/checklist.chk lists shards {indices}, not 00..{len(shards) - 1:02d}")
    if model.shard_bytes is not None and len(shards) != model.shards:
        raise SourceError(f"{model.folder}/checklist.chk lists {len(shards)} shards; {model.descriptor} "
                          f"has {model.shards}")
    if "params.json" not in md5:
        raise SourceError(f"{model.folder}/checklist.chk does not list params.json")
    others = [n for n in names if n not in shards]
    return sorted(others, key=lambda n: (n != "tokenizer.model", n != "params.json", n)) + shards


def resolve_input(meta_url: str, descriptor: str, *, folder: str | None = None) -> dict[str, str]:
    """``{file name: url}`` for converting straight from the URL (see :class:`HashingSource`)."""
    return resolve(meta_url, descriptor, folder=folder).urls


# --------------------------------------------------------------------------------------------------
# md5 of a ByteSource: ordered parallel reads, and inline hashing


def _ordered_blocks(source: ByteSource, start: int, stop: int, *, block: int, window: int,
                    executor: concurrent.futures.Executor) -> Iterator[memoryview]:
    """Yield [start, stop) in order as blocks, with up to ``window`` blocks read ahead in parallel."""
    pending: collections.deque = collections.deque()
    offset = start

    def fetch(at: int, n: int) -> memoryview:
        buf = memoryview(bytearray(n))
        source.readinto(at, buf)
        return buf

    try:
        while offset < stop or pending:
            while offset < stop and len(pending) < window:
                n = min(block, stop - offset)
                pending.append(executor.submit(fetch, offset, n))
                offset += n
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def md5_of(source: ByteSource, *, start: int = 0, stop: int | None = None, hasher=None,
           block: int = 32 * MiB, window: int = 6) -> "hashlib._Hash":
    """Hash bytes [start, stop) of ``source`` in order, reading ahead in parallel (bounded memory)."""
    hasher = hasher or hashlib.md5()
    stop = source.size() if stop is None else stop
    with concurrent.futures.ThreadPoolExecutor(window, thread_name_prefix="rayconv-md5") as pool:
        for buf in _ordered_blocks(source, start, stop, block=block, window=window, executor=pool):
            hasher.update(buf)
    return hasher


def verify_md5(source: ByteSource, expected: str, name: str, **kwargs) -> None:
    """One full read of ``source``; raises SourceError naming ``name`` on mismatch."""
    got = md5_of(source, **kwargs).hexdigest()
    if got != expected.lower():
        raise SourceError(f"{name}: md5 mismatch (checklist.chk says {expected}, the file has {got}); "
                          f"the file is corrupt or not the one the checklist describes")


def verify_files(uris: dict[str, str], md5: dict[str, str], *, parallel: int = 2, **kwargs) -> None:
    """Verify every file of ``uris`` that has an md5 (a separate pass, e.g. while converting)."""
    names = [n for n in uris if n in md5]
    with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
        futures = [pool.submit(verify_md5, open_source(uris[n]), md5[n], n, **kwargs) for n in names]
        for future in futures:
            future.result()


class HashingSource(RangeSource):
    """Wrap a ByteSource and md5 the bytes the caller reads, as long as they arrive in order.

    Built for a process that reads one shard front to back (index at the tail, data.pkl, then
    tensors in file order): each read that starts at the hashed frontier extends the hash; a small
    gap before it (zip local headers, padding) is fetched and hashed; concurrent in-order reads wait
    for the earlier ones (up to ``patience`` seconds for one not yet started) instead of losing
    their data. Reads behind the frontier, or far ahead of
    it, are not hashed. :meth:`finish` hashes whatever is left (for an in-order reader: nothing but
    the tail) and compares with ``expected``. Memory: nothing is retained beyond the caller's buffers.
    """

    def __init__(self, inner: ByteSource, expected_md5: str | None, name: str, *,
                 gap_limit: int = 4 * MiB, patience: float = 1.0) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.name = name
        self.expected = expected_md5.lower() if expected_md5 else None
        self.gap_limit = gap_limit
        self.patience = patience
        self._md5 = hashlib.md5()
        self._frontier = 0
        self._inflight: dict[int, int] = {}  # id → start offset
        self._cond = threading.Condition()
        self.refetched = 0  # bytes fetched only to fill gaps (for tests / reports)

    def size(self) -> int:
        return self.inner.size()

    @property
    def hashed(self) -> int:
        return self._frontier

    def readinto(self, offset: int, buffer: memoryview) -> None:
        token = object()
        with self._cond:
            self._inflight[id(token)] = offset
        try:
            self.inner.readinto(offset, buffer)
        except BaseException:
            with self._cond:
                del self._inflight[id(token)]
                self._cond.notify_all()
            raise
        with self._cond:
            del self._inflight[id(token)]
            # Wait while an earlier read that could still advance the frontier is in flight, and
            # give one not yet started (a worker pool racing) ``patience`` seconds to show up.
            deadline = time.monotonic() + self.patience
            while True:
                if any(self._frontier <= start < offset for start in self._inflight.values()):
                    self._cond.wait()
                    continue
                left = deadline - time.monotonic()
                if offset - self._frontier <= self.gap_limit or left <= 0:
                    break
                self._cond.wait(left)
            self._absorb(offset, memoryview(buffer).cast("B"))
            self._cond.notify_all()

    def _absorb(self, offset: int, view: memoryview) -> None:
        end = offset + len(view)
        if end <= self._frontier:
            return
        if offset > self._frontier:
            gap = offset - self._frontier
            if gap > self.gap_limit:
                return
            self._md5.update(self.inner.read(self._frontier, gap))
            self.refetched += gap
            self._frontier = offset
        self._md5.update(view[self._frontier - offset:])
        self._frontier = end

    def finish(self) -> str:
        """Hash the unread rest in order, compare with the expected md5, return the digest."""
        with self._cond:
            size = self.inner.size()
            if self._frontier < size:
                self.refetched += size - self._frontier
                md5_of(self.inner, start=self._frontier, stop=size, hasher=self._md5)
                self._frontier = size
            digest = self._md5.hexdigest()
        if self.expected and digest != self.expected:
            raise SourceError(f"{self.name}: md5 mismatch (checklist.chk says {self.expected}, "
                              f"the file has {digest})")
        return digest


# --------------------------------------------------------------------------------------------------
# Staging into a local directory or gs:// prefix

STAGING_DIR = ".rayconv-staging"


class _Parts:
    """Where a file's parts go while it is being staged. Subclasses: local file, GCS objects."""

    def __init__(self, dest: Location, name: str, size: int, part_size: int) -> None:
        self.dest, self.name, self.size, self.part_size = dest, name, size, part_size
        self.count = max(1, -(-size // part_size))

    def span(self, index: int) -> tuple[int, int]:
        start = index * self.part_size
        return start, min(self.size, start + self.part_size)


class _LocalParts(_Parts):
    """Parts written with pwrite at their offsets into ``<name>.partial``; done parts in a json."""

    def __init__(self, dest: Location, name: str, size: int, part_size: int) -> None:
        super().__init__(dest, name, size, part_size)
        self.path = os.path.join(dest.path, name)
        self.partial = self.path + ".partial"
        self.state_path = os.path.join(dest.path, STAGING_DIR, name + ".parts.json")
        os.makedirs(os.path.dirname(self.state_path), exist_ok=True)
        self._lock = threading.Lock()
        self._done: set[int] = set()
        self._fd = -1

    def open(self) -> set[int]:
        state = None
        if os.path.exists(self.state_path) and os.path.exists(self.partial):
            with open(self.state_path) as f:
                state = json.load(f)
        if state and state.get("size") == self.size and state.get("part_size") == self.part_size:
            self._done = set(state["done"])
        else:
            self._done = set()
            if os.path.exists(self.partial):
                os.remove(self.partial)
        self._fd = os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self._fd, self.size)
        return set(self._done)

    def write(self, index: int, data: memoryview) -> None:
        start, _ = self.span(index)
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], start + done)
        os.fsync(self._fd)
        with self._lock:
            self._done.add(index)
            tmp = self.state_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"size": self.size, "part_size": self.part_size, "done": sorted(self._done)}, f)
            os.replace(tmp, self.state_path)

    def read(self, index: int, buf: memoryview) -> None:
        start, _ = self.span(index)
        got = 0
        while got < len(buf):
            n = os.preadv(self._fd, [buf[got:]], start + got)
            if n <= 0:
                raise SourceError(f"{self.partial}: short read while resuming")
            got += n

    def finalize(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        os.replace(self.partial, self.path)
        os.remove(self.state_path)

    def discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for path in (self.partial, self.state_path):
            if os.path.exists(path):
                os.remove(path)


class _GcsParts(_Parts):
    """Parts as objects ``<dest>/.rayconv-staging/<name>/part-NNNNN``, composed into ``<name>``.

    Each part is one single-request upload (written whole or not at all), so an existing part is a
    finished part. A composite object has no md5 in GCS, so the crc32c computed while hashing is
    compared with the composed object's crc32c: the bytes in the bucket are the bytes hashed.
    """

    def __init__(self, dest: Location, name: str, size: int, part_size: int) -> None:
        super().__init__(dest, name, size, part_size)
        self.scratch = dest.join(STAGING_DIR, name)

    def _key(self, index: int) -> str:
        return f"part-{index:05d}"

    def open(self) -> set[int]:
        manifest = {"size": self.size, "part_size": self.part_size}
        raw = self.scratch.read_bytes("manifest.json")
        if raw is None or json.loads(raw) != manifest:
            self.scratch.delete_all()
            self.scratch.write_bytes("manifest.json", json.dumps(manifest).encode())
            return set()
        return {int(k[len("part-"):]) for k in self.scratch.list_keys("part-")}

    def write(self, index: int, data: memoryview) -> None:
        self.scratch.write_bytes(self._key(index), data.obj if isinstance(data.obj, bytes) else bytes(data))

    def read(self, index: int, buf: memoryview) -> None:
        from rayconv.source.gcs import GcsObject

        start, stop = self.span(index)
        GcsObject(self.scratch.join(self._key(index)).uri, size=stop - start).readinto(0, buf)

    def finalize(self, crc32c: int | None = None) -> None:
        from rayconv.source.gcs import compose, object_info

        bucket = self.dest.bucket
        names = [self.scratch.join(self._key(i)).path for i in range(self.count)]
        target = self.dest.join(self.name).path
        compose(bucket, names, target, scratch_prefix=self.scratch.path + "/")
        info = object_info(bucket, target)
        problem = None
        if info is None or info["size"] != self.size:
            problem = f"the composed object has {info and info['size']} bytes, expected {self.size}"
        elif crc32c is not None and info.get("crc32c"):
            import base64

            if int.from_bytes(base64.b64decode(info["crc32c"]), "big") != crc32c:
                problem = "the object in the bucket does not match the bytes downloaded (crc32c)"
        if problem:
            from rayconv.source.gcs import delete_objects

            delete_objects(bucket, [target])
            self.scratch.delete_all()  # the parts are suspect: fetch them again
            raise SourceError(f"{self.name}: {problem}; the staged copy was deleted, rerun to stage it again")
        self.scratch.delete_all()

    def discard(self) -> None:
        self.scratch.delete_all()


def _crc32c():
    try:
        import google_crc32c

        return google_crc32c.Checksum()
    except ImportError:
        return None


@dataclasses.dataclass
class StageReport:
    """What :func:`stage` did, per file: ``'cached'`` (already staged and verified) or bytes fetched."""

    dest: Location
    fetched: dict[str, int] = dataclasses.field(default_factory=dict)
    reused: dict[str, int] = dataclasses.field(default_factory=dict)
    cached: list[str] = dataclasses.field(default_factory=list)


def _marker_key(name: str) -> str:
    return f"{STAGING_DIR}/{name}.verified"


def _recorded_md5(dest: Location, name: str) -> str | None:
    """md5 recorded by a finished stage (marker) or by GCS (non-composite objects), else None."""
    marker = dest.read_bytes(_marker_key(name))
    if marker and marker.strip():
        return marker.decode().strip()
    if not dest.is_local:
        from rayconv.source.gcs import object_info

        info = object_info(dest.bucket, dest.join(name).path)
        return info["md5"] if info else None
    return None


def _already_staged(dest: Location, name: str, md5: str | None, size: int | None) -> bool:
    """True when ``dest/name`` is present and known to match ``md5`` (marker, GCS md5, or hashing)."""
    present = dest.size(name)
    if present is None or (size is not None and present != size):
        return False
    if md5 is None:
        return dest.read_bytes(_marker_key(name)) is not None
    recorded = _recorded_md5(dest, name)
    if recorded is not None:
        return recorded == md5
    if dest.is_local:
        # A file put there by someone else (e.g. an earlier `llama download`): hash it once.
        if md5_of(open_source(dest.join(name).uri)).hexdigest() == md5:
            dest.write_bytes(_marker_key(name), md5.encode())
            return True
    return False


def _stage_file(url: str, name: str, dest: Location, md5: str | None, *, known_size: int | None,
                part_size: int, concurrency: int, memory_budget: int,
                progress: Callable[[str, int, int], None] | None, report: StageReport,
                report_lock: threading.Lock) -> None:
    if _already_staged(dest, name, md5, known_size):
        log.info("%s: already staged and verified", name)
        with report_lock:
            report.cached.append(name)
        return
    source = HttpFile(url, chunk_size=1 << 62)  # one GET per part; parallelism comes from parts
    size = source.size()
    if known_size is not None and size != known_size:
        raise SourceError(f"{name}: the server has {size} bytes, Meta's published size is {known_size}")
    # Keep a file to at most ~1000 parts (GCS compose trees, state files), within the budget.
    part_size = max(part_size, -(-size // 1000))
    part_size = -(-part_size // MiB) * MiB
    # Memory: parts waiting to be hashed (window) plus, for gs://, one more copy per upload in
    # flight (tensorstore copies the bytes it sends): keep (window + workers) parts in the budget.
    slots = max(2, memory_budget // part_size)
    workers = max(1, min(concurrency, slots // 2 if not dest.is_local else slots))
    window = max(workers, min(2 * concurrency, slots - (0 if dest.is_local else workers)))
    if size <= part_size:
        data = source.read(0, size) if size else b""
        _check_md5(name, md5, hashlib.md5(data).hexdigest())
        dest.write_bytes(name, data)
        dest.write_bytes(_marker_key(name), (md5 or "").encode())
        with report_lock:
            report.fetched[name] = size
        if progress:
            progress(name, size, size)
        return

    parts = (_LocalParts if dest.is_local else _GcsParts)(dest, name, size, part_size)
    done = parts.open()
    if done:
        log.info("%s: resuming, %d of %d parts already staged", name, len(done), parts.count)
    md5_hash, crc = hashlib.md5(), (None if dest.is_local else _crc32c())
    fetched = reused = 0
    abort = threading.Event()

    def job(index: int) -> tuple[int, memoryview, bool]:
        if abort.is_set():
            raise SourceError(f"{name}: staging aborted")
        start, stop = parts.span(index)
        buf = memoryview(bytearray(stop - start))
        if index in done:
            parts.read(index, buf)
            return index, buf, False
        source.readinto(start, buf)
        if not dest.is_local:
            buf = memoryview(bytes(buf))  # the upload and crc32c need bytes (the bytearray is freed)
        parts.write(index, buf)
        return index, buf, True

    hashed = 0
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=f"stage-{name}") as pool:
        pending: collections.deque = collections.deque()
        next_index = 0
        try:
            while next_index < parts.count or pending:
                while next_index < parts.count and len(pending) < window:
                    pending.append(pool.submit(job, next_index))
                    next_index += 1
                index, buf, was_fetched = pending.popleft().result()
                md5_hash.update(buf)
                if crc is not None:
                    crc.update(buf.obj if isinstance(buf.obj, bytes) else bytes(buf))
                hashed += len(buf)
                if was_fetched:
                    fetched += len(buf)
                else:
                    reused += len(buf)
                del buf
                if progress:
                    progress(name, hashed, size)
        except BaseException:
            abort.set()
            for future in pending:
                future.cancel()
            raise
    got = md5_hash.hexdigest()
    if md5 is not None and got != md5:
        parts.discard()
        _check_md5(name, md5, got, staged=True)
    if isinstance(parts, _GcsParts):
        parts.finalize(int.from_bytes(crc.digest(), "big") if crc is not None else None)
    else:
        parts.finalize()
    dest.write_bytes(_marker_key(name), (md5 or "").encode())
    with report_lock:
        report.fetched[name] = fetched
        report.reused[name] = reused
    log.info("%s: staged (%d bytes fetched, %d reused), md5 verified", name, fetched, reused)


def _check_md5(name: str, expected: str | None, got: str, staged: bool = False) -> None:
    if expected is not None and got != expected:
        tail = "; the partial copy was deleted, rerun to download it again" if staged else ""
        raise SourceError(f"{name}: md5 mismatch (checklist.chk says {expected}, downloaded bytes "
                          f"have {got}){tail}")


def stage(meta_url: str, descriptor: str, dest: Location | str, *, folder: str | None = None,
          files: Iterable[str] | None = None, part_size: int = 32 * MiB, concurrency: int = 8,
          parallel_files: int = 2, memory_budget: int = 1024 * MiB, allow_unverified: bool = False,
          progress: Callable[[str, int, int], None] | None = None,
          report: StageReport | None = None) -> Location:
    """Copy the model's raw files from Meta's URL into ``dest`` (local dir or gs:// prefix).

    Resumable: rerun with the same (or a fresh) URL after any interruption. Each file is
    md5-checked against checklist.chk before it appears under its own name; ``checklist.chk`` is
    written last, so a destination holding it is complete. Returns ``dest`` (the Location to
    convert from); pass a :class:`StageReport` to learn what was fetched, reused or already there.

    Memory: about ``memory_budget`` (parts in flight, split across ``parallel_files``); each file
    uses up to ``concurrency`` parallel ranged GETs of ``part_size`` (raised for files over
    ~1000 parts).
    """
    dest = Location.parse(dest) if isinstance(dest, str) else dest
    meta = resolve(meta_url, descriptor, folder=folder, allow_unverified=allow_unverified)
    names = [n for n in meta.urls if n != "checklist.chk"]
    if files is not None:
        wanted = set(files)
        names = [n for n in names if n in wanted]
    dest.check_writable()
    report = report if report is not None else StageReport(dest=dest)
    report.dest = dest
    lock = threading.Lock()
    shard_bytes = meta.model.shard_bytes
    budget = max(part_size, memory_budget // max(1, parallel_files))

    def one(name: str) -> None:
        known = shard_bytes if name.startswith("consolidated.") else None
        _stage_file(meta.urls[name], name, dest, meta.md5.get(name), known_size=known,
                    part_size=part_size, concurrency=concurrency, memory_budget=budget,
                    progress=progress, report=report, report_lock=lock)

    with concurrent.futures.ThreadPoolExecutor(max(1, parallel_files), thread_name_prefix="stage") as pool:
        futures = [pool.submit(one, name) for name in names]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    if meta.checklist:
        dest.write_bytes("checklist.chk", meta.checklist)
    return dest


def verify_staged(dest: Location | str, *, names: Iterable[str] | None = None) -> None:
    """Check a staged (or hand-copied) directory against its checklist.chk: cheap when the stage
    markers or GCS md5 metadata are there, otherwise by hashing."""
    dest = Location.parse(dest) if isinstance(dest, str) else dest
    raw = dest.read_bytes("checklist.chk")
    if raw is None:
        raise SourceError(f"missing file {dest.join('checklist.chk').uri}")
    sums = read_checklist(raw, dest.join("checklist.chk").uri)
    for name in (names if names is not None else sums):
        if name not in sums:
            raise SourceError(f"{dest.uri}/checklist.chk has no md5 for {name}")
        if dest.size(name) is None:
            raise SourceError(f"missing file {dest.join(name).uri}")
        known = _recorded_md5(dest, name)
        got = known if known is not None else md5_of(open_source(dest.join(name).uri)).hexdigest()
        _check_md5(dest.join(name).uri, sums[name], got)


__all__ = [
    "ConversionError", "HashingSource", "MetaFiles", "MetaModel", "StageReport", "check_expiry",
    "descriptor_folder", "file_urls", "md5_of", "meta_model", "read_checklist", "resolve",
    "resolve_input", "stage", "verify_files", "verify_md5", "verify_staged",
]
