"""A Meta checkpoint as a whole: its files, params.json, shard indexes, and their consistency.

Opening a checkpoint reads only metadata (params.json, each shard's zip directory and pickle),
then checks that every shard holds exactly the tensors, shapes and dtypes the spec implies, so a
wrong ``--model_path``, a missing or truncated shard or a params.json from another model fails in
seconds, before any output is written.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import pickle
import re
import struct
import zipfile
from typing import Any, Mapping

from rayconv import fp8
from rayconv.errors import SourceError
from rayconv.families import Descriptor, expected_tensors, for_model_name, resolve_spec, tensor_count
from rayconv.models import ModelSpec, load_params
from rayconv.source.bytesource import open_source
from rayconv.leaves import TensorInfo
from rayconv.source.pth import index_pth
from rayconv.storage import Location

SHARD_NAME = re.compile(r"^consolidated\.(\d+)\.pth$")
#: Keys some Meta releases carry that MaxText does not use (llama-2's precomputed rope table).
IGNORED_KEYS = frozenset({"rope.freqs"})
#: params.json is a few hundred bytes; anything this large is not one (and is not read into memory).
MAX_PARAMS_BYTES = 1 << 20


def list_input(input_directory: str) -> dict[str, str]:
    """{file name: uri} of the files directly in a local directory or gs:// prefix (non-recursive)."""
    location = Location.parse(input_directory)
    if location.is_local:
        import os

        if not os.path.isdir(location.path):
            raise SourceError(f"input directory {location.path} does not exist")
        names = [n for n in os.listdir(location.path) if os.path.isfile(os.path.join(location.path, n))]
    else:
        names = [k for k in location.list_keys() if "/" not in k]
        if not names:
            raise SourceError(f"nothing found under {location.uri}")
    return {name: location.join(name).uri for name in sorted(names)}


def shard_files(files: Mapping[str, str], expected: int | None, display: str) -> list[str]:
    """Shard uris in index order; every index from 00 to N-1 must be present, each under one name.

    ``consolidated.1.pth`` next to ``consolidated.01.pth`` names shard 1 twice: which one is the
    right copy is the user's call, so both are refused rather than one picked.
    """
    found: dict[int, str] = {}
    names: dict[int, str] = {}
    for name, uri in sorted(files.items()):
        match = SHARD_NAME.match(name)
        if not match:
            continue
        index = int(match.group(1))
        if index in names:
            raise SourceError(f"{names[index]} and {name} in {display} are both shard {index:02d}; "
                              f"remove the one that is not Meta's consolidated.{index:02d}.pth")
        found[index], names[index] = uri, name
    if not found:
        raise SourceError(f"no consolidated.NN.pth shards in {display}")
    count = expected if expected is not None else max(found) + 1
    missing = next((i for i in range(count) if i not in found), None)  # lazy: an index can be absurd
    if missing is not None:
        raise SourceError(f"missing shard consolidated.{missing:02d}.pth in {display} "
                          f"(expected {count} shards, found {len(found)})")
    extra = sorted(i for i in found if i >= count)
    if extra:
        raise SourceError(f"unexpected shard consolidated.{extra[0]:02d}.pth in {display} "
                          f"(--model_path implies {count} shards)")
    return [found[i] for i in range(count)]


def _display_name(uri: str) -> str:
    return uri.split("?", 1)[0]


#: What parsing hostile bytes can raise from inside the index reader (a pickle of allowed classes with
#: wrong argument types or arity, absurd nesting). A shard that makes the parser fail this way is not a
#: readable checkpoint; the original exception stays chained (shown with --verbose).
_PARSE_ERRORS = (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError, RecursionError,
                 EOFError, pickle.UnpicklingError, struct.error, zipfile.BadZipFile)


def _index_untrusted(uri: str) -> dict[str, TensorInfo]:
    """index_pth, with any parse failure of the (untrusted) shard reported as a one-line SourceError."""
    name = _display_name(uri)
    try:
        return index_pth(open_source(uri), name)
    except SourceError:
        raise
    except _PARSE_ERRORS as exc:
        raise SourceError(f"{name}: not a readable torch checkpoint (its tensor index is malformed: "
                          f"{type(exc).__name__}: {str(exc)[:200]})") from exc


