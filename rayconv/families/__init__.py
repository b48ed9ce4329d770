"""Model families: the :class:`Family` seam and the registry.

A family owns everything about one kind of model that is not generic: its rules (target leaf → each source
format's tensor name, with named indices ``{layer}``/``{expert}``) and transforms (with their inverses), its
published sizes and MaxText names, how its spec reads from params.json and config.json. The planner, the
workers and the readers ask the spec's family (:func:`family_of`) and never test a family's name. A new family
is one module here plus a line in ``FAMILIES``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

from rayconv import catalog, mapping
from rayconv.errors import SpecError
from rayconv.families import llama, llama_hf, llama_spec, qwen3, qwen3_hf
from rayconv.mapping import Rule
from rayconv.models import KnownSize, ModelSpec


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family, as the plan, the workers and the readers see it."""

    name: str
    #: ``--model_name`` values (``ModelSpec.family``, the string kept in plan.json and fingerprints) → MaxText
    #: model-name prefix.
    model_names: Mapping[str, str]
    #: transformers' ``model_type`` values a config.json of this family says.
    hf_model_types: tuple[str, ...]
    #: model name → published sizes (MaxText's configs).
    known_sizes: Mapping[str, tuple[KnownSize, ...]]
    #: spec → the rules, in plan order (``Piece.rule`` indexes them).
    rules: Callable[[ModelSpec], tuple[Rule, ...]]
    #: model name → the axis Meta's shards split the token embedding on.
    embedding_split_axis: Callable[[str], int]
    #: params.json → spec: ``(params, *, family, n_shards, vocab_size, descriptor, kv_heads_override, source)``.
    spec_from_params: Callable[..., ModelSpec]
    #: config.json → spec: ``(config, *, model_name, model_path, kv_heads, source)``.
    spec_from_config: Callable[..., ModelSpec]
    #: The spec class (its ``from_json`` reads what ``to_json`` wrote: plan.json, the ledger's record).
    spec_type: type = ModelSpec
    #: The MaxText tree layout (rayconv.trees) written when neither --maxtext_layout nor --inference_server says
    #: one: what the MaxText tool that converts this family writes.
    default_layout: str = "linen"
    #: Why MaxText has no quantized (AQT) checkpoint of this family (one line); empty: it has.
    no_quantized_output: str = ""
    #: A published model's name → its config.json (``rayconv plan --simulate`` of HF-only families), or None.
    published_config: Callable[[str | None], Mapping[str, Any] | None] = lambda name: None
    #: MaxText model name → the HF config.json fields ``rayconv export`` writes for it (``--model_name``).
    hf_configs: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    #: Fields every config.json of the family has (``save_pretrained``'s defaults), under a user's ``--config``.
    hf_config_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)


LLAMA = Family(name="llama", model_names=llama.MODEL_NAMES, hf_model_types=llama.HF_MODEL_TYPES,
               known_sizes=llama.KNOWN_SIZES, rules=llama.rules, embedding_split_axis=llama.embedding_split_axis,
               spec_from_params=llama_spec.spec_from_params, spec_from_config=llama_spec.spec_from_config,
               hf_configs=llama_hf.HF_CONFIGS, hf_config_defaults=llama_hf.HF_CONFIG_DEFAULTS)
QWEN3 = Family(name=qwen3.NAME, model_names=qwen3.MODEL_NAMES, hf_model_types=qwen3.HF_MODEL_TYPES,
               known_sizes=qwen3.KNOWN_SIZES, rules=qwen3.rules, embedding_split_axis=qwen3.embedding_split_axis,
               spec_from_params=qwen3.spec_from_params, spec_from_config=qwen3.spec_from_config,
               spec_type=qwen3.Qwen3Spec, default_layout=qwen3.DEFAULT_LAYOUT,
               no_quantized_output=qwen3.NO_QUANTIZED_OUTPUT, published_config=qwen3.published_config,
               hf_configs=qwen3_hf.HF_CONFIGS, hf_config_defaults=qwen3_hf.HF_CONFIG_DEFAULTS)

#: The registry: family name → family.
FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, QWEN3)}


def model_names() -> tuple[str, ...]:
    """Every ``--model_name`` rayconv converts, in registry order."""
    return tuple(name for family in FAMILIES.values() for name in family.model_names)


def for_model_name(name: str | None) -> Family | None:
    """The family a ``--model_name`` (``ModelSpec.family``) belongs to, or None."""
    return next((f for f in FAMILIES.values() if name in f.model_names), None)


