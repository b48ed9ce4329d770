"""md5 against Meta's ``checklist.chk``: parse it, hash ByteSources in order, verify an input's files.

``checklist.chk`` is ``md5sum`` output. An md5 needs every byte of a file in order, so it cannot ride
along with the conversion's reads: the plan spreads one shard's byte ranges over many units and
workers (row blocks, column slices), and no process reads a shard front to back. Verifying is
therefore one extra ordered read per file — except where storage already knows the md5: a
non-composite gs:// object carries the md5 GCS computed on upload, and an object composed by
rayconv's staging carries the md5 staging verified. For a local input that read runs *beside* the
conversion (:class:`BackgroundMd5`: a bounded number of threads, one on a small machine), and the
driver commits nothing until it has matched (rayconv/engine/md5gate.py); remote files are checked
before converting by :func:`verify_input` (:func:`md5_of` reads ahead in parallel blocks so a remote
file streams at full speed, files are hashed in parallel): a second download of every shard beside
the conversion's own reads would compete with them for the network.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import os
import re
import threading
import time
from typing import Iterator, Mapping

from rayconv.errors import SourceError
from rayconv.progress import LOG, human_bytes
from rayconv.source.bytesource import ByteSource, open_source

MiB = 1 << 20
CHECKLIST = "checklist.chk"


def read_checklist(text: str | bytes, source: str = CHECKLIST) -> dict[str, str]:
    """Parse ``md5sum`` output (``<md5>  <name>`` per line; ``./`` and ``*`` prefixes allowed).

    Names are returned as written; callers that act on them (download, staging) validate them with
    :func:`rayconv.catalog.checkpoint_file_kind`. A name listed twice with different sums is refused.
    """
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
        name, digest = m.group(2).strip(), m.group(1).lower()
        if sums.get(name, digest) != digest:
            raise SourceError(f"{source} lists {name!r} twice with different md5 sums")
        sums[name] = digest
    if not sums:
        raise SourceError(f"{source} lists no files")
    return sums


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
           block: int = 8 * MiB, window: int = 4) -> "hashlib._Hash":
    """Hash bytes [start, stop) of ``source`` in order, reading ahead in parallel (memory: block × window)."""
    hasher = hasher or hashlib.md5()
    stop = source.size() if stop is None else stop
    with concurrent.futures.ThreadPoolExecutor(window, thread_name_prefix="rayconv-md5") as pool:
        for buf in _ordered_blocks(source, start, stop, block=block, window=window, executor=pool):
            hasher.update(buf)
    return hasher


def mismatch(name: str, expected: str, got: str, tail: str = "") -> SourceError:
    return SourceError(f"{name}: md5 mismatch ({CHECKLIST} says {expected}, the file has {got}); the file is "
                       f"corrupt or not the one the checklist describes{tail}")


def verify_md5(source: ByteSource, expected: str, name: str, **kwargs) -> None:
    """One full read of ``source``; raises SourceError naming ``name`` on mismatch."""
    got = md5_of(source, **kwargs).hexdigest()
    if got != expected.lower():
        raise mismatch(name, expected, got)


def stored_md5(uri: str) -> str | None:
    """The md5 storage already knows for ``uri`` without reading it: a non-composite gs:// object's
    (computed by GCS on upload), or the one rayconv's staging verified and attached to the composed
    object. None for local files, other composite objects and URLs."""
    if not uri.startswith("gs://"):
        return None
    from rayconv.gcs_api import object_info, parse_gs

    info = object_info(*parse_gs(uri))
    if info is None:
        return None
    return info["md5"] or info["verified_md5"]


def require_sums(uris: Mapping[str, str], sums: Mapping[str, str]) -> None:
    """Every file to check must be listed in the checklist (one line naming those that are not)."""
    missing = [name for name in uris if name not in sums]
    if missing:
        raise SourceError(f"{CHECKLIST} has no md5 for {', '.join(sorted(missing))}")


def verify_files(uris: Mapping[str, str], md5: Mapping[str, str], *, parallel: int | None = None,
                 use_stored: bool = True, **kwargs) -> dict[str, str]:
    """Check every file of ``uris`` against ``md5`` (all must be listed), files in parallel.

    Returns ``{name: 'stored' | 'hashed'}``: how each was checked. The first mismatch raises.
    """
    require_sums(uris, md5)
    how: dict[str, str] = {}

    def one(name: str) -> None:
        known = stored_md5(uris[name]) if use_stored else None
        if known is not None:
            how[name] = "stored"
            if known != md5[name]:
                raise mismatch(uris[name].split("?", 1)[0], md5[name], known)
            return
        how[name] = "hashed"
        verify_md5(open_source(uris[name]), md5[name], uris[name].split("?", 1)[0], **kwargs)

    parallel = parallel or max(1, min(len(uris), os.cpu_count() or 1, 8))
    # Largest first, so the longest hash starts at once.
    names = sorted(uris, key=lambda n: not n.startswith("consolidated."))
    with concurrent.futures.ThreadPoolExecutor(parallel, thread_name_prefix="rayconv-verify") as pool:
        futures = [pool.submit(one, name) for name in names]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return how


def _checklist_files(files: Mapping[str, str], display: str, names: list[str]) -> tuple[
        dict[str, str], dict[str, str], dict[str, int]]:
    """(sums from the input's checklist.chk, {name: uri} of ``names``, {name: size}) for checking ``names``."""
    source = open_source(files[CHECKLIST])
    sums = read_checklist(source.read(0, source.size()), f"{display}/{CHECKLIST}")
    uris = {name: files[name] for name in names}
    sizes = {name: open_source(uri).size() for name, uri in uris.items()}
    return sums, uris, sizes


def verify_input(files: Mapping[str, str], display: str, names: list[str]) -> None:
    """Check the files ``convert`` reads (``names``) against the input's ``checklist.chk``, if it has one.

    A demanding user expects a copy of 820 GB that was moved around to be checked before it becomes
    a checkpoint; the cost is one ordered read of each file, in parallel (``--skip_md5`` skips it).
    Raises SourceError (one line) on a mismatch, a missing sum, or an unreadable checklist.
    """
    if CHECKLIST not in files:
        LOG.info("No %s in %s: md5 not checked (each tensor's CRC-32 still is)", CHECKLIST, display)
        return
    sums, uris, sizes = _checklist_files(files, display, names)
    LOG.info("Checking md5 of %d files (%s) against %s (--skip_md5 skips this)", len(uris),
             human_bytes(sum(sizes.values())), CHECKLIST)
    start = time.monotonic()
    how = verify_files(uris, sums)
    seconds = max(time.monotonic() - start, 1e-6)
    hashed = sum(sizes[name] for name, way in how.items() if way == "hashed")
    LOG.info("md5 of %d files matches %s in %.1f s (%s hashed, %.0f MB/s; %d from GCS object metadata)",
             len(uris), CHECKLIST, seconds, human_bytes(hashed), hashed / 1e6 / seconds,
             len(uris) - sum(1 for way in how.values() if way == "hashed"))


def background_threads() -> int:
    """Threads hashing beside the conversion: a quarter of the cores, 1 to 8.

    md5 runs at ~600 MB/s per core, the conversion at ~190 MB of input per CPU-second, so hashing is
    about a quarter of the job's CPU (190 / (190 + 600)): with a quarter of the cores it ends about when
    the conversion does, and on a 2-core machine one thread takes at most one core from it."""
    return max(1, min(8, (os.cpu_count() or 1) // 4))


class BackgroundMd5:
    """The md5 pass over local files, run in daemon threads while the job converts.

    Each thread streams one file at a time through one reused block buffer; :class:`LocalFile` drops
    the pages it read (``POSIX_FADV_DONTNEED``), as for the conversion's own reads, so an 800 GB input
    does not crowd the page cache. The first mismatch (or unreadable file) stops the pass: the job
    fails anyway. Nothing here decides what may be committed; the driver asks :meth:`failure` and
    :meth:`matched` (rayconv/engine/md5gate.py).
    """

    def __init__(self, uris: Mapping[str, str], sums: Mapping[str, str], sizes: Mapping[str, int], *,
                 threads: int = 1, block: int = 8 * MiB) -> None:
        require_sums(uris, sums)
        self.uris, self.sums, self.sizes, self.block = dict(uris), dict(sums), dict(sizes), block
        self._todo = sorted(uris, key=lambda n: n.startswith("consolidated."))  # small files first: fail fast
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failures: list[tuple[str, BaseException]] = []
        self._matched: set[str] = set()
        self.started = time.monotonic()
        self.seconds = 0.0
        self._threads = [threading.Thread(target=self._work, name=f"rayconv-md5-{i}", daemon=True)
                         for i in range(max(1, min(threads, len(uris))))]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        buf = memoryview(bytearray(self.block))
        while not self._stop.is_set():
            with self._lock:
                if not self._todo:
                    break
                name = self._todo.pop(0)
            try:
                got = self._hash(self.uris[name], buf)
                if got is None:
                    break  # stopped
                if got != self.sums[name]:
                    raise mismatch(self.uris[name], self.sums[name], got, "; replace it (re-download) and rerun: "
                                   "only the units that read it are converted again")
                with self._lock:
                    self._matched.add(name)
            except BaseException as exc:  # noqa: BLE001 - handed to the driver's thread by failure()
                if isinstance(exc, OSError):
                    exc = SourceError(f"{self.uris[name]}: cannot be read for its md5 ({exc.strerror or exc})")
                with self._lock:
                    self._failures.append((name, exc))
                self._stop.set()
        with self._lock:
            self.seconds = max(self.seconds, time.monotonic() - self.started)

    def _hash(self, uri: str, buf: memoryview) -> str | None:
        """md5 of one file streamed through ``buf``; None when stopped on the way."""
        source = open_source(uri)  # closed when dropped (LocalFile.close then __del__ would close twice)
        hasher, size, offset = hashlib.md5(), source.size(), 0
        while offset < size:
            if self._stop.is_set():
                return None
            n = min(len(buf), size - offset)
            source.readinto(offset, buf[:n])
            hasher.update(buf[:n])  # hashlib releases the GIL on large buffers: units run meanwhile
            offset += n
        return hasher.hexdigest()

    def done(self) -> bool:
        return not any(thread.is_alive() for thread in self._threads)

    def wait(self) -> None:
        for thread in self._threads:
            thread.join()

    def failure(self) -> tuple[str, BaseException] | None:
        """The first file that did not match (or could not be read), and why; None so far."""
        with self._lock:
            return self._failures[0] if self._failures else None

    def matched(self) -> bool:
        """Every file hashed and matched its sum."""
        with self._lock:
            return len(self._matched) == len(self.uris)

    def cancel(self) -> None:
        """Stop hashing at the next block (the job ended another way); nothing is known to match then."""
        self._stop.set()

    def log_success(self) -> None:
        hashed = sum(self.sizes.values())
        seconds = max(self.seconds, 1e-6)
        LOG.info("md5 of %d files matches %s in %.1f s (%s hashed while converting, %.0f MB/s, %d thread(s))",
                 len(self.uris), CHECKLIST, seconds, human_bytes(hashed), hashed / 1e6 / seconds, len(self._threads))


def hash_in_background(files: Mapping[str, str], display: str, names: list[str]) -> BackgroundMd5:
    """Start checking ``names`` against the input's checklist.chk (which ``files`` must hold) beside the job."""
    sums, uris, sizes = _checklist_files(files, display, names)
    threads = background_threads()
    LOG.info("Checking md5 of %d files (%s) against %s while converting, %d thread(s); nothing is committed "
             "before they match (--skip_md5 skips this)", len(uris), human_bytes(sum(sizes.values())), CHECKLIST,
             threads)
    return BackgroundMd5(uris, sums, sizes, threads=threads)
