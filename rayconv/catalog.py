"""The one catalog of Meta's Llama releases: descriptor → family, size, SKU, shards, dtype, server folder.

``rayconv convert --model_path`` (:class:`rayconv.families.Descriptor`) and the signed-URL download
(:mod:`rayconv.download`) both read descriptors such as ``Llama3.1-405B-Instruct:bf16-mp16`` through
:func:`lookup`, so the grammar, the shard counts and the folder names live here once. The facts come
from llama-models' ``sku_list.py`` (``llama_meta_net_info``, ``llama_meta_pth_size``) and the older
``download.sh`` scripts (see docs: meta-download notes).

The catalog also says which file names a Meta checkpoint has (:func:`checkpoint_file_kind`): names that
come from a server or an index (``checklist.chk``) are only ever written when they are one of these.
"""

from __future__ import annotations

import dataclasses
import re

from rayconv.errors import SpecError

_DESCRIPTOR = re.compile(
    r"^(?:meta-)?llama-?(?P<version>\d(?:\.\d)?)-(?P<size>\d+)b(?P<suffix>-instruct|-chat)?"
    r"(?::(?P<variant>[a-z0-9-]+))?$",
    re.IGNORECASE,
)
_BF16_VARIANT = re.compile(r"^bf16-mp(?P<mp>\d+)$")

#: Published (family, size) → shard count of its (only, or default) SKU.
PUBLISHED: dict[tuple[str, str], int] = {
    ("llama-2", "7b"): 1, ("llama-2", "13b"): 2, ("llama-2", "70b"): 8,
    ("llama-3", "8b"): 1, ("llama-3", "70b"): 8,
    ("llama-3.1", "8b"): 1, ("llama-3.1", "70b"): 8, ("llama-3.1", "405b"): 8,
    ("llama-3.2", "1b"): 1, ("llama-3.2", "3b"): 1,
    ("llama-3.3", "70b"): 8,
}


@dataclasses.dataclass(frozen=True)
class Sku:
    """One of the 405B SKUs: the variant after ``:`` selects shards, dtype and folder suffix."""

    shards: int
    dtype: str  # "bf16" or "fp8"
    folder_suffix: str
    shard_bytes: int  # llama-models hard-codes these because CloudFront rejects HEAD


#: Llama 3.1 405B variants. The FP8 SKU has no variant (``Llama3.1-405B-Instruct``); ``fp8`` and
#: ``fp8-mp8`` are accepted spellings of it.
SKUS_405B: dict[str, Sku] = {
    "bf16-mp16": Sku(16, "bf16", "-MP16", 51_268_302_389),
    "bf16-mp8": Sku(8, "bf16", "-MP8", 101_470_976_045),
    "": Sku(8, "fp8", "", 60_903_742_309),
}
_FP8_ALIASES = ("fp8", "fp8-mp8")


@dataclasses.dataclass(frozen=True)
class MetaModel:
    """What a descriptor names: the model, its SKU, and where its files live on Meta's server."""

    descriptor: str
    family: str  # "llama-3.1" (the --model_name spelling)
    size: str  # "405b"
    instruct: bool
    variant: str  # as written after ':', lower case ("" when none)
    shards: int
    dtype: str  # "bf16" or "fp8"
    folder: str
    #: Meta's published shard size, or None (unknown; a download may ignore it: rayconv.download.resolve).
    shard_bytes: int | None
    #: Older folder names (``Meta-Llama-3.1-…``, llama3 ``download.sh`` paths), tried in order when
    #: the current name is not found.
    legacy_folders: tuple[str, ...] = ()
    #: (family, size) is a published model (else the folder and shard count are a guess by rule).
    published: bool = True

    @property
    def fp8(self) -> bool:
        return self.dtype == "fp8"

    @property
    def files(self) -> list[str]:
        """Files in ``llama download`` order: checklist, tokenizer, params, [fp8 scales], shards."""
        names = ["checklist.chk", "tokenizer.model", "params.json"]
        if self.fp8:
            names += [f"fp8_scales_{i}.pt" for i in range(self.shards)]
        return names + [f"consolidated.{i:02d}.pth" for i in range(self.shards)]


