"""SamplingParams: defaults, normalization, validation."""

import pytest

from orca_jax.scheduler import SamplingParams


def test_defaults_are_greedy_16_tokens():
    params = SamplingParams()
    assert params.max_tokens == 16
    assert params.is_greedy
    assert params.stop == () and params.stop_token_ids == ()
    assert not params.ignore_eos and params.logprobs is None and params.seed is None


def test_lists_become_tuples_and_params_stay_hashable():
    params = SamplingParams(stop=["\n", "END"], stop_token_ids=[3, 4])
    assert params.stop == ("\n", "END")
    assert params.stop_token_ids == (3, 4)
    assert hash(params) == hash(SamplingParams(stop=("\n", "END"), stop_token_ids=(3, 4)))


def test_single_stop_string_is_not_split_into_characters():
    assert SamplingParams(stop="END").stop == ("END",)


def test_sampling_is_not_greedy_with_temperature():
    assert not SamplingParams(temperature=0.7).is_greedy
    assert SamplingParams(temperature=0.7, top_k=1).is_greedy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"max_tokens": 2.0}, "max_tokens must be an int"),
        ({"max_tokens": True}, "max_tokens must be an int"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"seed": "7"}, "seed must be an int"),
        ({"stop": [""]}, "stop strings must be non-empty"),
        ({"stop_token_ids": [-1]}, "stop_token_ids entries must be >= 0"),
        ({"logprobs": -1}, "logprobs must be >= 0"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
        ({"frequency_penalty": float("nan")}, r"frequency_penalty must be in \[-2, 2\]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"n": 0}, "n must be >= 1"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty must be > 0"),
    ],
)
def test_invalid_values_name_the_field_and_limit(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_frozen():
    params = SamplingParams()
    with pytest.raises(AttributeError):
        params.max_tokens = 3


def test_completions_fan_out_with_successive_seeds():
    params = SamplingParams(max_tokens=3, temperature=0.7, seed=10, n=3)
    assert [(p.n, p.seed, p.temperature) for p in params.completions()] == [
        (1, 10, 0.7),
        (1, 11, 0.7),
        (1, 12, 0.7),
    ]
    assert [p.seed for p in SamplingParams(n=2).completions()] == [None, None]


def test_none_means_no_stops_and_no_bad_words():
    """vLLM's defaults are None (and a JSON null sends None): the same as empty."""
    params = SamplingParams(stop=None, stop_token_ids=None, bad_words=None, logit_bias=None)
    assert (params.stop, params.stop_token_ids, params.bad_words, params.logit_bias) == (
        (),
        (),
        (),
        (),
    )
