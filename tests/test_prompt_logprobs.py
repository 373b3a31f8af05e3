"""Prompt log-probabilities (`SamplingParams.prompt_logprobs`) against transformers' Flax GPT-2.

A random `FlaxGPT2LMHeadModel` is loaded into ours through a safetensors checkpoint; the
reference scores each prompt in one causal pass (an independent implementation), and the
engine must report the same log-probability for every prompt token after the first, and the
same most likely alternatives, however it schedules the prompt: whole (orca, static), in
chunks beside other requests (paged), recomputed after a preemption, or next to a request
that hits the prefix cache.
"""

from __future__ import annotations

import numpy as np
import pytest
from hf_reference import flax_to_torch_state_dict, random_flax_model, write_checkpoint

transformers = pytest.importorskip("transformers")
from transformers import FlaxGPT2LMHeadModel  # noqa: E402

from models.loaders import load_safetensors  # noqa: E402
from orca_jax import Engine, EngineConfig, SamplingParams  # noqa: E402

HF = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)
TOP = 3
ATOL = 1e-4  # log-probabilities, float32


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(our config, our params, reference log-probabilities of a token list)."""
    import jax  # noqa: PLC0415

    hf_config = transformers.GPT2Config(**HF)
    model, flax_params = random_flax_model(FlaxGPT2LMHeadModel, hf_config, seed=5)
    directory = tmp_path_factory.mktemp("gpt2")
    cfg = write_checkpoint(directory, hf_config, flax_to_torch_state_dict(flax_params))
    forward = jax.jit(lambda p, ids: jax.nn.log_softmax(model(ids, params=p).logits[0], -1))

    def reference(tokens: list[int]) -> np.ndarray:
        """[len(tokens), V]: row t is the distribution of token t + 1."""
        return np.asarray(forward(flax_params, np.asarray([tokens], np.int32)))

    return cfg, load_safetensors(str(directory)), reference


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, HF["vocab_size"], int(rng.integers(2, 60))).tolist() for _ in range(n)]


def _serve(engine: Engine, requests) -> dict:
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(prompt, params, request_id=str(i))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out
    return done


def check_against_reference(out, reference) -> None:
    prompt = out.prompt_token_ids
    got = out.prompt_logprobs
    assert len(got) == len(prompt) and got[0] is None
    ref = reference(prompt)  # [len, V]
    for pos in range(1, len(prompt)):
        entry, row, token = got[pos], ref[pos - 1], prompt[pos]
        assert entry[token].logprob == pytest.approx(row[token], abs=ATOL), pos
        # its rank among all V, as the reference orders them (near-ties either way)
        above = row > row[token] + ATOL, row > row[token] - ATOL
        assert 1 + above[0].sum() <= entry[token].rank <= 1 + above[1].sum(), pos
        top = np.argsort(-row)[:TOP]
        assert set(entry) == {token, *top.tolist()}, pos
        for k, t in enumerate(top.tolist()):
            assert entry[t].logprob == pytest.approx(row[t], abs=ATOL), pos
            assert t == token or entry[t].rank == k + 1, pos


@pytest.mark.parametrize(
    "policy,kw",
    [
        ("orca", {}),
        ("static", {}),
        ("paged", {"max_num_batched_tokens": 16}),  # prompts cut in chunks of <= 16 tokens
        ("paged", {"max_num_batched_tokens": 16, "num_kv_blocks": 20}),  # and preempted
        ("paged", {"n_workers": 2, "enable_prefix_caching": True}),
    ],
)
def test_prompt_logprobs_match_the_reference(gpt2, policy, kw):
    cfg, params, reference = gpt2
    config = EngineConfig(
        policy=policy,
        max_batch_size=4,
        block_size=4,
        max_model_len=128,
        max_logprobs=TOP,
        warmup=False,
        **{"num_kv_blocks": 120, "max_num_batched_tokens": 64, **kw},
    )
    engine = Engine(cfg, params, None, config)
    prompts = _prompts(6)
    scored = SamplingParams(max_tokens=4, prompt_logprobs=TOP, ignore_eos=True)
    plain = SamplingParams(max_tokens=7, ignore_eos=True)
    # Every other request scores its prompt; the others decode beside them.
    requests = [(p, scored if i % 2 == 0 else plain) for i, p in enumerate(prompts)]
    if kw.get("enable_prefix_caching"):  # repeats: cached for the plain one, not the scored
        requests += [(prompts[0], plain), (prompts[0], scored)]
    done = _serve(engine, requests)
    if policy == "paged" and "num_kv_blocks" in kw:
        assert engine.num_preemptions > 0
    for i, (_, params_i) in enumerate(requests):
        if params_i is plain:
            assert done[i].prompt_logprobs is None
        else:
            check_against_reference(done[i], reference)
    if kw.get("enable_prefix_caching"):
        assert done[6].num_cached_tokens > 0 and done[7].num_cached_tokens == 0


def test_generated_tokens_are_unchanged_by_scoring(gpt2):
    """Scoring only adds outputs: the same greedy tokens and logprobs with and without it."""
    cfg, params, _ = gpt2
    prompts = _prompts(4, seed=1)

    def tokens(prompt_logprobs):
        engine = Engine(
            cfg, params, None, EngineConfig(max_logprobs=TOP, num_kv_blocks=120, warmup=False)
        )
        sp = SamplingParams(max_tokens=5, logprobs=1, prompt_logprobs=prompt_logprobs)
        return {
            i: (o.token_ids, o.outputs[0].logprobs)
            for i, o in _serve(engine, [(p, sp) for p in prompts]).items()
        }

    assert tokens(None) == tokens(0)


def test_limits_are_clear_errors(gpt2):
    cfg, params, _ = gpt2
    engine = Engine(cfg, params, None, EngineConfig(max_logprobs=2, warmup=False))
    with pytest.raises(ValueError, match="prompt_logprobs=3 exceeds the engine's max_logprobs=2"):
        engine.add_request([1, 2, 3], SamplingParams(prompt_logprobs=3))
    with pytest.raises(ValueError, match="prompt_logprobs must be >= 0"):
        SamplingParams(prompt_logprobs=-1)
    engine.add_request([1], SamplingParams(max_tokens=2, prompt_logprobs=0))  # nothing to score
    (out,) = _serve(engine, []).values()
    assert out.prompt_logprobs == [None]


def test_token_logprobs_of_a_bucket_not_a_multiple_of_the_chunk(gpt2):
    """300 rows go through in chunks of 256 (padded), scoring what one pass over all would."""
    import jax  # noqa: PLC0415

    from models.decoder import logits_of, token_logprobs  # noqa: PLC0415

    cfg, params, _ = gpt2
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, cfg.d_model)).astype(np.float32)
    targets = rng.integers(-1, cfg.vocab_size, 300).astype(np.int32)
    lp, top_ids, top_lp, rank = token_logprobs(params, x, targets, cfg, 2)
    want = np.asarray(jax.nn.log_softmax(logits_of(params, x, cfg), -1))
    rows = np.arange(300)
    np.testing.assert_allclose(
        lp, np.where(targets >= 0, want[rows, np.maximum(targets, 0)], 0.0), atol=1e-5
    )
    np.testing.assert_array_equal(top_ids, np.argsort(-want, -1)[:, :2])
    assert lp.shape == (300,) and top_lp.shape == (300, 2)
    own = want[rows, np.maximum(targets, 0)]
    np.testing.assert_array_equal(rank, 1 + (want > own[:, None]).sum(-1))


def test_n_completions_score_the_prompt_once(gpt2):
    """LLM.generate with n=3 scores the prompt in completion 0 only, and reports it."""
    from orca_jax import LLM  # noqa: PLC0415

    cfg, params, reference = gpt2
    llm = LLM(params=params, config=cfg, max_logprobs=TOP, warmup=False, num_kv_blocks=120)
    prompt = _prompts(1, seed=3)[0]
    sp = SamplingParams(max_tokens=3, temperature=1.0, seed=1, n=3, prompt_logprobs=TOP)
    scored = []
    original = llm.engine._prompt_targets
    llm.engine._prompt_targets = lambda *a: scored.append(t := original(*a)) or t
    [out] = llm.generate([prompt], sp, use_tqdm=False)
    assert len(out.outputs) == 3
    targets = [t for t in scored if t is not None]
    assert len(targets) == 1 and (targets[0] >= 0).sum() == len(prompt) - 1  # one request's
    check_against_reference(out, reference)
