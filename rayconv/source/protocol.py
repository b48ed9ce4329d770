"""The Source seam: what an opened input checkpoint offers the planner and the driver, whatever its format.

A source format is a reader module (``source/checkpoint.py`` for Meta's ``consolidated.NN.pth`` shards, with the
FP8 SKU's scale files; ``source/hf.py`` for Hugging Face safetensors) whose ``open`` returns an object of this
shape. The planner asks it where each tensor is (:meth:`Checkpoint.locate`, by the format's own tensor names); the
driver asks it how to describe itself and whether a ``checklist.chk`` can vouch for its bytes. Nothing downstream
tests which format it is.
"""

from __future__ import annotations

from typing import Any, Protocol

from rayconv.leaves import TensorInfo
from rayconv.models import ModelSpec


class Checkpoint(Protocol):
    """An opened input checkpoint (detected and indexed; no tensor bytes read)."""

    spec: ModelSpec
    #: Source file uri per file index (``Read.file``): consolidated.NN.pth shards, or safetensors files.
    tensor_files: list[str]
    #: Per file: tensor name (the format's own) → where its bytes are.
    indexes: list[dict[str, TensorInfo]]
    #: Every input file name → uri (params.json / config.json, checklist.chk, …).
    files: dict[str, str]
    #: Meta's FP8 SKU scale files (``rayconv.fp8.Scales``); None otherwise.
    scales: Any

    @property
    def fp8(self) -> bool:
        """Whether some tensors are float8 with row scales (dequantized on the fly)."""

    @property
    def nbytes(self) -> int:
        """Tensor bytes the checkpoint holds."""

    @property
    def checklist_note(self) -> str | None:
        """Why ``--verify_md5`` has nothing to check for this format (None: a ``checklist.chk`` may vouch)."""

    def describe_files(self) -> str:
        """The files, for the log line that introduces the model (``16 shards``, ``4 safetensors files``)."""

    def locate(self, shard: int, key: str) -> tuple[int, TensorInfo]:
        """Where logical shard ``shard``'s copy of tensor ``key`` (the format's name for it) lives: (file, info)."""
