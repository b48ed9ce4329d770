"""Which model an export describes, the HF config files it writes, and the check of a checkpoint against it.

A MaxText checkpoint does not say which model it is: its leaves give shapes, not the rope, the context length or
the token ids. ``rayconv export`` therefore takes the model the way MaxText's ``to_huggingface.py`` does — a
MaxText model name (``--model_name llama3.1-405b``, ``qwen3-30b-a3b``), whose HF config is its family's table
(``Family.hf_configs``: MaxText 0.2.5's ``hf_model_configs`` for the names it registers) — or the
user's own HF ``config.json`` (``--config``). Either becomes a spec through the family's own config.json reader
(``Family.spec_from_config``, through ``hf.spec_from_config``), so the planner's rules and shapes are the ones
convert uses; the checkpoint's leaves must then have exactly the shapes the spec's rules give
(:func:`check_checkpoint`), before anything is written. A mismatch is one line naming the HF fields that differ
(layers, heads, vocabulary, …).
"""

from __future__ import annotations

import dataclasses
import json
import types
from typing import Any, Mapping

from rayconv import families, jsonio, mapping
from rayconv.errors import SpecError
from rayconv.families import Family
from rayconv.models import ModelSpec
from rayconv.source import hf
from rayconv.source.orbax import MaxTextCheckpoint

#: The transformers version whose config.json / generation_config.json format is written (MaxText 0.2.5's
#: exporter and the tests' transformers are 5.24.0); rayconv does not import transformers.
TRANSFORMERS_VERSION = "5.24.0"
#: The spec field each HF config field states (what a mismatch message names).
_FIELDS = {"dim": "hidden_size", "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
           "head_dim": "head_dim", "vocab_size": "vocab_size", "ffn_dim": "intermediate_size",
           "n_layers": "num_hidden_layers", "n_experts": "num_experts", "moe_ffn_dim": "moe_intermediate_size"}
#: Largest config.json read (the Hub's are ~1 KB).
MAX_CONFIG_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class ExportModel:
    """The model an export writes: its family, spec (HF source format; Llama's q/k rows half-split), config.json."""

    name: str  # what the user named it: a MaxText model name, or the config.json path
    family: Family
    spec: ModelSpec
    config: dict[str, Any]  # the HF config fields, without dtype / transformers_version


def _family_of_maxtext_name(name: str) -> tuple[Family, str]:
    for family in families.FAMILIES.values():
        for model_name, prefix in family.model_names.items():
            if name.startswith(prefix + "-"):
                return family, model_name
    known = (n for family in families.FAMILIES.values() for n in family.hf_configs)
    raise SpecError(f"unknown --model_name {name!r} (MaxText's names: {', '.join(known)})")


def _spec(config: Mapping[str, Any], model_name: str | None, source: str) -> ModelSpec:
    """The family's config.json reader, through the HF source's (a Meta-shaped spec marked as read from HF files:
    q/k rows half-split; a family with its own spec type says its source format itself)."""
    return hf.spec_from_config(config, model_name=model_name, model_path=None, kv_heads=None, source=source)


def from_model_name(name: str) -> ExportModel:
    """``--model_name`` as MaxText names it (``llama3.1-405b``, ``qwen3-30b-a3b``)."""
    family, model_name = _family_of_maxtext_name(name)
    config = family.hf_configs.get(name)
    if config is None:
        raise SpecError(f"--model_name {name}: no published size (MaxText's names: {', '.join(family.hf_configs)}); "
                        "give the model's config.json with --config instead")
    # The name given, not the first of identical twins the reader names by dims (qwen3-1.7b-base → qwen3-1.7b).
    spec = dataclasses.replace(_spec(config, model_name, f"--model_name {name}"), maxtext_name=name)
    return ExportModel(name, family, spec, config)


def from_config_file(path: str, text: bytes) -> ExportModel:
    """``--config config.json`` (transformers' format): its family from ``model_type``."""
    try:
        config = jsonio.loads_object(text, max_bytes=MAX_CONFIG_BYTES)
    except jsonio.JSONError as exc:
        raise SpecError(f"{path}: {exc}") from None
    family = families.for_hf_model_type(str(config.get("model_type")))
    if family is None:
        raise SpecError(f"{path}: model_type {str(config.get('model_type'))[:40]!r} is not a family rayconv exports")
    # What save_pretrained adds (architectures) and what rayconv sets itself (dtype, the format's version).
    config = {**family.hf_config_defaults, **{k: v for k, v in config.items()
                                    if k not in ("dtype", "torch_dtype", "transformers_version")}}
    return ExportModel(path, family, _spec(config, None, path), config)


