"""Write planned safetensors files region by region, from many workers, and publish each only when whole.

:func:`rayconv.targets.safetensors_files.plan_files` fixes every byte's place; this module puts bytes there. A
*region* is a contiguous byte range of one file (typically rows of one tensor: ``PlannedTensor.rows``). Three
steps per file, the same on both storages:

* :func:`create` (driver, before any worker): local — a temporary file ``<name>.rayconv-partial`` preallocated to
  the file's size with the header at offset 0; gs:// — the header as the first *part* object;
* :func:`open_writer` (any worker, any host) → ``write(start, data)``: local — ``os.pwrite`` at the absolute
  offset (regions may land in any order and concurrently); gs:// — one part object
  ``.rayconv-staging/<name>/part-<start>`` per region, each uploaded whole or not at all;
* :func:`finish` (driver, once every region is written, which its receipts prove): the regions must tile the
  data section exactly; local — fsync and rename onto the final name (never over an existing file); gs:// —
  compose the parts in byte order into the final object (``gcs_api.compose``, as staging does), check its size,
  delete the parts.

So a file is never under its final name until it is complete; a rerun finds the partial file (or the parts)
and writes only what is missing. GCS composes at most :data:`MAX_PARTS` components into one object: the
planner must keep a file's regions under that (:func:`check_regions` says so before any write).
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Sequence

import numpy as np

from rayconv.errors import OutputError, one_line_reason
from rayconv.gcs_api import compose, delete_objects, object_info
from rayconv.storage import Location
from rayconv.targets.safetensors_files import PlannedFile

PARTIAL_SUFFIX = ".rayconv-partial"
STAGING_DIR = ".rayconv-staging"
#: GCS's limit on the components of one composite object (the header is one of them).
MAX_PARTS = 1024


def check_regions(file: PlannedFile, regions: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``regions`` sorted, after checking they tile the data section ``[len(header), size)`` exactly and fit
    in one composed GCS object."""
    ordered = sorted(regions)
    position = len(file.header)
    for start, stop in ordered:
        if start != position or stop < start:
            raise OutputError(f"{file.name}: regions do not tile the file (at byte {position}, next region "
                              f"[{start}, {stop}))")
        position = stop
    if position != file.size:
        raise OutputError(f"{file.name}: regions end at byte {position}, the file has {file.size}")
    if len(ordered) + 1 > MAX_PARTS:
        raise OutputError(f"{file.name}: {len(ordered)} regions, GCS composes at most {MAX_PARTS - 1} plus the "
                          "header into one object (plan larger regions)")
    return ordered


def _as_bytes(data: bytes | memoryview | np.ndarray) -> memoryview:
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    return memoryview(data).cast("B")


def _part_key(start: int) -> str:
    return f"part-{start:020d}"


class _LocalWriter:
    def __init__(self, directory: Location, file: PlannedFile) -> None:
        self.file = file
        self.partial = os.path.join(directory.path, file.name + PARTIAL_SUFFIX)
        try:
            self._fd = os.open(self.partial, os.O_RDWR)
        except FileNotFoundError:
            raise OutputError(f"{self.partial} is missing (create() it before workers write)") from None
        size = os.fstat(self._fd).st_size
        if size != file.size:
            os.close(self._fd)
            raise OutputError(f"{self.partial} has {size} bytes, the plan says {file.size} (another plan's file?)")

    def write(self, start: int, data: bytes | memoryview | np.ndarray) -> None:
        view = _as_bytes(data)
        if start < len(self.file.header) or start + len(view) > self.file.size:
            raise OutputError(f"{self.file.name}: region [{start}, {start + len(view)}) outside its data section")
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], start + done)
        except OSError as exc:
            raise OutputError(f"cannot write {self.partial}: {one_line_reason(exc)}") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _GcsWriter:
    def __init__(self, directory: Location, file: PlannedFile) -> None:
        self.file = file
        self.parts = directory.join(STAGING_DIR, file.name)

    def write(self, start: int, data: bytes | memoryview | np.ndarray) -> None:
        view = _as_bytes(data)
        if start < len(self.file.header) or start + len(view) > self.file.size:
            raise OutputError(f"{self.file.name}: region [{start}, {start + len(view)}) outside its data section")
        self.parts.write_bytes(_part_key(start), view.tobytes())

    def close(self) -> None:
        pass


def create(directory: Location, file: PlannedFile) -> None:
    """Prepare ``file`` for workers: the preallocated partial file (local) or the header part (gs://). Idempotent
    for the same plan; a partial file of another size (another plan's) is started afresh."""
    if not directory.is_local:
        directory.join(STAGING_DIR, file.name).write_bytes(_part_key(0), file.header)
        return
    partial = os.path.join(directory.path, file.name + PARTIAL_SUFFIX)
    try:
        os.makedirs(directory.path, exist_ok=True)
        fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != file.size:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, file.size)
            os.pwrite(fd, file.header, 0)
        finally:
            os.close(fd)
    except OSError as exc:
        raise OutputError(f"cannot create {partial}: {one_line_reason(exc)}") from None


def open_writer(directory: Location, file: PlannedFile) -> _LocalWriter | _GcsWriter:
    """A writer of ``file``'s regions (``write(start, data)``, ``close()``), for any process once :func:`create` ran."""
    return _LocalWriter(directory, file) if directory.is_local else _GcsWriter(directory, file)


def finish(directory: Location, file: PlannedFile, regions: Sequence[tuple[int, int]]) -> Location:
    """Publish ``file`` under its final name once every region is written; returns its location."""
    ordered = check_regions(file, regions)
    final = directory.join(file.name)
    if directory.is_local:
        partial = final.path + PARTIAL_SUFFIX
        if os.path.lexists(final.path):
            raise OutputError(f"{final.uri} exists already (not replaced)")
        try:
            fd = os.open(partial, os.O_RDONLY)
            try:
                if os.fstat(fd).st_size != file.size:
                    raise OutputError(f"{partial} is not {file.size} bytes")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(partial, final.path)
            dir_fd = os.open(directory.path, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise OutputError(f"cannot publish {final.uri}: {one_line_reason(exc)}") from None
        return final
    parts = directory.join(STAGING_DIR, file.name)
    spans = [(0, len(file.header))] + ordered
    names = [parts.join(_part_key(start)).path for start, _ in spans]
    # Every part is checked before the compose, so the final name only ever holds the whole file.
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        infos = list(pool.map(lambda name: object_info(directory.bucket, name), names))
    for (start, stop), info in zip(spans, infos):
        if info is None or info["size"] != stop - start:
            got = "missing" if info is None else f"{info['size']} bytes"
            raise OutputError(f"{final.uri}: the region at byte {start} is {got}, expected {stop - start} bytes "
                              "(rewrite it, then finish again)")
    if object_info(directory.bucket, final.path) is not None:
        raise OutputError(f"{final.uri} exists already (not replaced)")
    compose(directory.bucket, names, final.path, scratch_prefix=parts.path + "/")
    info = object_info(directory.bucket, final.path)
    if info is None or info["size"] != file.size:  # a part replaced between the check and the compose
        delete_objects(directory.bucket, [final.path])
        raise OutputError(f"{final.uri}: the composed object has {info and info['size']} bytes, the plan says "
                          f"{file.size}; deleted")
    parts.delete_all()
    return final
