"""A Hugging Face checkpoint (Llama, Qwen3) as a whole: config.json, the safetensors files, and their consistency.

What people download from the Hub (``huggingface-cli download meta-llama/Llama-3.1-405B-Instruct``):
``config.json``, ``model-0000k-of-0000n.safetensors`` and ``model.safetensors.index.json`` (plus, under
``original/``, Meta's own ``consolidated.NN.pth``). The converter treats it as *one logical shard*
spread over several files: every tensor is whole (never split, each kv head once), so with
``n_shards = 1`` the family's rules (:mod:`rayconv.families`) apply unchanged, under each rule's HF name, and
:meth:`HFCheckpoint.locate` tells the planner which file holds each tensor. Only the q/k row order differs (HF's
conversion half-split each head), which the family's transforms undo where MaxText wants Meta's order.

Opening reads config.json, the index and each file's header (never tensor data), then checks that
the index, the headers and config.json agree and that every tensor the model needs is present exactly
once, as bf16, with the shape config.json implies, so a missing, truncated or foreign file fails
before anything is written.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import re
from typing import Any, Mapping

from rayconv import jsonio
from rayconv.errors import SourceError, SpecError
from rayconv.families import FAMILIES, expected_tensors, for_hf_model_type
from rayconv.models import ModelSpec
from rayconv.progress import LOG
from rayconv.source.bytesource import open_source
from rayconv.leaves import TensorInfo
from rayconv.source.safetensors import index_safetensors
from rayconv.storage import Location

SOURCE_FORMATS = ("auto", "meta", "hf")
CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
#: ``<stem>-0000k-of-0000n.safetensors``; longer digit runs are no shard count (and no int() of 5000 digits).
_SHARDED = re.compile(r"^(?P<stem>.+)-(?P<k>\d{1,18})-of-(?P<n>\d{1,18})\.safetensors$")
_META_SHARD = re.compile(r"^consolidated\.\d+\.pth$")
#: Tensors some HF Llama checkpoints carry that are derived, not learned (old transformers' rope cache).
IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class HFModelSpec(ModelSpec):
    """A ModelSpec read from config.json: ``source_format`` tells the mapping the q/k rows are half-split."""

    source_format: str = "hf"


# ------------------------------------------------------------------------------------------------
# Which format is this directory?


def _is_hf(files: Mapping[str, str]) -> bool:
    return CONFIG in files and any(name.endswith(".safetensors") for name in files)


def _is_meta(files: Mapping[str, str]) -> bool:
    return any(_META_SHARD.match(name) for name in files)


def _subfolder(files: Mapping[str, str], input_directory: str | None, name: str) -> str | None:
    """uri of ``<input>/<name>/``: from the input directory, or next to any listed file."""
    if input_directory and not input_directory.startswith(("http://", "https://")):
        return Location.parse(input_directory).join(name).uri
    for uri in files.values():
        if "://" not in uri or uri.startswith("gs://"):
            return Location.parse(uri).parent().join(name).uri
    return None


def _original(files: Mapping[str, str], input_directory: str | None, display: str,
              descriptor_shards: int | None) -> tuple[dict[str, str], str] | None:
    """Meta's files in a Hub snapshot's ``original/`` (or ``original/mpN/`` for 405B), if there."""
    from rayconv.source.checkpoint import list_input

    base = _subfolder(files, input_directory, "original")
    if base is None:
        return None
    try:
        inner = list_input(base)
    except SourceError:
        return None
    if _is_meta(inner):
        return inner, f"{display.rstrip('/')}/original"
    sharded = [n for n in Location.parse(base).list_folders(follow_symlinks=True) if re.fullmatch(r"mp\d+", n)]
    if not sharded:
        return None
    pick = f"mp{descriptor_shards}" if descriptor_shards else None
    if pick not in sharded:
        raise SourceError(f"{display}/original holds Meta checkpoints in {', '.join(sharded)}: choose one with "
                          f"--model_path (e.g. Llama3.1-405B-Instruct:bf16-{sharded[0]}) or point --input_directory "
                          "at that folder")
    return list_input(Location.parse(base).join(pick).uri), f"{display.rstrip('/')}/original/{pick}"


def detect_format(files: Mapping[str, str], source_format: str, display: str, *, input_directory: str | None = None,
                  descriptor_shards: int | None = None) -> tuple[str, dict[str, str], str]:
    """→ (``"meta"`` or ``"hf"``, the files to read, how to name them in messages).

    ``auto`` picks whichever checkpoint the directory holds (Meta's ``consolidated.NN.pth`` or HF's
    ``config.json`` + ``*.safetensors``) and refuses to guess when it holds both. A Hub snapshot's
    ``original/`` folder is Meta's checkpoint: used with ``--source_format meta`` at the snapshot root,
    or by ``auto`` when the root has nothing else (``huggingface-cli download --include "original/*"``).
    """
    if source_format not in SOURCE_FORMATS:
        raise SpecError(f"unknown --source_format {source_format!r} (choose from {', '.join(SOURCE_FORMATS)})")
    files = dict(files)
    hf, meta = _is_hf(files), _is_meta(files)
    if source_format == "hf":
        if not hf:
            raise SourceError(f"{display} is not a Hugging Face checkpoint: it needs {CONFIG} and *.safetensors")
        return "hf", files, display
    if source_format == "auto" and hf and meta:
        raise SourceError(f"{display} holds both a Meta checkpoint (consolidated.NN.pth) and a Hugging Face one "
                          "(*.safetensors): say which with --source_format meta or --source_format hf")
    if source_format == "auto" and hf:
        return "hf", files, display
    if meta:
        return "meta", files, display
    original = _original(files, input_directory, display, descriptor_shards)
    if original is not None:
        return "meta", original[0], original[1]
    if source_format == "auto" and CONFIG in files:
        raise SourceError(f"{display} has {CONFIG} but no *.safetensors files (incomplete Hugging Face download?)")
    return "meta", files, display  # MetaCheckpoint names what is missing


# ------------------------------------------------------------------------------------------------
# config.json → ModelSpec


def spec_from_config(config: Mapping[str, Any], *, model_name: str | None, model_path: str | None,
                     kv_heads: int | None = None, source: str = CONFIG) -> ModelSpec:
    """config.json → the ModelSpec the Meta path would build, read by the family its ``model_type`` names.

    What is refused here is refused for every family: another model type, and a quantized variant.
    """
    model_type = config.get("model_type", "llama")
    family = for_hf_model_type(model_type) if isinstance(model_type, str) else None
    if family is None:
        known = ", ".join(t for f in FAMILIES.values() for t in f.hf_model_types)
        raise SpecError(f"{source}: model_type {str(config.get('model_type'))[:40]!r} is not a model rayconv converts "
                        f"(model types: {known})")
    quantization = config.get("quantization_config")
    if quantization is not None:  # e.g. meta-llama/Llama-3.1-405B-Instruct-FP8 (fbgemm_fp8: float8 MLP weights)
        method = quantization.get("quant_method") if isinstance(quantization, Mapping) else quantization
        raise SpecError(f"{source}: quantization_config {method!r} (a quantized Hugging Face variant such as the -FP8 "
                        "repos) is not supported; convert the bf16 repository, or Meta's FP8 SKU from its "
                        "consolidated.NN.pth + fp8_scales_*.pt files")
    spec = family.spec_from_config(config, model_name=model_name, model_path=model_path, kv_heads=kv_heads,
                                   source=source)
    # A Meta-shaped spec (Llama's) is marked as read from HF files (half-split q/k rows); a family with its own
    # spec class (Qwen3Spec) already says its source format.
    return HFModelSpec(**dataclasses.asdict(spec)) if type(spec) is ModelSpec else spec


# ------------------------------------------------------------------------------------------------
# The checkpoint


#: config.json is ~1 KB and the 405B index ~100 KB: a larger file is not one (and is not read into memory).
MAX_JSON_BYTES = 16 << 20


def _read_json(uri: str, display: str) -> dict[str, Any]:
    """A JSON object from ``uri``, through the bounded reader: a hostile file is one line naming it."""
    source = open_source(uri)
    size = source.size()
    if size > MAX_JSON_BYTES:
        raise SourceError(f"{display} is {size} bytes (at most {MAX_JSON_BYTES}): not a Hugging Face JSON file")
    try:
        return jsonio.loads_object(source.read(0, size))
    except jsonio.JSONError as exc:
        raise SourceError(f"{display}: {exc}") from None


def _weight_map(index: Mapping[str, Any], display: str) -> dict[str, str]:
    """The index's ``weight_map``: {tensor name: file name}, every value a plain string."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f"{display}/{INDEX} has no weight_map")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            shown = repr(name) if len(repr(name)) <= 40 else repr(name)[:37] + "..."
            raise SourceError(f"{display}/{INDEX}: weight_map places {key[:100]} in {shown}, which is not a file "
                              "name")
    return weight_map


