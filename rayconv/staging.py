"""Stage Meta's files from the signed URL into a local directory or ``gs://`` prefix (the tutorial's
``base/`` copy), md5-verified, resumable.

Parallel ranged GETs fill fixed-size parts; parts are hashed in order as they land. An interrupted
stage resumes: finished parts are kept (read back from the destination to hash them), missing ones
are fetched. Every write goes to an absolute offset or its own object, so a retry never appends
twice. A file is published under its name only after its md5 matches ``checklist.chk``, and
``checklist.chk`` is written last, so a destination holding it is complete.

Only file names of a Meta checkpoint are ever written, as plain names inside the destination
(:func:`rayconv.download.checkpoint_files` refuses or drops anything else; :func:`_check_target`
checks again right before writing).
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import threading
from typing import Callable, Iterable

from rayconv import catalog, jsonio
from rayconv.download import resolve
from rayconv.errors import ConversionError, SourceError
from rayconv.gcs_api import compose, delete_objects, object_info, record_verified_md5
from rayconv.source.bytesource import open_source
from rayconv.source.gcs import GcsObject
from rayconv.source.hashing import md5_of, mismatch
from rayconv.source.http import HttpFile
from rayconv.storage import Location

log = logging.getLogger(__name__)

MiB = 1 << 20

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
        state, done = None, None
        if os.path.exists(self.state_path) and os.path.exists(self.partial):
            with open(self.state_path, "rb") as f, contextlib.suppress(jsonio.JSONError):  # damaged: refetch
                state = jsonio.loads(f.read())
        if isinstance(state, dict) and state.get("size") == self.size and state.get("part_size") == self.part_size:
            done = state.get("done")
        if isinstance(done, list) and all(type(i) is int and 0 <= i < self.count for i in done):
            self._done = set(done)
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
    compared with the composed object's crc32c: the bytes in the bucket are the bytes hashed. The
    verified md5 is then attached to the object (``gcs_api.VERIFIED_MD5_KEY``), so a later convert
    from this prefix checks it against checklist.chk without reading the object again.
    """

    def __init__(self, dest: Location, name: str, size: int, part_size: int) -> None:
        super().__init__(dest, name, size, part_size)
        self.scratch = dest.join(STAGING_DIR, name)

    def _key(self, index: int) -> str:
        return f"part-{index:05d}"

    def open(self) -> set[int]:
        manifest = {"size": self.size, "part_size": self.part_size}
        stored = None
        with contextlib.suppress(jsonio.JSONError):  # a damaged manifest: the parts are fetched again
            stored = jsonio.loads(self.scratch.read_bytes("manifest.json") or b"null")
        if stored != manifest:
            self.scratch.delete_all()
            self.scratch.write_bytes("manifest.json", json.dumps(manifest).encode())
            return set()
        return {int(k[len("part-"):]) for k in self.scratch.list_keys("part-")}

    def write(self, index: int, data: memoryview) -> None:
        self.scratch.write_bytes(self._key(index), data.obj if isinstance(data.obj, bytes) else bytes(data))

    def read(self, index: int, buf: memoryview) -> None:
        start, stop = self.span(index)
        GcsObject(self.scratch.join(self._key(index)).uri, size=stop - start).readinto(0, buf)

    def finalize(self, crc32c: int | None = None, md5: str | None = None) -> None:
        bucket = self.dest.bucket
        names = [self.scratch.join(self._key(i)).path for i in range(self.count)]
        target = self.dest.join(self.name).path
        compose(bucket, names, target, scratch_prefix=self.scratch.path + "/")
        info = object_info(bucket, target)
        problem = None
        if info is None or info["size"] != self.size:
            problem = f"the composed object has {info and info['size']} bytes, expected {self.size}"
        elif crc32c is not None and info.get("crc32c"):
            if int.from_bytes(base64.b64decode(info["crc32c"]), "big") != crc32c:
                problem = "the object in the bucket does not match the bytes downloaded (crc32c)"
        if problem:
            delete_objects(bucket, [target])
            self.scratch.delete_all()  # the parts are suspect: fetch them again
            raise SourceError(f"{self.name}: {problem}; the staged copy was deleted, rerun to stage it again")
        if md5 is not None and crc32c is not None and info.get("crc32c"):
            try:
                record_verified_md5(bucket, target, md5, info["generation"])
            except ConversionError as exc:  # e.g. no storage.objects.update permission: an optimisation only
                log.warning("%s: could not attach the verified md5 (%s); a later convert from %s hashes it "
                            "again", self.name, exc, self.dest.uri)
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


def _check_target(name: str) -> None:
    """The last guard before a write: only a checkpoint file's plain name, inside the destination."""
    if catalog.checkpoint_file_kind(name) is None:
        reason = catalog.unsafe_name_reason(name) or "not a file of a Meta checkpoint"
        raise SourceError(f"refusing to stage {name!r}: {reason}")


def _stage_file(url: str, name: str, dest: Location, md5: str | None, *, known_size: int | None,
                part_size: int, concurrency: int, memory_budget: int,
                progress: Callable[[str, int, int], None] | None, report: StageReport,
                report_lock: threading.Lock) -> None:
    _check_target(name)
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
        parts.finalize(int.from_bytes(crc.digest(), "big") if crc is not None else None, md5=got)
    else:
        parts.finalize()
    dest.write_bytes(_marker_key(name), (md5 or "").encode())
    with report_lock:
        report.fetched[name] = fetched
        report.reused[name] = reused
    log.info("%s: staged (%d bytes fetched, %d reused), md5 verified", name, fetched, reused)


def _check_md5(name: str, expected: str | None, got: str, staged: bool = False) -> None:
    if expected is not None and got != expected:
        raise mismatch(name, expected, got, "; the partial copy was deleted, rerun to download it again"
                       if staged else "")


def stage(meta_url: str, descriptor: str, dest: Location | str, *, folder: str | None = None,
          files: Iterable[str] | None = None, part_size: int = 32 * MiB, concurrency: int = 8,
          parallel_files: int = 2, memory_budget: int = 1024 * MiB, allow_unverified: bool = False,
          progress: Callable[[str, int, int], None] | None = None,
          report: StageReport | None = None, published_sizes: bool = True) -> Location:
    """Copy the model's raw files from Meta's URL into ``dest`` (local dir or gs:// prefix).

    Resumable: rerun with the same (or a fresh) URL after any interruption. Each file is
    md5-checked against checklist.chk before it appears under its own name; ``checklist.chk`` is
    written last, so a destination holding it is complete. Returns ``dest`` (the Location to
    convert from); pass a :class:`StageReport` to learn what was fetched, reused or already there.

    Memory: about ``memory_budget`` (parts in flight, split across ``parallel_files``); each file
    uses up to ``concurrency`` parallel ranged GETs of ``part_size`` (raised for files over
    ~1000 parts). ``published_sizes``: check the shards against Meta's published sizes
    (:func:`rayconv.download.resolve`).
    """
    dest = Location.parse(dest) if isinstance(dest, str) else dest
    meta = resolve(meta_url, descriptor, folder=folder, allow_unverified=allow_unverified,
                   published_sizes=published_sizes)
    names = [n for n in meta.urls if n != "checklist.chk"]
    if files is not None:
        wanted = set(files)
        names = [n for n in names if n in wanted]
    for name in names:
        _check_target(name)
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
