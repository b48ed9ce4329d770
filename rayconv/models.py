"""Model specs: what a checkpoint is (:class:`ModelSpec`), and the generic checks of the fields its spec is read from.

Three sources of truth meet in a spec and must agree:

* ``params.json`` / ``config.json`` give the dimensions (params.json lies about kv heads for 405B MP16, where it
  says 16 and the model has 8: Meta repeated each kv head across two shards);
* the ``--model_name`` / ``--model_path`` flags name the model (which decides the rope layout and
  the MaxText model name) and the SKU (which decides the shard count);
* MaxText's model configs, for the published sizes (:class:`KnownSize`), give the real number of kv heads.

What is one family's (its sizes, its rope, how its params.json reads) lives in :mod:`rayconv.families`; the
shard headers are checked against the resulting spec in :mod:`rayconv.source.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

from rayconv import jsonio
from rayconv.errors import SpecError


@dataclasses.dataclass(frozen=True)
class KnownSize:
    """A published size: MaxText's config values (shard counts are the catalog's)."""

    size: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int


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
    def mlp_summary(self) -> str:
        """The feed-forward shape as the convert log prints it."""
        return f"ffn {self.ffn_dim}"

    @property
    def kv_step(self) -> int:
        """Shard stride for wk/wv: 405B MP16 stores each kv head twice (shards 2j, 2j+1)."""
        return max(1, self.n_shards // self.n_kv_heads)

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
        raise SpecError(f"{source}: {key} must be an integer, got {shown(value)}")
    if value in allow:
        return value
    if not low <= value <= high:
        raise SpecError(f"{source}: {key} {shown(value)} is out of range (expected {low} to {high})")
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
        raise SpecError(f"{source}: {key} must be a number, got {shown(value)}")
    value = float(value)
    if not (math.isfinite(value) and low < value <= high):
        what = "a positive finite number" if low == 0 else f"a finite number above {low:g}"
        raise SpecError(f"{source}: {key} {shown(value)} must be {what}"
                        + (f" at most {high:g}" if high != math.inf else ""))
    return value


def shown(value: Any) -> str:
    """A short, one-line rendering of a (possibly hostile) JSON value for an error message."""
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def load_params(text: str, source: str = "params.json") -> dict[str, Any]:
    try:
        params = jsonio.loads(text)
    except jsonio.JSONError as exc:  # nested too deeply, a 5000-digit number, not JSON at all
        raise SpecError(f"{source}: {exc}") from None
    if not isinstance(params, dict):
        raise SpecError(f"{source} is not a JSON object")
    return params