def _weight_files(files: Mapping[str, str], index: Mapping[str, Any] | None, display: str) -> list[str]:
    """Names of the safetensors files that make up the checkpoint, all of which must be present.

    A name ``<stem>-0000k-of-0000n`` implies all n files (even those the index forgot), checked in order and
    only as far as files exist: a count of 999999999999 costs one look-up more than the files there are.
    """
    where = f" (listed in {INDEX})" if index is not None else ""
    names = set(_weight_map(index, display).values()) if index is not None else {
        n for n in files if n.endswith(".safetensors")}
    for name in sorted(names):
        if name not in files:
            raise SourceError(f"{name} is missing from {display}{where}")
    series: dict[tuple[str, int], int] = {}  # (stem, count) → digits of the first name: what the series looks like
    for match in filter(None, map(_SHARDED.match, sorted(names))):
        series.setdefault((match["stem"], int(match["n"])), len(match["k"]))
    for (stem, total), width in series.items():
        k = 1
        while k <= total and k <= len(files):  # a name beyond len(files) cannot be there
            name = f"{stem}-{k:0{width}d}-of-{total:0{width}d}.safetensors"
            if name not in files:
                break
            names.add(name)
            k += 1
        if k <= total:
            missing = f"{stem}-{k:0{width}d}-of-{total:0{width}d}.safetensors"
            raise SourceError(f"{missing} is missing from {display} ({stem}-*-of-{total:0{width}d}.safetensors "
                              f"names {total} files)")
    return sorted(names)