def _json(value: Any) -> bytes:
    """transformers' ``to_json_string``: indent 2, keys sorted, a trailing newline."""
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def config_json(model: ExportModel, dtype: str) -> bytes:
    """config.json: the model's HF config with the output dtype, as ``save_pretrained`` writes it."""
    return _json({**model.config, "dtype": dtype, "transformers_version": TRANSFORMERS_VERSION})


def generation_config_json(model: ExportModel) -> bytes:
    """generation_config.json as ``save_pretrained`` writes it for a model config (``from_model_config``)."""
    config = {"_from_model_config": True, "output_attentions": False, "output_hidden_states": False,
              "transformers_version": TRANSFORMERS_VERSION, "use_cache": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if model.config.get(key) is not None:
            config[key] = model.config[key]
    return _json(config)


# ------------------------------------------------------------------------------------------------
# The checkpoint against the model


def leaf_name(rule: mapping.Rule, layer: int | None, scanned: bool) -> str:
    """The checkpoint leaf (model path) of a rule: ``decoder/layers/…`` scanned, ``decoder/layers_{i}/…`` not."""
    if layer is None or scanned:
        return rule.name
    return "/".join(f"layers_{layer}" if part == "layers" else part for part in rule.target)


def expected_leaves(spec: ModelSpec, scanned: bool) -> dict[str, tuple[int, ...]]:
    """{leaf name: shape} the spec's rules need in a checkpoint of this form."""
    out = {}
    for rule in families.rules(spec):
        shape = mapping.layer_shape(rule, spec)
        if not rule.per_layer:
            out[rule.name] = shape
        elif scanned:
            out[rule.name] = mapping.scanned_shape(shape, spec.n_layers)
        else:
            out.update({leaf_name(rule, i, False): shape for i in range(spec.n_layers)})
    return out


def _differences(rule: mapping.Rule, spec: ModelSpec, have: tuple[int, ...], scanned: bool) -> dict[str, tuple]:
    """{HF field: (checkpoint, model)} explaining a leaf's shape mismatch: the rule's shape evaluated on field names."""
    names = types.SimpleNamespace(**{field: field for field in _FIELDS})
    try:
        symbolic = mapping.layer_shape(rule, names)  # type: ignore[arg-type]
    except (TypeError, AttributeError):  # a shape computed from several fields: no single name per axis
        return {}
    if rule.per_layer and scanned:
        symbolic = mapping.scanned_shape(tuple(symbolic), "n_layers")  # type: ignore[arg-type]
    if len(symbolic) != len(have):
        return {}
    return {_FIELDS[f]: (n, getattr(spec, f)) for f, n in zip(symbolic, have)
            if isinstance(f, str) and n != getattr(spec, f)}


def check_checkpoint(checkpoint: MaxTextCheckpoint, model: ExportModel) -> None:
    """The checkpoint's leaves must be exactly what the model needs, shape for shape; else one line."""
    spec, where = model.spec, checkpoint.location.uri
    if checkpoint.n_layers != spec.n_layers:
        raise SpecError(f"{where} has {checkpoint.n_layers} decoder layers, {model.name} has {spec.n_layers} "
                        "(num_hidden_layers)")
    expected = expected_leaves(spec, checkpoint.scanned)
    missing = sorted(set(expected) - set(checkpoint.leaves))
    extra = sorted(set(checkpoint.leaves) - set(expected))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"holds {extra[0]}, which"
        raise SpecError(f"{where} {what} {'' if missing else 'is not '}a leaf of {model.name} "
                        f"({len(missing)} missing, {len(extra)} unexpected): not this model's checkpoint")
    found: dict[str, tuple] = {}
    first = None
    for rule in families.rules(spec):
        name = leaf_name(rule, 0 if rule.per_layer else None, checkpoint.scanned)
        have = checkpoint.leaves[name].shape
        if have != expected[name]:
            first = first or (name, have, expected[name])
            found.update(_differences(rule, spec, have, checkpoint.scanned))
    for name, want in expected.items():
        if checkpoint.leaves[name].shape != want:
            first = first or (name, checkpoint.leaves[name].shape, want)
    if first is not None:
        fields = ", ".join(f"{k} {a} (checkpoint) vs {b}" for k, (a, b) in sorted(found.items()))
        raise SpecError(f"{where} does not match {model.name}: " + (fields or
                        f"{first[0]} is {list(first[1])}, the model needs {list(first[2])}"))
    for name, leaf in checkpoint.leaves.items():
        if leaf.dtype not in ("bfloat16", "float32"):
            raise SpecError(f"{where}: {name} is {leaf.dtype}; export reads bfloat16 or float32 params")
