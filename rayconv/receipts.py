"""What travels between the driver and the workers: the job context out, one receipt per unit back.

Both are small and JSON-able (a few hundred bytes): the plan's description of the arrays goes out
once per worker, and a receipt names the child databases a unit wrote and the CRC-32 of every byte
range it read, which is all the driver needs to resume (engine/ledger.py), verify
(:func:`rayconv.checksum.crc_check`) and commit.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from rayconv import trees
from rayconv.models import ModelSpec
from rayconv.leaves import ArraySpec
from rayconv.plan import Plan
from rayconv.tunables import Tunables
from rayconv.tunables import current as current_tunables

if TYPE_CHECKING:
    from rayconv.sink.places import OutputPlace


@dataclasses.dataclass(frozen=True)
class JobContext:
    """What every worker needs besides its unit; shipped once per worker."""

    spec: ModelSpec
    tensor_files: tuple[str, ...]  # source uri per file index (Read.file)
    kinds: tuple[Any, ...]  # the target's output kinds to write (objects; see rayconv.targets)
    quantize_type: str | None
    arrays: dict[Any, dict[tuple[str, ...], ArraySpec]]  # kind → path → array
    items: dict[Any, str]  # kind → staging item uri
    compression: str | None = None
    batch_bytes: int = 0  # output bytes per OCDBT commit (rayconv.job.commit_batch_bytes); 0: after every piece
    scale_files: tuple[str, ...] = ()  # FP8 SKU: fp8_scales_{r}.pt per shard
    layout: str = trees.DEFAULT_LAYOUT  # MaxText tree layout: decides the leaf paths (rayconv.trees)
    # Timeouts, read sizes, concurrency (--storage_timeout_s, --http_timeout_s, RAYCONV_* overrides), taken from the
    # process that creates the context (the driver, which installed ConvertOptions.tunables): a Ray worker is
    # another process, and installs these when it starts (rayconv.engine.actors).
    tunables: Tunables = dataclasses.field(default_factory=current_tunables)
    target: Any = None  # the plan's target (rayconv.targets): the values for a piece, the writer

    @classmethod
    def create(cls, plan: Plan, places: dict[str, OutputPlace], compression: str | None,
               batch_bytes: int = 0) -> "JobContext":
        return cls(
            spec=plan.spec,
            tensor_files=plan.tensor_files,
            kinds=plan.kinds,
            quantize_type=plan.quantize_type,
            arrays={k: {a.path: a for a in plan.arrays(k)} for k in plan.kinds},
            items={k: places[k].item(staging=True).uri for k in plan.kinds},
            compression=compression,
            batch_bytes=batch_bytes,
            scale_files=plan.scale_files,
            layout=plan.layout,
            target=plan.target,
        )


@dataclasses.dataclass
class Receipt:
    """What a finished unit reports: small, JSON-able, enough to resume and to verify."""

    unit: str
    #: What the target's writer returned (MaxText: output name → child database id), read only by the target.
    dbs: dict[str, str]
    bytes_read: int
    bytes_written: int
    seconds: float
    crcs: list[tuple[int, str, int, int, int]]  # (file index, tensor, file offset, length, crc32)
    worker: str = ""
    peak_rss: int = 0
    node: str = ""  # Ray node id, when run on Ray

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Receipt":
        data = dict(data)
        data["crcs"] = [tuple(c) for c in data["crcs"]]
        return cls(**data)