@dataclasses.dataclass
class HFCheckpoint:
    """config.json + safetensors headers; the planner sees one logical shard located across files."""

    spec: HFModelSpec
    tensor_files: list[str]  # uri per safetensors file: Read.file indexes this
    indexes: list[dict[str, TensorInfo]]  # per file: {HF name: TensorInfo}
    files: dict[str, str]
    where: dict[str, tuple[int, TensorInfo]]  # HF name → (file index, TensorInfo)
    scales: None = None  # the driver's FP8 hook (MetaCheckpoint.scales); HF's FP8 variants are refused (spec)
    fp8: bool = False

    @classmethod
    def open(cls, files: Mapping[str, str], *, display: str, model_name: str | None, model_path: str | None,
             kv_heads: int | None = None, threads: int = 8) -> "HFCheckpoint":
        config = _read_json(files[CONFIG], f"{display}/{CONFIG}")
        spec = spec_from_config(config, model_name=model_name, model_path=model_path, kv_heads=kv_heads,
                                source=f"{display}/{CONFIG}")
        index = _read_json(files[INDEX], f"{display}/{INDEX}") if INDEX in files else None
        names = _weight_files(files, index, display)
        uris = [files[n] for n in names]

        def read(i: int) -> dict[str, TensorInfo]:
            return index_safetensors(open_source(uris[i]), f"{display.rstrip('/')}/{names[i]}")

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(threads, len(uris)))) as pool:
            indexes = list(pool.map(read, range(len(uris))))
        located = _locate_all(names, indexes, index, display)
        where = _check(spec, names, indexes, located, config, display)
        return cls(spec=spec, tensor_files=uris, indexes=indexes, files=dict(files), where=where)

    def locate(self, shard: int, key: str) -> tuple[int, TensorInfo]:
        """plan.Locate: the one logical shard's tensor ``key`` (its HF name) → (file index, TensorInfo)."""
        if shard != 0:
            raise ValueError(f"a Hugging Face checkpoint has one logical shard, not shard {shard}")
        return self.where[key]

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for index in self.indexes for info in index.values())

    #: safetensors carry no checksum, and a Hub repository no checklist.chk.
    checklist_note = "Hugging Face checkpoint: no checklist.chk to check md5 against, and safetensors have no CRCs"

    def describe_files(self) -> str:
        return f"{len(self.tensor_files)} safetensors files"


