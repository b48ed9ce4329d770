"""How a Llama spec reads: Meta's ``params.json`` and transformers' ``config.json`` → :class:`ModelSpec`.

Both readers check the same things the same way (the generic field checks are :mod:`rayconv.models`'): the
dimensions, the rope (Llama 3.1/3.3 have the scaled rope and nothing else does), the published size, which gives
MaxText's model name and, for 405B MP16, the real kv-head count params.json does not say.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from rayconv import catalog
from rayconv.errors import SpecError
from rayconv.families.llama import KNOWN_SIZES, MODEL_NAMES, SCALED_ROPE_FAMILIES, ffn_dim
from rayconv.models import (MAX_DIM, MAX_FFN_DIM, MAX_HEADS, MAX_LAYERS, MAX_NORM_EPS, MAX_ROPE_THETA, MAX_VOCAB,
                            KnownSize, ModelSpec, float_field, int_field, shown)


def known_size(family: str, size: str) -> KnownSize | None:
    return next((k for k in KNOWN_SIZES.get(family, ()) if k.size == size), None)


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


def spec_from_params(params: Mapping[str, Any], *, family: str, n_shards: int, vocab_size: int | None,
                     descriptor: Any, kv_heads_override: int | None, source: str) -> ModelSpec:
    """params.json of model ``family`` → ModelSpec (``descriptor``: the ``--model_path``, a
    rayconv.families.Descriptor, or None).

    ``vocab_size`` is the vocabulary seen in the shards; it is used when params.json says -1
    (Meta's llama-2 release does) and must agree with params.json otherwise.
    """
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
        raise SpecError(f"{source}: use_scaled_rope must be true or false, got {shown(use_scaled_rope)}")
    if use_scaled_rope is not None:  # Meta's Llama 2/3 params.json do not say; 3.1/3.3 say true
        check_scaled_rope(family, use_scaled_rope, source, f"use_scaled_rope {shown(use_scaled_rope)}")
    use_scaled_rope = bool(use_scaled_rope)

    if descriptor is not None and descriptor.shards is not None and descriptor.shards != n_shards:
        raise SpecError(f"--model_path {descriptor.text} expects {descriptor.shards} shards "
                        f"(consolidated.00.pth … consolidated.{descriptor.shards - 1:02d}.pth), found {n_shards}")

    by_dims = next((k for k in KNOWN_SIZES[family] if (k.dim, k.n_layers, k.n_heads) == (dim, n_layers, n_heads)),
                   None)
    size = descriptor.size if descriptor is not None else (by_dims.size if by_dims else None)
    known = known_size(family, size) if size else None

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

    maxtext_name = f"{MODEL_NAMES[family]}-{size}" if size else f"{MODEL_NAMES[family]}-custom"
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


# ------------------------------------------------------------------------------------------------
# config.json


def _hub_descriptor(text: str) -> tuple[str, str]:
    """(family, size) from ``--model_path``: a Meta descriptor or a Hub repo id (meta-llama/Llama-3.1-8B)."""
    name = text.strip().rsplit("/", 1)[-1].split(":", 1)[0]  # the SKU suffix names Meta's files, not these
    name = re.sub(r"-hf$", "", name, flags=re.IGNORECASE)
    try:
        model = catalog.lookup(name)
    except SpecError:
        raise SpecError(f"--model_path {text!r} names no Llama model (expected e.g. meta-llama/Llama-3.1-8B-Instruct "
                        "or Llama3.1-8B)") from None
    if model.family not in MODEL_NAMES:
        raise SpecError(f"--model_path {text!r}: {model.family} is not supported (supported: {', '.join(MODEL_NAMES)})")
    return model.family, model.size


def spec_from_config(config: Mapping[str, Any], *, model_name: str | None, model_path: str | None,
                     kv_heads: int | None, source: str) -> ModelSpec:
    """Translate a transformers ``LlamaConfig`` into the ModelSpec the Meta path would build.

    The family comes from ``--model_name``/``--model_path`` when given (and must agree with the rope
    scaling), else from config.json: ``rope_type: llama3`` is Llama 3.1/3.3 (3.1 unless named 3.3:
    the conversions are identical), otherwise a 128K vocabulary or rope_theta ≥ 500000 is Llama 3,
    anything else Llama 2. FFN width is ``intermediate_size`` itself (no multiple_of arithmetic).
    """
    tie = config.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        raise SpecError(f"{source}: tie_word_embeddings is {tie!r}, expected true or false")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise SpecError(f"{source}: {flag} is set; Llama (and MaxText's llama models) have no biases")
    dim = int_field(config, "hidden_size", source, low=1, high=MAX_DIM)
    n_layers = int_field(config, "num_hidden_layers", source, low=1, high=MAX_LAYERS)
    n_heads = int_field(config, "num_attention_heads", source, low=1, high=min(MAX_HEADS, dim))
    n_kv = int_field(config, "num_key_value_heads", source, low=1, high=n_heads, default=n_heads)
    if dim % n_heads:
        raise SpecError(f"{source}: hidden_size {dim} is not a multiple of num_attention_heads {n_heads}")
    head_dim = int_field(config, "head_dim", source, low=1, high=MAX_DIM, default=dim // n_heads)
    if head_dim != dim // n_heads:
        raise SpecError(f"{source}: head_dim {head_dim} is not hidden_size / num_attention_heads ({dim // n_heads}); "
                        "MaxText's llama models need it to be")
    if n_heads % n_kv:
        raise SpecError(f"{source}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    if kv_heads is not None and kv_heads != n_kv:
        raise SpecError(f"--num_kv_heads {kv_heads} disagrees with {source} (num_key_value_heads {n_kv})")
    vocab = int_field(config, "vocab_size", source, low=1, high=MAX_VOCAB)
    ffn = int_field(config, "intermediate_size", source, low=1, high=MAX_FFN_DIM)
    rope_key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"  # transformers 5 / 4
    rope = config.get(rope_key) or {}
    if not isinstance(rope, Mapping):
        raise SpecError(f"{source}: {rope_key} is {str(rope)[:40]!r}, expected an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise SpecError(f"{source}: rope type {str(rope_type)[:40]!r} is not a Llama 2/3/3.1 rope")
    scaled = rope_type == "llama3"
    if scaled:
        check_llama3_rope(rope, f"{source}: {rope_key}")
    theta = dict(high=MAX_ROPE_THETA, null=False)
    rope_theta = float_field(config, "rope_theta", source,
                             float_field(rope, "rope_theta", f"{source}: {rope_key}", 10000.0, **theta), **theta)
    norm_eps = float_field(config, "rms_norm_eps", source, 1e-5, high=MAX_NORM_EPS, null=False)

    family, size = model_name, None
    if model_path:
        named, size = _hub_descriptor(model_path)
        if family is not None and family != named:
            raise SpecError(f"--model_name {family} disagrees with --model_path {model_path} ({named})")
        family = named
    if family is None:
        family = "llama-3.1" if scaled else ("llama-3" if vocab >= 128000 or rope_theta >= 500000 else "llama-2")
    if family not in MODEL_NAMES:
        raise SpecError(f"unknown --model_name {family!r} (supported: {', '.join(MODEL_NAMES)})")
    check_scaled_rope(family, scaled, source, f"rope type {rope_type!r}")
    if size is None:  # as on the Meta path: --model_path names the size, else the published dims do
        known = next((k for k in KNOWN_SIZES[family] if (k.dim, k.n_layers, k.n_heads) == (dim, n_layers, n_heads)),
                     None)
        size = known.size if known else None
    return ModelSpec(
        family=family, maxtext_name=f"{MODEL_NAMES[family]}-{size}" if size else f"{MODEL_NAMES[family]}-custom",
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, params_kv_heads=n_kv, vocab_size=vocab,
        ffn_dim=ffn, norm_eps=norm_eps, rope_theta=rope_theta, use_scaled_rope=scaled,
        n_shards=1)
