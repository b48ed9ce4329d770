"""Which bytes an output was made from, and whether today's source is still those bytes.

A receipt ties a unit to the *byte identity* of each file it read (size + mtime + inode locally, the GCS
generation; :mod:`rayconv.engine.ledger`): cheap, and exact enough to decide which units to run again. A
finished output needs more: it stays on disk after its receipts could be overwritten by a later run, and it
should survive what users do to an input without changing it (re-download a shard, copy a Hub cache) while
changing with any byte it was made from. So each output's commit record carries the *content identity* of
every file the plan reads, written with the commit intent, before anything of the output can become visible:

* a file whose every tensor record has a CRC-32 in its zip directory (Meta ``.pth`` shards, FP8 scale files):
  ``crc:<index digest>`` — names, shapes, offsets and CRC-32s of its records. Every record a unit read was
  proved against those CRC-32s before the commit (:func:`rayconv.checksum.crc_check`), so the output was made
  from exactly the bytes that directory describes, and a re-downloaded identical shard keeps the identity;
* a Hugging Face Hub cache file (a ``snapshots/<rev>/<name>`` symlink into ``blobs/<sha256>``):
  ``sha256:<hex>``, the blob's name, which the Hub derives from the file's content: it survives copies of
  the cache;
* any other file (safetensors outside a Hub cache, which carry no checksum): ``<index digest>/<byte
  identity>``, so a touched or copied file cannot be told from another one and the output is refused; "" (no
  identity: nothing can be proved) when the byte identity is unknown.

A rerun compares the recorded identities with today's (:func:`changed_sources`) for every output that is
visible or could be renamed into place without a rebuild; see docs/architecture.md, "Commit and resume".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import TYPE_CHECKING, Mapping

from rayconv.plan import Plan
from rayconv.leaves import TensorInfo

if TYPE_CHECKING:
    from rayconv.source.protocol import Checkpoint

_SHA256 = re.compile(r"[0-9a-f]{64}")


def index_digest(index: Mapping[str, TensorInfo]) -> str:
    """A file's tensor index: names, dtypes, shapes, offsets, sizes, CRC-32s (and the record of a tensor that views
    part of one, :attr:`TensorInfo.record`; left out otherwise, so digests of older ledgers stay the same)."""
    rows = sorted([i.name, i.dtype, list(i.shape), i.offset, i.nbytes, i.crc32, *([list(i.record)] if i.record else [])]
                  for i in index.values())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def file_name(plan: Plan, key: str) -> str:
    """A ledger name (shard ``"3"``, scale file ``"scale:3"``) → the file's name, for messages."""
    uri = plan.scale_files[int(key[6:])] if key.startswith("scale:") else plan.tensor_files[int(key)]
    return uri.split("?", 1)[0].rsplit("/", 1)[-1]


def hub_blob(uri: str) -> str:
    """``sha256:<hex>`` of a local file that is a link into a Hugging Face Hub cache's ``blobs/<sha256>``; ""
    otherwise (not a link, not local, or a blob named otherwise: small files are named by their git sha1)."""
    if "://" in uri or not os.path.islink(uri):
        return ""
    target = os.path.realpath(uri)
    folder, name = os.path.split(target)
    return f"sha256:{name}" if os.path.basename(folder) == "blobs" and _SHA256.fullmatch(name) else ""


def _crc_covered(index: Mapping[str, TensorInfo]) -> bool:
    return bool(index) and all(i.crc32 is not None or i.record is not None for i in index.values())


def content_identity(uri: str, index: Mapping[str, TensorInfo], byte_identity: str) -> str:
    """One file's content identity (see the module docstring); "" when none can be given."""
    digest = index_digest(index)
    if _crc_covered(index):
        return f"crc:{digest}"
    return hub_blob(uri) or (f"{digest}/{byte_identity}" if byte_identity else "")


def content_identities(checkpoint: Checkpoint, identities: Mapping[str, str]) -> dict[str, str]:
    """Every file the plan reads, by ledger name → content identity. ``identities``: the byte identities as
    :func:`rayconv.engine.ledger.read_identities` gives them (``<index digest>/<byte identity>`` for shards)."""
    out = {str(i): content_identity(uri, index, identities[str(i)].split("/", 1)[-1])
           for i, (uri, index) in enumerate(zip(checkpoint.tensor_files, checkpoint.indexes))}
    if checkpoint.scales is not None:
        for i, (uri, index) in enumerate(zip(checkpoint.scales.files, checkpoint.scales.indexes)):
            out[f"scale:{i}"] = content_identity(uri, index, identities.get(f"scale:{i}", ""))
    return out


def changed_sources(plan: Plan, recorded: Mapping[str, str] | None, current: Mapping[str, str]) -> str | None:
    """Why an output recorded as made from ``recorded`` cannot be proved to be today's source, or None when it
    is: every file has the same, known content identity."""
    if recorded is None:
        return "its commit record does not say which bytes it was made from (written by an older rayconv)"
    changed = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k) or not current.get(k))
    if not changed:
        return None
    names = ", ".join(file_name(plan, k) if k in current else k for k in changed[:3])
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    return (f"the input is not provably the bytes it was made from ({names}{more} changed identity: CRC-32 "
            "directory, Hub blob sha256, or size + mtime + inode / GCS generation for files without a checksum)")
