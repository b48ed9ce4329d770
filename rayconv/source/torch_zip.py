"""The zip container of a ``torch.save`` file, as torch's ``PyTorchStreamReader`` sees it.

rayconv/source/pth.py indexes the pickle inside; this module finds records the way torch does (under
the first entry's folder, case-insensitively as miniz does), refuses ambiguous archives (duplicate
names), computes where a STORED record's bytes start, and checks the records torch's reader checks
before unpickling (file format version, byte order, storage alignment).
"""

from __future__ import annotations

import re
import struct
import zipfile

from rayconv.errors import SourceError
from rayconv.source.bytesource import ByteSource, RangeFile

LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zipfile's sizeFileHeader layout (30 bytes)
#: torch 2.13 reads file format versions 1..10 (caffe2/serialize/versions.h).
_VERSIONS = range(1, 11)
ENCRYPTED = 0x1 | 0x40  # zip flag bits miniz refuses (traditional / strong encryption)


class Archive:
    """A torch zip as ``PyTorchStreamReader`` sees it: records under the first entry's folder, found case-insensitively."""

    def __init__(self, source: ByteSource, name: str) -> None:
        self.source, self.name = source, name
        head = source.read(0, 4) if source.size() >= 4 else b""
        if head != b"PK\x03\x04":
            raise SourceError(f"{name} is not a readable torch checkpoint (it does not start with a zip entry)")
        try:
            self.zip = zipfile.ZipFile(RangeFile(source))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise SourceError(f"{name} is not a readable torch checkpoint (truncated or corrupt zip: {exc})") from None
        entries = self.zip.infolist()
        if not entries:
            raise SourceError(f"{name} is an empty zip, not a torch checkpoint")
        if "/" not in entries[0].filename:
            raise SourceError(f"{name}: first zip entry {entries[0].filename!r} is not in a folder "
                              "(not a torch.save checkpoint)")
        self.prefix = entries[0].filename.split("/", 1)[0] + "/"
        self.entries: dict[str, zipfile.ZipInfo] = {}
        for info in entries:
            folded = info.filename.lower()
            if folded in self.entries:
                raise SourceError(f"{name} has duplicate zip entries named {info.filename!r} (torch would read "
                                  "one of them depending on their order; refusing an ambiguous checkpoint)")
            self.entries[folded] = info

    def find(self, record: str) -> zipfile.ZipInfo | None:
        return self.entries.get((self.prefix + record).lower())

    def read_small(self, record: str, limit: int) -> bytes:
        """A metadata record (pickle, version, byte order), decompressed if need be, at most ``limit`` bytes."""
        info = self.find(record)
        assert info is not None
        if info.file_size > limit:
            raise SourceError(f"{self.name}: {info.filename} declares {info.file_size} bytes (limit {limit})")
        try:
            with self.zip.open(info) as f:
                data = f.read(limit + 1)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
            raise SourceError(f"{self.name}: cannot read {info.filename} ({exc})") from None
        if len(data) > limit:
            raise SourceError(f"{self.name}: {info.filename} expands past {limit} bytes")
        return data

    def data_start(self, info: zipfile.ZipInfo) -> int:
        """Absolute offset of a STORED entry's bytes (after its local header, as torch computes it)."""
        header = self.source.read(info.header_offset, LOCAL_HEADER.size)
        fields = LOCAL_HEADER.unpack(header)
        if fields[0] != b"PK\x03\x04":
            raise SourceError(f"{self.name}: bad local header for {info.filename} (corrupt file)")
        return info.header_offset + LOCAL_HEADER.size + fields[10] + fields[11]


def check_container(archive: Archive) -> None:
    """The records torch's reader itself checks before unpickling (version, byte order, alignment)."""
    if archive.find("constants.pkl") is not None:
        raise SourceError(f"{archive.name} is a TorchScript archive, not a state dict")
    version_record = ".data/version" if archive.find(".data/version") is not None else "version"
    if archive.find(version_record) is None:
        raise SourceError(f"{archive.name} has no {archive.prefix}version record: not a torch.save checkpoint")
    text = archive.read_small(version_record, 64).decode("ascii", "replace")
    match = re.match(r"\s*(\d+)", text)
    if not match or int(match.group(1)) not in _VERSIONS:
        raise SourceError(f"{archive.name}: torch file format version {text.strip()!r} is not one torch 2.13 reads")
    if archive.find("byteorder") is not None:
        order = archive.read_small("byteorder", 64)
        if order != b"little":
            raise SourceError(f"{archive.name}: byte order {order[:16]!r}; rayconv reads little-endian checkpoints")
    if archive.find(".storage_alignment") is not None:
        try:
            int(archive.read_small(".storage_alignment", 64))
        except ValueError:
            raise SourceError(f"{archive.name}: unreadable .storage_alignment record") from None
