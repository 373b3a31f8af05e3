"""Speculative decoding by n-gram lookup: drafts, their verification, and the engine's output.

The engine's tokens with speculation must be those of decoding one token at a time (greedy
and seeded alike), checked against the engine without it and, for greedy, against
transformers' Flax GPT-2 at every position.
"""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models import get_config, init_params, pack_batch
from models.batch import pack_arrays
from orca_jax import LLM, Engine, EngineConfig, SamplingParams
from orca_jax.engine.speculative import NgramIndex, SpeculativeConfig, accept, can_speculate
from orca_jax.utils.compilation import count_compiles

CFG = get_config("tiny-llama")
PARAMS = init_params(CFG, seed=3)
SMALL = dict(max_batch_size=8, block_size=4, max_model_len=96, max_num_batched_tokens=64)
SPEC = SpeculativeConfig(num_speculative_tokens=3, within_bucket=False)


# ---- drafts ------------------------------------------------------------------------------


def brute_force_draft(tokens: list[int], k: int, lo: int, hi: int) -> list[int]:
    """The longest suffix n-gram (hi down to lo) at its latest earlier place: the k tokens
    after it, copied one at a time onto the end of the sequence (so a copy may copy itself)."""
    end = len(tokens) - 1
    for n in range(hi, lo - 1, -1):
        if n > end:
            continue
        for start in range(end - n, -1, -1):
            if tokens[start : start + n] == tokens[end + 1 - n :]:
                seq = list(tokens)
                for i in range(k):
                    seq.append(seq[start + n + i])
                return seq[len(tokens) :]
    return []


def test_ngram_index_examples():
    index = NgramIndex(SpeculativeConfig(num_speculative_tokens=3))
    assert index.propose([1, 2, 3, 4, 1, 2, 3], 3) == [4, 1, 2]
    index = NgramIndex(SpeculativeConfig())
    assert index.propose([5, 9, 5, 8, 5], 2) == [8, 5]  # the latest [5] wins
    assert NgramIndex(SpeculativeConfig()).propose([3, 1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]
    assert NgramIndex(SpeculativeConfig()).propose([1, 2, 3], 3) == []
    assert NgramIndex(SpeculativeConfig()).propose([7, 7], 0) == []
    two = NgramIndex(SpeculativeConfig(prompt_lookup_min=2))
    assert two.propose([1, 2, 9, 2], 2) == []  # a one-token match is too short


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 3), min_size=1, max_size=40),
    lo=st.integers(1, 3),
    extra=st.integers(0, 2),
    k=st.integers(0, 4),
)
def test_ngram_index_grows_like_a_fresh_search(tokens, lo, extra, k):
    config = SpeculativeConfig(prompt_lookup_min=lo, prompt_lookup_max=lo + extra)
    index = NgramIndex(config)
    for n in range(1, len(tokens) + 1):  # the same sequence, one token longer each call
        assert index.propose(tokens[:n], k) == brute_force_draft(tokens[:n], k, lo, lo + extra)


def test_accept_keeps_tokens_up_to_the_first_mismatch():
    assert accept([4, 5, 6], [4, 5, 6, 7]) == [4, 5, 6, 7]
    assert accept([4, 5, 6], [4, 9, 6, 7]) == [4, 9]
    assert accept([4], [3, 8]) == [3]


def test_config_and_eligibility():
    assert SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 5}) == (
        SpeculativeConfig(num_speculative_tokens=5)
    )
    assert SpeculativeConfig.from_dict({"prompt_lookup_min": 6}).prompt_lookup_max == 6
    for bad, words in [
        ({"method": "eagle"}, "not supported"),
        ({"num_speculative_tokens": 0}, ">= 1"),
        ({"num_speculative_tokens": "3"}, "integer"),
        ({"prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min"),
        ({"model": "x"}, "unknown"),
    ]:
        with pytest.raises(ValueError, match=words):
            SpeculativeConfig.from_dict(bad)
    assert can_speculate(SamplingParams(temperature=0.7, top_k=5, logit_bias={1: 2.0}), 0)
    assert not can_speculate(SamplingParams(repetition_penalty=1.2), 0)
    assert not can_speculate(SamplingParams(min_tokens=3), 2)
    assert can_speculate(SamplingParams(min_tokens=3), 3)
    with pytest.raises(ValueError, match="iteration-level"):
        EngineConfig(policy="static", speculative=SPEC).resolve(CFG)


def test_packed_logits_rows_per_request():
    batch = pack_arrays(
        np.arange(9, dtype=np.int32),
        np.array([2, 4, 3], np.int32),
        np.array([0, 5, 7], np.int32),
        np.array([[1, 2, 0], [3, 4, 0], [5, 6, 7]], np.int32),
        np.array([1, 3, 3], np.int32),
        page_size=4,
        num_tokens=16,
        num_reqs=8,
        num_logits=np.array([1, 3, 2], np.int32),
    )
    assert batch.logits_indices.tolist() == [1, 3, 4, 5, 7, 8, 0, 0]
    args = (np.arange(3, dtype=np.int32), np.array([3], np.int32), np.zeros(1, np.int32))
    tables = (np.array([[1]], np.int32), np.array([1], np.int32))
    with pytest.raises(ValueError, match="logits rows for 3 tokens"):
        pack_arrays(*args, *tables, page_size=4, num_tokens=8, num_reqs=8, num_logits=np.int32([4]))
    with pytest.raises(ValueError, match="exceed bucket"):
        pack_arrays(*args, *tables, page_size=4, num_tokens=8, num_reqs=2, num_logits=np.int32([3]))
    assert pack_batch([([1, 2], 0, [1])], page_size=4, num_tokens=8, num_reqs=2, max_blocks=1)


# ---- the engine -------------------------------------------------------------------------


def looping_requests(n=16, seed=0):
    """Prompts that repeat a short pattern (so n-grams match), greedy and seeded sampling."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pattern = rng.integers(0, CFG.vocab_size, int(rng.integers(2, 6))).tolist()
        prompt = (pattern * 8)[: int(rng.integers(4, 30))]
        params = SamplingParams(
            max_tokens=int(rng.integers(1, 40)),
            ignore_eos=True,
            temperature=(0.0, 0.8)[i % 2],
            seed=i,
            logprobs=2 if i % 3 == 0 else None,
        )
        out.append((prompt, params))
    return out


def generate(requests, spec, policy="orca", **kw):
    """Each request's completion (at iteration i // 4), and the engine."""
    config = EngineConfig(
        policy=policy, speculative=spec, max_logprobs=2, **{**SMALL, "num_kv_blocks": 200, **kw}
    )
    engine = Engine(CFG, PARAMS, None, config)
    outputs, pending, it = {}, list(enumerate(requests)), 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] // 4 <= it:
            i, (prompt, params) = pending.pop(0)
            engine.add_request(prompt, params, request_id=str(i))
        for out in engine.step():
            if out.finished:
                outputs[int(out.request_id)] = out.outputs[0]
        it += 1
    return outputs, it, engine


