"""Model specs: descriptors, Meta's FFN formula, and params.json ↔ flags ↔ MaxText reconciliation."""

import pytest

from rayconv.errors import SpecError
from rayconv.families import Descriptor, resolve_spec
from rayconv.families.llama import embedding_split_axis, ffn_dim, rope_permuted

LLAMA31_405B_MP16 = {"dim": 16384, "n_layers": 126, "n_heads": 128, "n_kv_heads": 16, "vocab_size": 128256,
                     "ffn_dim_multiplier": 1.2, "multiple_of": 4096, "norm_eps": 1e-5, "rope_theta": 500000.0,
                     "use_scaled_rope": True}


@pytest.mark.parametrize("dim,multiple_of,mult,expected", [
    (4096, 1024, 1.3, 14336), (8192, 4096, 1.3, 28672), (16384, 4096, 1.2, 53248),  # Llama 3.1 8B/70B/405B
    (4096, 256, None, 11008), (5120, 256, None, 13824), (8192, 4096, 1.3, 28672),  # Llama 2 7B/13B/70B
])
def test_ffn_dim_matches_published_sizes(dim, multiple_of, mult, expected):
    assert ffn_dim(dim, multiple_of, mult) == expected


@pytest.mark.parametrize("text,family,size,shards,instruct", [
    ("Llama3.1-405B-Instruct:bf16-mp16", "llama-3.1", "405b", 16, True),
    ("Llama3.1-405B:bf16-mp8", "llama-3.1", "405b", 8, False),
    ("Llama3.1-70B-Instruct", "llama-3.1", "70b", 8, True),
    ("Llama3.1-8B", "llama-3.1", "8b", 1, False),
    ("Llama3.1-405B-Instruct", "llama-3.1", "405b", 8, True),  # no variant: the FP8 SKU
    ("Llama3.3-70B-Instruct", "llama-3.3", "70b", 8, True),
    ("Meta-Llama-3-8B-Instruct", "llama-3", "8b", 1, True),
    ("Llama-2-13b-chat", "llama-2", "13b", 2, True),
])
def test_descriptor_parse(text, family, size, shards, instruct):
    d = Descriptor.parse(text)
    assert (d.family, d.size, d.shards, d.instruct) == (family, size, shards, instruct)


@pytest.mark.parametrize("text,needle", [
    ("Llama3.1-405B:int4-mp8", "variant"), ("Mistral-7B", "descriptor"),
    ("Llama3.1-13B", "no published"), ("Llama4-17B", "not supported"),
])
def test_descriptor_errors_are_one_line(text, needle):
    with pytest.raises(SpecError) as err:
        Descriptor.parse(text)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_405b_mp16_kv_heads_come_from_maxtext_not_params_json():
    spec = resolve_spec(LLAMA31_405B_MP16, n_shards=16, vocab_size=128256, model_name="llama-3.1",
                        descriptor=Descriptor.parse("Llama3.1-405B-Instruct:bf16-mp16"))
    assert (spec.maxtext_name, spec.n_kv_heads, spec.params_kv_heads, spec.kv_step) == ("llama3.1-405b", 8, 16, 2)
    assert spec.ffn_dim == 53248 and spec.head_dim == 128 and not rope_permuted(spec)
    assert spec.query_scale_divisor == 11.3125


def test_dims_identify_published_size_without_descriptor():
    params = dict(LLAMA31_405B_MP16, n_kv_heads=8)
    spec = resolve_spec(params, n_shards=8, vocab_size=128256, model_name="llama-3.1", descriptor=None)
    assert spec.maxtext_name == "llama3.1-405b" and spec.kv_step == 1


@pytest.mark.parametrize("kwargs,needle", [
    (dict(model_name="llama-4", descriptor=None), "unknown --model_name"),
    (dict(model_name=None, descriptor=None), "--model_name"),
    (dict(model_name="llama-3", descriptor=Descriptor.parse("Llama3.1-8B")), "disagrees"),
    (dict(model_name=None, descriptor=Descriptor.parse("Llama3.1-405B:bf16-mp8")), "expects 8 shards"),
])
def test_spec_errors(kwargs, needle):
    with pytest.raises(SpecError) as err:
        resolve_spec(LLAMA31_405B_MP16, n_shards=16, vocab_size=128256, **kwargs)
    assert needle in str(err.value)


def test_vocab_mismatch_between_params_and_shards():
    with pytest.raises(SpecError, match="vocab_size 128256"):
        resolve_spec(LLAMA31_405B_MP16, n_shards=16, vocab_size=1000, model_name="llama-3.1", descriptor=None)


def test_llama2_vocab_minus_one_takes_the_shards_vocab():
    params = {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "norm_eps": 1e-5, "vocab_size": -1}
    spec = resolve_spec(params, n_shards=1, vocab_size=32000, model_name="llama-2", descriptor=None)
    assert (spec.vocab_size, spec.n_kv_heads, spec.maxtext_name, rope_permuted(spec)) == (32000, 32, "llama2-7b", True)
    assert embedding_split_axis(spec.family) == 1
