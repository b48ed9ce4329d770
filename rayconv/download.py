"""Meta's signed download URL: check it, find the model's folder, read ``checklist.chk``, list file URLs.

Meta e-mails a CloudFront signed URL such as ``https://llama3-1.llamameta.net/*?Policy=…&Signature=…
&Key-Pair-Id=…``. Like ``llama download`` (llama-models ``cli/download.py``), each file's URL is the
URL with ``*`` replaced by ``<folder>/<file>``, where the folder comes from the descriptor
(:mod:`rayconv.catalog`: ``Llama3.1-405B-Instruct:bf16-mp16`` → ``Llama-3.1-405B-Instruct-MP16``).

:func:`resolve` gives ``{file name: url}`` and the md5 sums: :func:`resolve_input` for converting
straight from the URL (the HTTP ByteSource reads tensors with Range requests; each record's bytes are
checked against the zip CRC-32), :func:`rayconv.staging.stage` for copying the files first.

``checklist.chk`` decides which files exist, so its names are checked before anything acts on them:
a name that is not a plain file name (absolute, ``../``, ``a/b``, NUL, empty) refuses the whole
download with one line — the listing is damaged or hostile and nothing it names is fetched; a plain
name that is not a file of a Meta checkpoint (``LICENSE``, ``notes.txt``) is ignored with a warning.

Messages name the file, never the query string (which carries the signature).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from rayconv import catalog
from rayconv.catalog import MetaModel
from rayconv.errors import SourceError
from rayconv.source.hashing import read_checklist
from rayconv.source.http import HttpFile, HttpStatusError, check_url, format_time, policy_expiry, redact

log = logging.getLogger(__name__)


def check_meta_url(meta_url: str) -> None:
    """A well-formed http(s) URL with the ``*`` placeholder (one line naming what is wrong otherwise)."""
    if not meta_url.startswith(("https://", "http://")):
        raise SourceError(f"--meta_url {redact(meta_url)} is not an http(s) URL")
    check_url(meta_url, "--meta_url")
    if "*" not in meta_url.split("?", 1)[0]:
        raise SourceError(f"--meta_url {redact(meta_url)} has no '*' placeholder; paste the whole URL "
                          f"from Meta's e-mail (it starts https://…llamameta.net/*)")


def file_url(meta_url: str, folder: str, name: str) -> str:
    """The URL of ``<folder>/<name>``: every ``*`` replaced (as ``llama download`` does), query kept."""
    return meta_url.replace("*", f"{folder}/{name}")


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


@dataclasses.dataclass
class MetaFiles:
    """The resolved download: per-file URLs (in fetch order) and the md5 of each from checklist.chk."""

    model: MetaModel
    urls: dict[str, str]
    md5: dict[str, str]
    checklist: bytes


def resolve(meta_url: str, descriptor: str, *, folder: str | None = None, allow_unverified: bool = False,
            published_sizes: bool = True) -> MetaFiles:
    """Check the URL, find the server folder (probing older names), read checklist.chk.

    ``published_sizes=False`` (``RAYCONV_META_SHARD_SIZES=ignore``, ``Tunables.meta_shard_sizes``): a
    re-published release or synthetic shards under a real descriptor; sizes come from Content-Range only."""
    check_meta_url(meta_url)
    check_expiry(meta_url)
    model = catalog.lookup(descriptor, folder)
    if not published_sizes:
        model = dataclasses.replace(model, shard_bytes=None)
    candidates = [model.folder, *model.legacy_folders]
    checklist = None
    first_error: HttpStatusError | None = None
    for candidate in candidates:
        try:
            source = HttpFile(file_url(meta_url, candidate, "checklist.chk"))
            checklist = source.read(0, source.size())
        except HttpStatusError as exc:
            # CloudFront answers 403 for a missing key as well as for a bad signature.
            if exc.status not in (403, 404):
                raise
            first_error = first_error or exc
            continue
        if candidate != model.folder:
            log.info("files for %s found under the older folder name %s", descriptor, candidate)
            model = dataclasses.replace(model, folder=candidate)
        break
    if checklist is None:
        tried = ", ".join(candidates)
        if first_error is not None and first_error.status == 403:
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
        md5 = checkpoint_files(model, read_checklist(checklist, f"{model.folder}/checklist.chk"))
        names = _fetch_order(model, md5)
        missing = [n for n in names if n not in md5 and n != "checklist.chk"]
        if missing and not allow_unverified:
            raise SourceError(f"{model.folder}/checklist.chk has no md5 for {', '.join(missing)}")
        names = ["checklist.chk"] + [n for n in names if n != "checklist.chk"]
    urls = {name: file_url(meta_url, model.folder, name) for name in names}
    return MetaFiles(model=model, urls=urls, md5=md5, checklist=checklist or b"")


def checkpoint_files(model: MetaModel, md5: dict[str, str]) -> dict[str, str]:
    """The checklist's entries that name files of ``model``'s checkpoint; refuse unsafe names.

    Any name that is not a plain file name refuses the download (one line, nothing fetched); plain
    names of other files are dropped with a warning (they are never fetched, so never written).
    """
    source = f"{model.folder}/checklist.chk"
    for name in md5:
        reason = catalog.unsafe_name_reason(name)
        if reason is not None:
            raise SourceError(f"{source} lists {name!r}, {reason}: refusing to download anything it names "
                              f"(the checklist is damaged or not Meta's)")
    kept = {}
    for name, digest in md5.items():
        kind = catalog.checkpoint_file_kind(name)
        if kind is None or (kind == "fp8_scales" and not model.fp8):
            log.warning("%s lists %r, which is not a file of a %s checkpoint: ignored", source, name,
                        model.descriptor)
            continue
        kept[name] = digest
    return kept


def _fetch_order(model: MetaModel, md5: dict[str, str]) -> list[str]:
    """checklist.chk's files (the authority on what exists) ordered small-first like llama download."""
    names = list(md5)
    shards = sorted((n for n in names if catalog.checkpoint_file_kind(n) == "shard"),
                    key=lambda n: int(n.split(".")[1]))
    if not shards:
        raise SourceError(f"{model.folder}/checklist.chk lists no consolidated.NN.pth shard")
    if shards != [f"consolidated.{i:02d}.pth" for i in range(len(shards))]:
        raise SourceError(f"{model.folder}/checklist.chk lists shards {', '.join(shards)}, not consolidated.00.pth "
                          f"… consolidated.{len(shards) - 1:02d}.pth")
    if model.shard_bytes is not None and len(shards) != model.shards:
        raise SourceError(f"{model.folder}/checklist.chk lists {len(shards)} shards; {model.descriptor} "
                          f"has {model.shards}")
    if "params.json" not in md5:
        raise SourceError(f"{model.folder}/checklist.chk does not list params.json")
    others = [n for n in names if n not in shards]
    return sorted(others, key=lambda n: (n != "tokenizer.model", n != "params.json", n)) + shards


def resolve_input(meta_url: str, descriptor: str, *, folder: str | None = None,
                  published_sizes: bool = True) -> dict[str, str]:
    """``{file name: url}`` for converting straight from the URL."""
    return resolve(meta_url, descriptor, folder=folder, published_sizes=published_sizes).urls