@pytest.mark.parametrize(
    "policy,kw",
    [
        ("orca", {}),
        ("orca", {"n_workers": 2}),
        ("paged", {}),
        ("paged", {"num_kv_blocks": 24, "max_num_batched_tokens": 16}),  # preempts
        ("paged", {"enable_prefix_caching": True, "async_output": False}),
        ("orca", {"within_bucket": None}),  # on the CPU: drafts only fill bucket padding
    ],
)
def test_speculation_changes_no_token(policy, kw):
    spec = dataclasses.replace(SPEC, within_bucket=kw.pop("within_bucket", False))
    base, base_iterations, _ = generate(looping_requests(), None, policy, **kw)
    outputs, iterations, engine = generate(looping_requests(), spec, policy, **kw)
    buckets = engine.scheduler.config.draft_token_buckets
    assert buckets == (engine.runner.config.token_buckets if spec.within_bucket is None else ())
    assert engine.num_accepted_tokens > 0.3 * engine.num_draft_tokens > 0
    for i, comp in base.items():
        assert outputs[i].token_ids == comp.token_ids, i
        assert outputs[i].finish_reason == comp.finish_reason
        if comp.logprobs is not None:
            assert len(outputs[i].logprobs) == len(comp.token_ids)
            for ours, theirs in zip(outputs[i].logprobs, comp.logprobs, strict=True):
                assert list(ours) == list(theirs)
                np.testing.assert_allclose(
                    [e.logprob for e in ours.values()],
                    [e.logprob for e in theirs.values()],
                    atol=1e-4,
                )
    assert iterations < base_iterations


def test_requests_that_cannot_speculate_decode_one_token_at_a_time():
    reqs = [
        (p, dataclasses.replace(sp, repetition_penalty=1.3, logprobs=None))
        for p, sp in looping_requests(6, seed=4)
    ]
    reqs += [(p, dataclasses.replace(sp, logprobs=None)) for p, sp in looping_requests(6, seed=5)]
    base, _, _ = generate(reqs, None)
    outputs, _, engine = generate(reqs, SPEC)
    assert engine.num_draft_tokens > 0
    assert {i: c.token_ids for i, c in outputs.items()} == {i: c.token_ids for i, c in base.items()}


def test_warmed_up_speculation_compiles_nothing():
    config = EngineConfig(
        max_batch_size=4,
        block_size=4,
        max_model_len=64,
        max_num_batched_tokens=32,
        num_kv_blocks=100,
        speculative=SPEC,
        warmup=True,
    )
    engine = Engine(CFG.replace(name="tiny-llama-spec"), PARAMS, None, config)
    reqs = looping_requests(24, seed=2)
    with count_compiles() as counts:
        for i, (prompt, params) in enumerate(reqs):
            engine.add_request(
                prompt[:20], dataclasses.replace(params, max_tokens=30, logprobs=None)
            )
            if i % 3 == 2:
                engine.step()
        while engine.has_unfinished_requests():
            engine.step()
    assert engine.num_accepted_tokens > 0
    assert (counts.traces, counts.compiles) == (0, 0)


def test_llm_takes_vllms_speculative_config():
    llm = LLM(
        params=PARAMS,
        config=CFG,
        speculative_config={"method": "ngram", "num_speculative_tokens": 2},
        warmup=False,
        **SMALL,
    )
    assert llm.engine.config.speculative == SpeculativeConfig(num_speculative_tokens=2)
    prompt = [5, 6, 7] * 6
    [out] = llm.generate([prompt], SamplingParams(max_tokens=20, ignore_eos=True))
    [ref] = LLM(params=PARAMS, config=CFG, warmup=False, **SMALL).generate(
        [prompt], SamplingParams(max_tokens=20, ignore_eos=True)
    )
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    with pytest.raises(ValueError, match="unknown"):
        LLM(params=PARAMS, config=CFG, speculative_config={"k": 2}, **SMALL)
