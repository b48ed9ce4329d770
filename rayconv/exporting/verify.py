"""``rayconv verify <MaxText items> <HF export>``: prove an export equals the inverse transform of its source.

Everything is read back, nothing is trusted: the model comes from the export's own ``config.json`` (its fields
through the family's reader, then checked against the checkpoint's leaves, as the export did); each file's header
is read and must be byte-equal to what the safetensors library writes for the tensors it lists; the tensors must
be exactly the model's, in the dtype the files say; the index must name each tensor's file. Then the export's plan
is rebuilt on those files (:func:`rayconv.exporting.plan.build_plan` with ``files``) and every piece is recomputed
from the source — region read, bf16 rounding, ``Transform.invert`` — and compared with the bytes at its range,
one piece in memory at a time. The first difference is one line naming the tensor, the rows and the leaf.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rayconv import families, jsonio
from rayconv.errors import OutputError
from rayconv.exporting import model as models
from rayconv.exporting.plan import build_plan, piece_budget, tensors
from rayconv.exporting.worker import compute_dtype, piece_rows
from rayconv.source.orbax import open_checkpoint
from rayconv.source.safetensors import DTYPES
from rayconv.storage import Location
from rayconv.targets.safetensors_files import (INDEX_FILE, SINGLE_FILE, PlannedFile, PlannedTensor, SafetensorsPlan,
                                               layout)

MAX_HEADER_BYTES = 100 << 20
_NAMES = {"BF16": "bfloat16", "F32": "float32"}


@dataclasses.dataclass
class ExportReport:
    files: int
    tensors: int
    pieces: int
    bytes_compared: int


def is_export(output: str) -> bool:
    """Whether ``output`` holds a Hugging Face directory (config.json and a safetensors file or index)."""
    location = Location.parse(output)
    return location.size("config.json") is not None and (
        location.size(SINGLE_FILE) is not None or location.size(INDEX_FILE) is not None)


def _file_names(out: Location) -> tuple[list[str], bytes | None, dict[str, str] | None]:
    index = out.read_bytes(INDEX_FILE)
    if index is None:
        return [SINGLE_FILE], None, None
    try:
        weight_map = jsonio.loads_object(index).get("weight_map")
    except jsonio.JSONError as exc:
        raise OutputError(f"{out.join(INDEX_FILE).uri}: {exc}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise OutputError(f"{out.join(INDEX_FILE).uri} has no weight_map of tensor → file")
    return sorted(set(weight_map.values())), index, weight_map


def read_layout(out: Location) -> SafetensorsPlan:
    """The export's files as a plan: headers read back and checked to be the safetensors library's bytes."""
    names, index, weight_map = _file_names(out)
    files, planned = [], {}
    for name in names:
        size = out.size(name)
        if size is None or size < 8:
            raise OutputError(f"{out.join(name).uri} is missing or not a safetensors file")
        length = int.from_bytes(out.read_range(name, 0, 8), "little")
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise OutputError(f"{out.join(name).uri}: header length {length} is not a safetensors header")
        try:
            header = jsonio.loads_object(out.read_range(name, 8, 8 + length))
        except jsonio.JSONError as exc:
            raise OutputError(f"{out.join(name).uri}: header: {exc}") from None
        metadata = header.pop("__metadata__", None)
        try:
            entries = [(k, v["dtype"], tuple(v["shape"])) for k, v in header.items()]
            if any(tag not in DTYPES for _, tag, _ in entries):
                raise KeyError("dtype")
        except (KeyError, TypeError):
            raise OutputError(f"{out.join(name).uri}: header entries lack dtype/shape") from None
        expected, spans = layout(entries, metadata)
        if expected != out.read_range(name, 0, len(expected)) or size != len(expected) + sum(n for _, _, n in spans):
            raise OutputError(f"{out.join(name).uri}: its header or size is not what the safetensors library writes "
                              "for the tensors it lists")
        for tensor, start, nbytes in spans:
            tag, shape = next((t, s) for n, t, s in entries if n == tensor)
            planned[tensor] = PlannedTensor(tensor, tag, shape, name, start, nbytes)
            if weight_map is not None and weight_map.get(tensor) != name:
                raise OutputError(f"{out.join(INDEX_FILE).uri} does not say {tensor} is in {name}")
        files.append(PlannedFile(name, expected, size, tuple(t for t, _, _ in spans)))
    if weight_map is not None and set(weight_map) != set(planned):
        raise OutputError(f"{out.join(INDEX_FILE).uri} names other tensors than its files hold")
    return SafetensorsPlan(tuple(files), planned, index)


def verify_export(source: str, output: str) -> ExportReport:
    checkpoint = open_checkpoint(source)
    out = Location.parse(output)
    config = out.join("config.json")
    model = models.from_config_file(config.uri, out.read_bytes("config.json") or b"")
    models.check_checkpoint(checkpoint, model)
    files = read_layout(out)
    tags = {t.dtype for t in files.tensors.values()}
    if len(tags) != 1 or next(iter(tags)) not in _NAMES:
        raise OutputError(f"{out.uri}: tensors in {sorted(tags)}; an export is all bfloat16 or all float32")
    dtype = _NAMES[tags.pop()]
    want = {name: shape for name, _, _, _, _, shape in tensors(model.spec)}
    have = {name: t.shape for name, t in files.tensors.items()}
    if want != have:
        odd = sorted(set(want) ^ set(have)) or sorted(n for n in want if want[n] != have[n])
        raise OutputError(f"{out.uri} does not hold the tensors of {config.uri}'s model (first: {odd[0]})")
    plan = build_plan(checkpoint, model.spec, dtype=dtype, budget=piece_budget(1.0), files=files)
    rules = families.rules(model.spec)
    compared = count = 0
    for unit in plan.units:
        for piece in unit.pieces:
            rows, _ = piece_rows(checkpoint, model.spec, rules[piece.rule], piece, compute_dtype(dtype))
            stored = out.read_range(piece.file, *piece.span)
            mine = np.ascontiguousarray(rows).view(np.uint8).reshape(-1)
            if stored != mine.tobytes():
                at = int(np.argmax(np.frombuffer(stored, np.uint8) != mine))
                raise OutputError(f"{out.join(piece.file).uri}: {piece.tensor} rows [{piece.rows[0]}, {piece.rows[1]}) "
                                  f"differ from the inverse transform of {checkpoint.location.uri} {piece.leaf} (first "
                                  f"at byte {piece.span[0] + at})")
            compared += len(stored)
            count += 1
    return ExportReport(len(files.files), len(files.tensors), count, compared)