def lookup(descriptor: str, folder: str | None = None) -> MetaModel:
    """Parse a Meta descriptor (``Llama3.1-405B-Instruct:bf16-mp16``, ``Llama-2-7b-chat``, …).

    Any ``llama<version>-<size>b`` parses; :attr:`MetaModel.published` says whether it is a real
    release. ``folder`` overrides the server folder (and disables the published shard size, which
    belongs to Meta's folder). Raises SpecError (one line) for text that is not a descriptor and for
    an unknown 405B variant.
    """
    m = _DESCRIPTOR.match(descriptor.strip())
    if not m:
        raise SpecError(f"--model_path {descriptor!r} is not a Meta model descriptor "
                        "(expected e.g. Llama3.1-405B-Instruct:bf16-mp16, Llama3.1-8B, Llama-2-7b)")
    version, number = m["version"], int(m["size"])
    family, size = f"llama-{version}", f"{number}b"
    instruct = bool(m["suffix"])
    variant = (m["variant"] or "").lower()
    published = (family, size) in PUBLISHED
    shards = PUBLISHED.get((family, size), 8 if number >= 70 else 1)
    dtype, shard_bytes = "bf16", None
    legacy: list[str] = []
    if version == "2":
        name = f"llama-2-{number}b" + ("-chat" if instruct else "")
    elif version == "3":
        name = f"Llama-3-{number}B" + ("-Instruct" if instruct else "")
        legacy = [f"Meta-{name}", f"{number}b_" + ("instruction_tuned" if instruct else "pre_trained")]
    else:
        base = f"Llama-{version}-{number}B" + ("-Instruct" if instruct else "")
        name = base
        if (family, size) == ("llama-3.1", "405b"):
            sku = SKUS_405B.get("" if variant in _FP8_ALIASES else variant)
            if sku is None:
                raise SpecError(f"--model_path {descriptor!r}: unknown 405B variant {variant!r} "
                                "(expected bf16-mp16, bf16-mp8, or none for FP8)")
            name, shards, dtype, shard_bytes = base + sku.folder_suffix, sku.shards, sku.dtype, sku.shard_bytes
            if sku.dtype == "fp8":
                legacy.append(f"Meta-{base}-FP8")
        legacy.insert(0, f"Meta-{name}")
    if variant and (family, size) != ("llama-3.1", "405b"):
        # Only 405B has SKUs; ``bf16-mpN`` elsewhere names a copy saved with N shards.
        parsed = _BF16_VARIANT.match(variant)
        if not parsed:
            raise SpecError(f"--model_path {descriptor!r}: variant {variant!r} is not supported; only bf16 "
                            "checkpoints (e.g. :bf16-mp16, :bf16-mp8) convert bit-exactly")
        shards = int(parsed["mp"])
    if folder:
        # A custom folder (a re-published release, say): trust Content-Range instead of llama-models'
        # published sizes.
        shard_bytes = None
    return MetaModel(descriptor=descriptor, family=family, size=size, instruct=instruct, variant=variant,
                     shards=shards, dtype=dtype, folder=folder or name, shard_bytes=shard_bytes,
                     legacy_folders=() if folder else tuple(legacy), published=published)


# --------------------------------------------------------------------------------------------------
# File names a Meta checkpoint has

_CHECKPOINT_FILES = (
    ("shard", re.compile(r"consolidated\.\d{1,3}\.pth")),
    ("params", re.compile(r"params\.json")),
    ("checklist", re.compile(r"checklist\.chk")),
    ("tokenizer", re.compile(r"tokenizer\.model")),
    ("fp8_scales", re.compile(r"fp8_scales_\d{1,3}\.pt")),
)


def unsafe_name_reason(name: str) -> str | None:
    """Why ``name`` is not a plain file name (None when it is): it must not be empty, absolute,
    contain a path separator, NUL or control character, or be ``.``/``..``."""
    if not name:
        return "an empty name"
    if name in (".", ".."):
        return "a directory reference"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if "/" in name or "\\" in name:
        return "a path, not a file name"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "a name with control characters"
    return None


def checkpoint_file_kind(name: str) -> str | None:
    """``'shard'``, ``'params'``, ``'checklist'``, ``'tokenizer'`` or ``'fp8_scales'`` for a file a Meta
    checkpoint has; None for anything else (including every name that is not a plain file name)."""
    if unsafe_name_reason(name) is not None:
        return None
    return next((kind for kind, pattern in _CHECKPOINT_FILES if pattern.fullmatch(name)), None)
