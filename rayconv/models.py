"""Model specs: what a Meta Llama checkpoint is, and which MaxText model it becomes.

Three sources of truth meet here and must agree:

* ``params.json`` gives the dimensions (but lies about kv heads for 405B MP16, where it says 16 and
  the model has 8: Meta repeated each kv head across two shards);
* the ``--model_name`` / ``--model_path`` flags name the family (which decides the rope layout and
  the MaxText model name) and the SKU (which decides the shard count);
* MaxText's model configs, for the published sizes, give the real number of kv heads.

The shard headers are checked against the resulting :class:`ModelSpec` in :mod:`rayconv.source.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

from rayconv import catalog, jsonio
from rayconv.errors import SpecError

#: ``--model_name`` values (the tutorial's spelling) → MaxText model-name prefix.
FAMILIES: dict[str, str] = {
    "llama-2": "llama2",
    "llama-3": "llama3",
    "llama-3.1": "llama3.1",
    "llama-3.3": "llama3.3",
}

#: Families whose Meta .pth q/k weights are reordered (even head_dim indices, then odd) to match
#: MaxText's default half-split rope. llama3.1/3.3 keep Meta's interleaved order: MaxText uses its
#: LLaMA rotary embedding for them (maxtext-format.md §1.4).
ROPE_PERMUTED_FAMILIES = frozenset({"llama-2", "llama-3"})

#: Families whose rope is Llama 3.1's scaled rope (params.json ``use_scaled_rope: true``, config.json
#: ``rope_type: llama3``): MaxText builds llama3.1/3.3 with it, and no other family.
SCALED_ROPE_FAMILIES = frozenset({"llama-3.1", "llama-3.3"})


@dataclasses.dataclass(frozen=True)
class KnownSize:
    """A published size: MaxText's config values (shard counts are the catalog's)."""

    size: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int


#: family → published sizes (MaxText ``configs/models/*.yml``; Meta's release layouts).
KNOWN_SIZES: dict[str, tuple[KnownSize, ...]] = {
    "llama-2": (
        KnownSize("7b", 4096, 32, 32, 32),
        KnownSize("13b", 5120, 40, 40, 40),
        KnownSize("70b", 8192, 80, 64, 8),
    ),
    "llama-3": (
        KnownSize("8b", 4096, 32, 32, 8),
        KnownSize("70b", 8192, 80, 64, 8),
    ),
    "llama-3.1": (
        KnownSize("8b", 4096, 32, 32, 8),
        KnownSize("70b", 8192, 80, 64, 8),
        KnownSize("405b", 16384, 126, 128, 8),
    ),
    "llama-3.3": (KnownSize("70b", 8192, 80, 64, 8),),
}

@dataclasses.dataclass(frozen=True)
class Descriptor:
    """A Meta model descriptor such as ``Llama3.1-405B-Instruct:bf16-mp16`` that rayconv can convert.

    The grammar, shard counts and SKUs are :mod:`rayconv.catalog`'s; this adds what conversion needs
    on top: a family MaxText has, a published size (unless the variant names the shard count), the SKU.
    """

    text: str
    family: str
    size: str
    instruct: bool
    shards: int | None
    #: "bf16", or "fp8" for Meta's FP8 405B SKU (FFN weights of layers 1..n-2 as float8 with row scales).
    sku: str = "bf16"

    @classmethod
    def parse(cls, text: str) -> "Descriptor":
        model = catalog.lookup(text)
        if model.family not in FAMILIES:
            raise SpecError(f"--model_path {text!r}: Llama {model.family[len('llama-'):]} is not supported "
                            f"(supported: {', '.join(FAMILIES)})")
        if not model.variant and not model.published:
            raise SpecError(f"--model_path {text!r}: {model.family} has no published {model.size} model")
        # The bare 405B descriptor (or :fp8) is Meta's FP8 SKU: 8 shards (MP8 layout) plus fp8_scales_{r}.pt.
        return cls(text=text, family=model.family, size=model.size, instruct=model.instruct, shards=model.shards,
                   sku=model.dtype)


def _known_size(family: str, size: str) -> KnownSize | None:
    return next((k for k in KNOWN_SIZES.get(family, ()) if k.size == size), None)


def ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward width: int(2/3 · 4·dim), times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything the planner needs to know about one source checkpoint.

    ``n_kv_heads`` is the model's real kv-head count (MaxText's); ``params_kv_heads`` is what
    params.json says, which differs for 405B MP16.
    """

    family: str
    maxtext_name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    params_kv_heads: int
    vocab_size: int
    ffn_dim: int
    norm_eps: float
    rope_theta: float
    use_scaled_rope: bool
    n_shards: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def rope_permuted(self) -> bool:
        return self.family in ROPE_PERMUTED_FAMILIES

    @property
    def kv_step(self) -> int:
        """Shard stride for wk/wv: 405B MP16 stores each kv head twice (shards 2j, 2j+1)."""
        return max(1, self.n_shards // self.n_kv_heads)

    @property
    def embedding_split_axis(self) -> int:
        """llama-2 shards tok_embeddings on dim 1 (ParallelEmbedding); llama-3+ on the vocab axis."""
        return 1 if self.family == "llama-2" else 0

    @property
    def query_scale_divisor(self) -> float:
        """sqrt(head_dim) rounded to bf16, as MaxText's llama_or_mistral_ckpt divides the query by it."""
        import ml_dtypes
        import numpy as np

        return float(np.asarray(math.sqrt(self.head_dim), dtype=ml_dtypes.bfloat16))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ModelSpec":
        return cls(**data)


#: Upper bounds for params.json dimensions, far above every published Llama (405B: dim 16384, 126 layers,
#: 128 heads, vocab 128256, ffn 53248) and low enough that nothing proportional to them is allocated before
#: the shards are compared with them. An absurd value fails here in microseconds.
MAX_DIM = 1 << 17
MAX_LAYERS = 1 << 12
MAX_HEADS = 1 << 12
MAX_VOCAB = 1 << 24
MAX_FFN_DIM = 1 << 20
#: An RMSNorm epsilon is a small positive number (Llama: 1e-5 or 1e-6); MaxText stores it as a float32.
MAX_NORM_EPS = 1.0
#: Rope base: Llama 2 10000, Llama 3 500000; far above any, and well inside float32.
MAX_ROPE_THETA = 1e12


def _require(params: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in params:
        raise SpecError(f"{source} has no {key!r}")
    return params[key]


def int_field(params: Mapping[str, Any], key: str, source: str, *, low: int, high: int,
              default: Any = ..., allow: tuple[int, ...] = ()) -> Any:
    """``params[key]`` as an int in [low, high] (or one of ``allow``); JSON floats, strings and bools are refused.

    ``default`` is returned when the key is absent or null; without one the key is required. The one check of
    the integer fields of params.json and config.json, so both name a bad field the same way.
    """
    value = params.get(key)
    if value is None:
        if default is ...:
            _require(params, key, source)
            raise SpecError(f"{source}: {key} is null; it must be an integer")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{source}: {key} must be an integer, got {_shown(value)}")
    if value in allow:
        return value
    if not low <= value <= high:
        raise SpecError(f"{source}: {key} {_shown(value)} is out of range (expected {low} to {high})")
    return value


def float_field(params: Mapping[str, Any], key: str, source: str, default: float | None, *,
                high: float = math.inf, low: float = 0.0, null: bool = True) -> float | None:
    """``params[key]`` as a finite number in (``low``, ``high``] (ints allowed), or ``default`` when absent
    (or null, unless ``null`` is False: transformers keeps a null and the model then fails).

    The one check of the real-valued fields of params.json and config.json (eps, rope theta and scaling).
    """
    value = params.get(key)
    if value is None and (key not in params or null):
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{source}: {key} must be a number, got {_shown(value)}")
    value = float(value)
    if not (math.isfinite(value) and low < value <= high):
        what = "a positive finite number" if low == 0 else f"a finite number above {low:g}"
        raise SpecError(f"{source}: {key} {_shown(value)} must be {what}"
                        + (f" at most {high:g}" if high != math.inf else ""))
    return value


#: llama3 rope scaling: the fields transformers requires, as positive numbers (MaxText's llama3.1 rope fixes
#: them; rayconv only checks they are a rope at all). The Hub's: factor 8, 1, 4, 8192.
_LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor")
MAX_ROPE_FACTOR = 1e4
MAX_POSITIONS = 1 << 24


def check_llama3_rope(rope: Mapping[str, Any], where: str) -> None:
    """A ``rope_type: llama3`` block is a rope: every field present, finite, positive, low < high frequency."""
    for key in _LLAMA3_ROPE:
        if rope.get(key) is None:
            raise SpecError(f"{where} has no {key} (rope_type llama3 needs {', '.join(_LLAMA3_ROPE)} and "
                            "original_max_position_embeddings)")
    _, low, high = (float_field(rope, key, where, None, high=MAX_ROPE_FACTOR) for key in _LLAMA3_ROPE)
    int_field(rope, "original_max_position_embeddings", where, low=1, high=MAX_POSITIONS)
    if not low < high:
        raise SpecError(f"{where}: high_freq_factor {high:g} must be above low_freq_factor {low:g}")


def check_scaled_rope(family: str, scaled: bool, source: str, setting: str) -> None:
    """The one rule tying the rope to the family, for params.json and config.json alike: Llama 3.1/3.3 have the
    scaled rope and nothing else does. A mismatch would give other query/key kernels (the rope order is the
    family's), so it is refused. ``setting`` is how the source says it (``use_scaled_rope true``)."""
    if scaled != (family in SCALED_ROPE_FAMILIES):
        meaning = "Llama 3.1/3.3's scaled rope" if scaled else "no scaled rope: Llama 2/3"
        raise SpecError(f"{source} has {setting} ({meaning}), which disagrees with model {family}")


def _shown(value: Any) -> str:
    """A short, one-line rendering of a (possibly hostile) JSON value for an error message."""
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def resolve_spec(
    params: Mapping[str, Any],
    *,
    n_shards: int,
    vocab_size: int | None,
    model_name: str | None,
    descriptor: Descriptor | None,
    kv_heads_override: int | None = None,
    source: str = "params.json",
) -> ModelSpec:
    """Combine params.json, the CLI's model flags and the shard count into one ModelSpec.

    ``vocab_size`` is the vocabulary seen in the shards; it is used when params.json says -1
    (Meta's llama-2 release does) and must agree with params.json otherwise.
    """
    family = model_name
    if descriptor is not None:
        if family is not None and family != descriptor.family:
            raise SpecError(f"--model_name {family} disagrees with --model_path {descriptor.text} "
                            f"({descriptor.family})")
        family = descriptor.family
    if family is None:
        raise SpecError("say which model this is: --model_name (llama-2, llama-3, llama-3.1, llama-3.3) "
                        "or --model_path (e.g. Llama3.1-405B-Instruct:bf16-mp16)")
    if family not in FAMILIES:
        raise SpecError(f"unknown --model_name {family!r} (supported: {', '.join(FAMILIES)})")

    dim = int_field(params, "dim", source, low=1, high=MAX_DIM)
    n_layers = int_field(params, "n_layers", source, low=1, high=MAX_LAYERS)
    n_heads = int_field(params, "n_heads", source, low=1, high=min(MAX_HEADS, dim))
    params_kv = int_field(params, "n_kv_heads", source, low=1, high=n_heads, default=n_heads)
    if dim % n_heads:
        raise SpecError(f"{source}: dim {dim} is not a multiple of n_heads {n_heads}")
    declared_vocab = int_field(params, "vocab_size", source, low=1, high=MAX_VOCAB, default=-1, allow=(-1,))
    if declared_vocab <= 0:
        if vocab_size is None:
            raise SpecError(f"{source} has vocab_size {declared_vocab} and the shards do not say")
        declared_vocab = vocab_size
    elif vocab_size is not None and vocab_size != declared_vocab:
        raise SpecError(f"{source} says vocab_size {declared_vocab} but the shards hold {vocab_size} rows "
                        "of tok_embeddings")
    multiple_of = int_field(params, "multiple_of", source, low=1, high=MAX_FFN_DIM, default=256)
    multiplier = float_field(params, "ffn_dim_multiplier", source, None, high=64.0)
    hidden = ffn_dim(dim, multiple_of, multiplier)
    if not 1 <= hidden <= MAX_FFN_DIM:
        raise SpecError(f"{source}: dim {dim}, multiple_of {multiple_of} and ffn_dim_multiplier {multiplier} give "
                        f"a feed-forward width of {hidden} (expected 1 to {MAX_FFN_DIM})")
    norm_eps = float_field(params, "norm_eps", source, 1e-5, high=MAX_NORM_EPS)
    rope_theta = float_field(params, "rope_theta", source, 10000.0, high=MAX_ROPE_THETA)
    use_scaled_rope = params.get("use_scaled_rope")
    if use_scaled_rope is not None and not isinstance(use_scaled_rope, bool):
        raise SpecError(f"{source}: use_scaled_rope must be true or false, got {_shown(use_scaled_rope)}")
    if use_scaled_rope is not None:  # Meta's Llama 2/3 params.json do not say; 3.1/3.3 say true
        check_scaled_rope(family, use_scaled_rope, source, f"use_scaled_rope {_shown(use_scaled_rope)}")
    use_scaled_rope = bool(use_scaled_rope)

    if descriptor is not None and descriptor.shards is not None and descriptor.shards != n_shards:
        raise SpecError(f"--model_path {descriptor.text} expects {descriptor.shards} shards "
                        f"(consolidated.00.pth … consolidated.{descriptor.shards - 1:02d}.pth), found {n_shards}")

    by_dims = next((k for k in KNOWN_SIZES[family] if (k.dim, k.n_layers, k.n_heads) == (dim, n_layers, n_heads)),
                   None)
    size = descriptor.size if descriptor is not None else (by_dims.size if by_dims else None)
    known = _known_size(family, size) if size else None

    n_kv = params_kv
    if known is not None and known.n_kv_heads < params_kv:
        # 405B MP16: params.json counts the repeated copies; MaxText's config has the real heads.
        n_kv = known.n_kv_heads
    if kv_heads_override is not None:
        if isinstance(kv_heads_override, bool) or not 1 <= kv_heads_override <= n_heads:
            raise SpecError(f"--num_kv_heads {kv_heads_override} is out of range (1 to n_heads {n_heads})")
        n_kv = kv_heads_override
    if n_heads % n_kv:
        raise SpecError(f"{source}: n_heads {n_heads} is not a multiple of n_kv_heads {n_kv}")
    if n_kv < n_shards and n_shards % n_kv:
        raise SpecError(f"{n_shards} shards cannot hold {n_kv} kv heads evenly")

    maxtext_name = f"{FAMILIES[family]}-{size}" if size else f"{FAMILIES[family]}-custom"
    return ModelSpec(
        family=family,
        maxtext_name=maxtext_name,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        params_kv_heads=params_kv,
        vocab_size=declared_vocab,
        ffn_dim=hidden,
        norm_eps=norm_eps,
        rope_theta=rope_theta,
        use_scaled_rope=use_scaled_rope,
        n_shards=n_shards,
    )


def load_params(text: str, source: str = "params.json") -> dict[str, Any]:
    try:
        params = jsonio.loads(text)
    except jsonio.JSONError as exc:  # nested too deeply, a 5000-digit number, not JSON at all
        raise SpecError(f"{source}: {exc}") from None
    if not isinstance(params, dict):
        raise SpecError(f"{source} is not a JSON object")
    return params