@dataclasses.dataclass
class MetaCheckpoint:
    spec: ModelSpec
    tensor_files: list[str]  # consolidated.NN.pth uri per shard (file index = shard)
    indexes: list[dict[str, TensorInfo]]
    files: dict[str, str]
    scales: Any = None  # rayconv.fp8.Scales of Meta's FP8 SKU; None for bf16 checkpoints

    @classmethod
    def open(cls, files: Mapping[str, str], *, display: str, model_name: str | None,
             descriptor: Descriptor | None, kv_heads: int | None = None, threads: int = 8) -> "MetaCheckpoint":
        if "params.json" not in files:
            raise SourceError(f"params.json is missing from {display}")
        params_source = open_source(files["params.json"])
        params_size = params_source.size()
        if params_size > MAX_PARAMS_BYTES:
            raise SourceError(f"{display}/params.json is {params_size} bytes: not a Meta params.json")
        params = load_params(params_source.read(0, params_size).decode("utf-8", "replace"),
                             f"{display}/params.json")
        shards = shard_files(files, descriptor.shards if descriptor else None, display)

        def index(uri: str) -> dict[str, TensorInfo]:
            return _index_untrusted(uri)

        with concurrent.futures.ThreadPoolExecutor(max_workers=min(threads, len(shards))) as pool:
            indexes = list(pool.map(index, shards))

        tok = indexes[0].get("tok_embeddings.weight")
        if tok is None:
            raise SourceError(f"{_display_name(shards[0])} has no tok_embeddings.weight: not a Meta Llama checkpoint")
        name = descriptor.family if descriptor else model_name
        family = for_model_name(name)  # an unknown or missing name is refused by resolve_spec
        # llama-2 splits the embedding on its width; later families on the vocabulary.
        vocab = tok.shape[0] * (1 if family and family.embedding_split_axis(name) == 1 else len(shards))
        spec = resolve_spec(params, n_shards=len(shards), vocab_size=vocab, model_name=model_name,
                            descriptor=descriptor, kv_heads_override=kv_heads, source=f"{display}/params.json")
        checkpoint = cls(spec=spec, tensor_files=shards, indexes=indexes, files=dict(files))
        if fp8.detect(files, indexes) or (descriptor is not None and descriptor.sku == "fp8"):
            checkpoint.scales = _open_fp8(files, shards, indexes, spec, display, descriptor)
        checkpoint.check_shapes()
        return checkpoint

    def check_shapes(self) -> None:
        """Every shard must hold exactly the expected tensors, as bf16, with the expected shapes."""
        spec = self.spec
        # Bound what is built below by what the shards hold, so params.json cannot make it grow: when it names
        # more tensors than a shard has, one of the first len(index) + 1 names is missing, found lazily.
        count = tensor_count(spec)
        for uri, index in zip(self.tensor_files, self.indexes):
            if count > len(set(index) - IGNORED_KEYS):
                missing = next(key for key, _ in expected_tensors(spec, "meta") if key not in index)
                raise SourceError(f"{_display_name(uri)} has no tensor {missing} (params.json says "
                                  f"{spec.n_layers} layers)")
        expected = dict(expected_tensors(spec, "meta"))
        for shard, (uri, index) in enumerate(zip(self.tensor_files, self.indexes)):
            name = _display_name(uri)
            for key, shape in expected.items():
                info = index.get(key)
                if info is None:
                    raise SourceError(f"{name} has no tensor {key} (params.json says {spec.n_layers} layers)")
                if tuple(info.shape) != shape:
                    raise SourceError(f"{name}: {key} has shape {list(info.shape)}, but params.json and "
                                      f"{spec.n_shards} shards imply {list(shape)} (params.json disagrees "
                                      "with the shards, or the wrong --model_path)")
                wanted = self.expected_dtype(key)
                if info.dtype != wanted:
                    kind = "FP8 SKU: float8 FFN weights of layers 1..n-2 only" if self.fp8 else "bf16 checkpoint"
                    raise SourceError(f"{name}: {key} is {info.dtype}; expected {wanted} ({kind})")
            unexpected = sorted(set(index) - set(expected) - IGNORED_KEYS)
            if unexpected:
                raise SourceError(f"{name} holds unexpected tensor {unexpected[0]} (params.json says "
                                  f"{spec.n_layers} layers; is this a Llama checkpoint of the named family?)")

    @property
    def fp8(self) -> bool:
        return self.scales is not None

    #: Meta's downloads carry a checklist.chk that --verify_md5 checks.
    checklist_note = None

    def describe_files(self) -> str:
        return f"{self.spec.n_shards} shards"

    def locate(self, shard: int, key: str) -> tuple[int, TensorInfo]:
        """Meta's layout: tensor ``key`` of shard s is in file s."""
        return shard, self.indexes[shard][key]

    def expected_dtype(self, key: str) -> str:
        return fp8.FP8_DTYPE if self.fp8 and fp8.is_fp8_tensor(key, self.spec.n_layers) else "bfloat16"

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for index in self.indexes for info in index.values())


def _open_fp8(files: Mapping[str, str], shards: list[str], indexes: list[dict[str, TensorInfo]], spec: ModelSpec,
              display: str, descriptor: Descriptor | None) -> "fp8.Scales":
    """An FP8 checkpoint (Meta's FP8 SKU): the descriptor must agree, and every shard needs its scale file."""
    has_fp8 = any(info.dtype == fp8.FP8_DTYPE for index in indexes for info in index.values())
    if descriptor is not None and descriptor.sku != "fp8":
        raise SourceError(f"{display} holds an FP8 checkpoint (float8 FFN weights / fp8_scales_*.pt) but "
                          f"--model_path {descriptor.text} names a bf16 SKU; use e.g. Llama3.1-405B-Instruct")
    if not has_fp8:
        raise SourceError(f"{display} has no float8 tensors, but "
                          + (f"--model_path {descriptor.text} names Meta's FP8 SKU" if descriptor is not None
                             and descriptor.sku == "fp8" else "it has fp8_scales_*.pt files")
                          + "; is this the bf16 checkpoint (:bf16-mp8 / :bf16-mp16)?")
    return fp8.open_scales(files, shards, display, spec.n_layers, indexes)
