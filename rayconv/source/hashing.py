"""md5 against Meta's ``checklist.chk``: parse it, hash ByteSources in order, verify an input's files.

``checklist.chk`` is ``md5sum`` output. An md5 needs every byte of a file in order, so it cannot ride
along with the conversion's reads: the plan spreads one shard's byte ranges over many units and
workers (row blocks, column slices), and no process reads a shard front to back. Verifying is
therefore one extra ordered read per file — :func:`md5_of` reads ahead in parallel blocks so a remote
file streams at full speed, and :func:`verify_input` hashes files in parallel — except where storage
already knows the md5: a non-composite gs:// object carries the md5 GCS computed on upload, and an
object composed by rayconv's staging carries the md5 staging verified.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import os
import re
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


def verify_files(uris: Mapping[str, str], md5: Mapping[str, str], *, parallel: int | None = None,
                 use_stored: bool = True, **kwargs) -> dict[str, str]:
    """Check every file of ``uris`` against ``md5`` (all must be listed), files in parallel.

    Returns ``{name: 'stored' | 'hashed'}``: how each was checked. The first mismatch raises.
    """
    missing = [name for name in uris if name not in md5]
    if missing:
        raise SourceError(f"{CHECKLIST} has no md5 for {', '.join(sorted(missing))}")
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


def verify_input(files: Mapping[str, str], display: str, names: list[str]) -> None:
    """Check the files ``convert`` reads (``names``) against the input's ``checklist.chk``, if it has one.

    A demanding user expects a copy of 820 GB that was moved around to be checked before it becomes
    a checkpoint; the cost is one ordered read of each file, in parallel (``--skip_md5`` skips it).
    Raises SourceError (one line) on a mismatch, a missing sum, or an unreadable checklist.
    """
    if CHECKLIST not in files:
        LOG.info("No %s in %s: md5 not checked (each tensor's CRC-32 still is)", CHECKLIST, display)
        return
    source = open_source(files[CHECKLIST])
    sums = read_checklist(source.read(0, source.size()), f"{display}/{CHECKLIST}")
    uris = {name: files[name] for name in names}
    sizes = {name: open_source(uri).size() for name, uri in uris.items()}
    LOG.info("Checking md5 of %d files (%s) against %s (--skip_md5 skips this)", len(uris),
             human_bytes(sum(sizes.values())), CHECKLIST)
    start = time.monotonic()
    how = verify_files(uris, sums)
    seconds = max(time.monotonic() - start, 1e-6)
    hashed = sum(sizes[name] for name, way in how.items() if way == "hashed")
    LOG.info("md5 of %d files matches %s in %.1f s (%s hashed, %.0f MB/s; %d from GCS object metadata)",
             len(uris), CHECKLIST, seconds, human_bytes(hashed), hashed / 1e6 / seconds,
             len(uris) - sum(1 for way in how.values() if way == "hashed"))