def for_hf_model_type(model_type: str) -> Family | None:
    """The family of a config.json's ``model_type``, or None."""
    return next((f for f in FAMILIES.values() if model_type in f.hf_model_types), None)


def family_of_name(name: str) -> Family:
    """The family of a model name, or one line naming the names rayconv converts."""
    family = for_model_name(name)
    if family is None:
        raise SpecError(f"unknown --model_name {name!r} (supported: {', '.join(model_names())})")
    return family


def family_of(spec: ModelSpec) -> Family:
    """The spec's family (a spec is only ever built for a registered model name)."""
    return family_of_name(spec.family)


def spec_from_json(data: Mapping[str, Any]) -> ModelSpec:
    """The spec ``spec.to_json()`` wrote (plan.json, a ledger record), as its family's spec class."""
    family = for_model_name(data.get("family"))
    if family is None:
        raise SpecError(f"unknown model family {str(data.get('family'))[:40]!r} in a recorded spec")
    return family.spec_type.from_json(data)


def rules(spec: ModelSpec) -> tuple[Rule, ...]:
    """The spec's family's rules, in plan order."""
    return family_of(spec).rules(spec)


def expected_tensors(spec: ModelSpec, source: str) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name in the ``source`` format, shape in each shard) of every tensor the spec needs, lazily, in plan order.

    What the readers check their files against (``checkpoint.check_shapes``, ``hf._check``); a Hugging Face
    checkpoint is one shard, so its shapes are G's.
    """
    for rule in rules(spec):
        shape = mapping.shard_shape(rule, spec)
        for layer in (range(spec.n_layers) if rule.per_layer else (None,)):
            for expert in experts(rule, spec):
                yield rule.source_key(source, layer, **({} if expert is None else {"expert": expert})), shape


def experts(rule: Rule, spec: ModelSpec) -> range | tuple[None]:
    """The values of the rule's ``{expert}`` index (one tensor per expert), or ``(None,)`` for other rules."""
    return range(spec.n_experts) if mapping.per_expert(rule) else (None,)


def tensor_count(spec: ModelSpec) -> int:
    """How many tensors ``expected_tensors`` yields (without building them)."""
    return sum((spec.n_layers if rule.per_layer else 1) * len(experts(rule, spec)) for rule in rules(spec))


# ------------------------------------------------------------------------------------------------
# --model_path and --model_name → spec


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
        if for_model_name(model.family) is None:
            raise SpecError(f"--model_path {text!r}: Llama {model.family[len('llama-'):]} is not supported "
                            f"(supported: {', '.join(model_names())})")
        if not model.variant and not model.published:
            raise SpecError(f"--model_path {text!r}: {model.family} has no published {model.size} model")
        # The bare 405B descriptor (or :fp8) is Meta's FP8 SKU: 8 shards (MP8 layout) plus fp8_scales_{r}.pt.
        return cls(text=text, family=model.family, size=model.size, instruct=model.instruct, shards=model.shards,
                   sku=model.dtype)


def model_name_of(model_name: str | None, descriptor: Descriptor | None) -> str:
    """The model the flags name: ``--model_name``, or ``--model_path``'s (they must agree); refused when neither
    says or the name is not one rayconv converts."""
    name = model_name
    if descriptor is not None:
        if name is not None and name != descriptor.family:
            raise SpecError(f"--model_name {name} disagrees with --model_path {descriptor.text} "
                            f"({descriptor.family})")
        name = descriptor.family
    if name is None:
        raise SpecError(f"say which model this is: --model_name ({', '.join(model_names())}) "
                        "or --model_path (e.g. Llama3.1-405B-Instruct:bf16-mp16)")
    family_of_name(name)
    return name


def resolve_spec(params: Mapping[str, Any], *, n_shards: int, vocab_size: int | None, model_name: str | None,
                 descriptor: Descriptor | None, kv_heads_override: int | None = None,
                 source: str = "params.json") -> ModelSpec:
    """Combine params.json, the CLI's model flags and the shard count into one ModelSpec (the family's reader).

    ``vocab_size`` is the vocabulary seen in the shards; it is used when params.json says -1
    (Meta's llama-2 release does) and must agree with params.json otherwise.
    """
    name = model_name_of(model_name, descriptor)
    return family_of_name(name).spec_from_params(params, family=name, n_shards=n_shards, vocab_size=vocab_size,
                                                 descriptor=descriptor, kv_heads_override=kv_heads_override,
                                                 source=source)