def _locate_all(names: list[str], indexes: list[dict[str, TensorInfo]], index: Mapping[str, Any] | None,
                display: str) -> dict[str, int]:
    """{HF name: file index}: each tensor in exactly one header, and where the index says it is."""
    located: dict[str, int] = {}
    for i, tensors in enumerate(indexes):
        for key in tensors:
            if key in located:
                raise SourceError(f"tensor {key} is listed twice: in {names[located[key]]} and {names[i]} "
                                  f"({display})")
            located[key] = i
    if index is not None:
        weight_map = index["weight_map"]
        for key, name in weight_map.items():
            if key not in located:
                raise SourceError(f"{INDEX} places {key} in {name}, whose header does not have it ({display})")
            if names[located[key]] != name:
                raise SourceError(f"{INDEX} places {key} in {name}, but it is in {names[located[key]]} ({display})")
        extra = sorted(set(located) - set(weight_map))
        if extra:
            raise SourceError(f"{names[located[extra[0]]]} holds {extra[0]}, which {INDEX} does not list ({display})")
    return located


def _check(spec: ModelSpec, names: list[str], indexes: list[dict[str, TensorInfo]], located: dict[str, int],
           config: Mapping[str, Any], display: str) -> dict[str, tuple[int, TensorInfo]]:
    """Every tensor the spec's family needs, once, bf16, shaped as config.json implies; nothing unexpected."""
    where: dict[str, tuple[int, TensorInfo]] = {}
    for key, shape in expected_tensors(spec, "hf"):
        if key not in located:
            hint = (" (tie_word_embeddings: rayconv needs lm_head.weight stored)"
                    if key == "lm_head.weight" and config.get("tie_word_embeddings") else "")
            raise SourceError(f"{display} has no tensor {key} ({CONFIG} says {spec.n_layers} layers){hint}")
        file = located[key]
        info = indexes[file][key]
        if tuple(info.shape) != shape:
            raise SourceError(f"{names[file]}: {key} has shape {list(info.shape)}, but {CONFIG} implies "
                              f"{list(shape)} ({CONFIG} disagrees with the tensors)")
        if info.dtype != "bfloat16":
            raise SourceError(f"{names[file]}: {key} is {info.dtype}; rayconv converts bf16 checkpoints")
        where[key] = (file, info)
    if config.get("tie_word_embeddings") and "lm_head.weight" in located:
        # transformers (5.x) loads such a checkpoint the same way: it ties the two only when they are equal, and
        # when they differ it keeps the stored lm_head.weight ("we will NOT tie them") with a warning. So do we.
        LOG.warning("%s sets tie_word_embeddings but also stores lm_head.weight: the logits kernel is converted from "
                    "the stored lm_head.weight, as transformers loads it (where it differs from "
                    "model.embed_tokens.weight, transformers does not tie them either)", CONFIG)
    unexpected = sorted(k for k in set(located) - set(where) if not IGNORED.match(k))
    if unexpected:
        raise SourceError(f"{names[located[unexpected[0]]]} holds unexpected tensor {unexpected[0]} ({CONFIG} says "
                          f"{spec.n_layers} layers; is this a {spec.maxtext_name} checkpoint?)")
    return where
