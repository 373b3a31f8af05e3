"""The engine on the tiny model: batching changes nothing, short requests overtake long ones."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models import get_config, init_params
from orca_jax import LLM, Engine, EngineConfig, SamplingParams
from orca_jax.utils.compilation import count_compiles

CFG = get_config("tiny-llama")
PARAMS = init_params(CFG, seed=3)
SMALL = dict(max_batch_size=8, block_size=4, max_model_len=96, max_num_batched_tokens=64)


def make_engine(policy="orca", num_kv_blocks=200, **kw):
    cfg = EngineConfig(policy=policy, num_kv_blocks=num_kv_blocks, **{**SMALL, **kw})
    return Engine(CFG, PARAMS, None, cfg)


def _requests(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (
            rng.integers(0, CFG.vocab_size, int(rng.integers(1, 40))).tolist(),
            SamplingParams(max_tokens=int(rng.integers(1, 20)), ignore_eos=True),
        )
        for _ in range(n)
    ]


def run(engine, requests, arrivals=None):
    """Add request i at iteration arrivals[i]; return each one's tokens and the finish order."""
    arrivals = arrivals or [0] * len(requests)
    outputs, order, it = {}, [], 0
    pending = sorted(range(len(requests)), key=lambda i: arrivals[i])
    while pending or engine.has_unfinished_requests():
        while pending and arrivals[pending[0]] <= it:
            i = pending.pop(0)
            engine.add_request(requests[i][0], requests[i][1], request_id=str(i))
        for out in engine.step():
            if out.finished:
                outputs[int(out.request_id)] = out.token_ids
                order.append(int(out.request_id))
        it += 1
        assert it < 10_000
    return outputs, order


@pytest.fixture(scope="module")
def alone():
    """Each request generated alone (batch of one)."""
    engine = make_engine(max_batch_size=1, warmup=False)
    return {i: run(engine, [r])[0][0] for i, r in enumerate(_requests())}


@pytest.mark.parametrize(
    "policy,kw",
    [
        ("orca", {}),
        ("orca", {"n_workers": 2}),
        ("paged", {}),
        ("paged", {"num_kv_blocks": 24, "max_num_batched_tokens": 16}),  # forces preemption
        ("paged", {"n_workers": 2}),
        ("paged", {"n_workers": 2, "num_kv_blocks": 24, "max_num_batched_tokens": 16}),
        ("static", {}),
    ],
)
def test_batched_greedy_equals_alone(alone, policy, kw):
    reqs = _requests()
    arrivals = np.random.default_rng(1).integers(0, 30, len(reqs)).tolist()
    engine = make_engine(policy, warmup=False, **kw)
    outputs, order = run(engine, reqs, arrivals)
    assert sorted(order) == list(range(len(reqs)))  # each finished exactly once
    for i in range(len(reqs)):
        assert outputs[i] == alone[i], i
    if "num_kv_blocks" in kw:
        assert engine.num_preemptions > 0


@pytest.mark.parametrize("policy,short_first", [("orca", True), ("paged", True), ("static", False)])
def test_short_request_overtakes_long_one(policy, short_first):
    long_req = ([1, 2, 3], SamplingParams(max_tokens=40, ignore_eos=True))
    short_req = ([4, 5], SamplingParams(max_tokens=2, ignore_eos=True))
    _, order = run(make_engine(policy, warmup=False), [long_req, short_req], arrivals=[0, 1])
    assert (order == [1, 0]) is short_first


@pytest.mark.parametrize("policy", ["orca", "paged", "static"])
def test_seeded_sampling_same_alone_and_batched(policy):
    sp = SamplingParams(
        max_tokens=12, temperature=0.8, top_k=50, top_p=0.9, seed=42, ignore_eos=True
    )
    prompt = [9, 8, 7, 6]
    alone, _ = run(make_engine(policy, warmup=False), [(prompt, sp)])
    others = [
        (p, SamplingParams(max_tokens=m.max_tokens, temperature=1.0, seed=i, ignore_eos=True))
        for i, (p, m) in enumerate(_requests(7))
    ]
    batched, _ = run(
        make_engine(policy, warmup=False),
        others[:3] + [(prompt, sp)] + others[3:],
        arrivals=[0, 0, 1, 2, 2, 3, 5, 5],
    )
    assert batched[3] == alone[0]
    assert len(set(alone[0])) > 3  # really sampled, not a constant stream
    other_seed, _ = run(
        make_engine(policy, warmup=False), [(prompt, dataclasses.replace(sp, seed=43))]
    )
    assert other_seed[0] != alone[0]  # the seed matters


def test_logprobs_hold_the_sampled_and_top_tokens():
    engine = make_engine(warmup=False, max_logprobs=3)
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=6, logprobs=3, ignore_eos=True))
    engine.add_request([1, 2], SamplingParams(max_tokens=6, ignore_eos=True))
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    comp = done["0"].outputs[0]
    assert len(comp.logprobs) == len(comp.token_ids) == 6
    for tok, lps in zip(comp.token_ids, comp.logprobs, strict=True):
        values = [e.logprob for e in lps.values()]
        assert len(lps) == 3 and lps[tok].logprob == max(values)  # greedy: the sampled is top-1
        assert next(iter(lps)) == tok and [e.rank for e in lps.values()] == [1, 2, 3]
        assert all(v <= 0 for v in values) and sum(np.exp(values)) <= 1 + 1e-5
        assert all(e.decoded_token is None for e in lps.values())  # no tokenizer
    assert done["1"].outputs[0].logprobs is None
    with pytest.raises(ValueError, match="max_logprobs"):
        engine.add_request([1], SamplingParams(logprobs=4))


@pytest.mark.parametrize("policy", ["orca", "paged"])
def test_500_requests_after_warmup_compile_nothing(policy):
    engine = make_engine(policy, num_kv_blocks=400, warmup=True)
    reqs = _requests(500, seed=5)
    for i in range(0, 500, 7):  # sampled, penalized, scoring prompts: compiled at warm-up too
        prompt, sp = reqs[i]
        extra = dict(frequency_penalty=0.5) if i % 2 else dict(temperature=0.9, seed=i)
        if i % 3 == 0:
            extra["prompt_logprobs"] = 0
        if i % 5 == 0:
            extra["logit_bias"] = {int(prompt[0]): 3.0}
        reqs[i] = (prompt, dataclasses.replace(sp, **extra))
    arrivals = np.random.default_rng(2).integers(0, 400, 500).tolist()
    with count_compiles() as counts:
        outputs, _ = run(engine, reqs, arrivals)
    assert len(outputs) == 500
    assert (counts.traces, counts.compiles) == (0, 0)


def test_bad_requests_are_rejected_and_others_still_served():
    engine = make_engine(warmup=False, num_kv_blocks=8)
    good = engine.add_request([1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
    cases = [
        (lambda: engine.add_request([], SamplingParams()), "empty prompt"),
        (lambda: engine.add_request([1] * 95, SamplingParams(max_tokens=4)), "max_model_len"),
        (lambda: engine.add_request([1] * 10, SamplingParams(max_tokens=40)), "KV blocks"),
        (lambda: engine.add_request([1, 999], SamplingParams()), "vocabulary"),
        (lambda: engine.add_request("text", SamplingParams()), "tokenizer"),
        (lambda: SamplingParams(max_tokens=0), "max_tokens"),
        (lambda: engine.add_request([1], SamplingParams(), request_id=good), "in use"),
        (lambda: engine.add_request([1], SamplingParams(logit_bias={999: 1})), "vocabulary"),
        (lambda: SamplingParams(logit_bias={3: 101}), r"\[-100, 100\]"),
        (lambda: SamplingParams(logit_bias={-1: 1}), "token ids must be >= 0"),
        (lambda: SamplingParams(max_tokens=2, min_tokens=3), "exceeds max_tokens"),
    ]
    for fn, words in cases:
        with pytest.raises(ValueError, match=words):
            fn()
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in outs] == [good] and len(outs[0].token_ids) == 4


def test_abort_frees_blocks_and_keeps_serving():
    """An aborted request gives back its KV blocks and (penalized) its history row."""
    engine = make_engine("paged", warmup=False, num_kv_blocks=40)
    sp = SamplingParams(max_tokens=50, ignore_eos=True, repetition_penalty=1.2)
    a = engine.add_request([1, 2, 3], sp)
    b = engine.add_request([4, 5, 6], dataclasses.replace(sp, max_tokens=5))
    engine.step()
    engine.step()
    assert engine._history.num_used == 2
    assert engine.abort(a) and not engine.abort("nope")
    assert engine._history.num_used == 1
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == [b]
    assert engine.scheduler.kv_cache_manager.num_free_blocks == 39
    assert engine._history.num_used == 0


def test_vllm_prompt_dicts():
    """vLLM's {"prompt_token_ids": ids} (and {"prompt": text}) serve as the ids themselves;
    anything else in the dict is refused, engine unchanged."""
    llm = LLM(params=PARAMS, config=CFG, warmup=False, num_kv_blocks=40, **SMALL)
    sp = SamplingParams(max_tokens=5, ignore_eos=True)
    ids = [[3, 1, 4], [1, 5, 9, 2]]
    plain = llm.generate(ids, sp, use_tqdm=False)
    dicts = llm.generate([{"prompt_token_ids": p} for p in ids], sp, use_tqdm=False)
    assert [o.token_ids for o in dicts] == [o.token_ids for o in plain]
    (one,) = llm.generate({"prompt_token_ids": ids[0]}, sp, use_tqdm=False)
    assert one.token_ids == plain[0].token_ids
    for bad, words in (
        ({"prompt_token_ids": [1], "multi_modal_data": {}}, "unsupported prompt fields"),
        ({}, "either"),
        ({"prompt": "hi"}, "tokenizer"),  # this engine has none
    ):
        with pytest.raises(ValueError, match=words):
            llm.generate(bad, sp, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_unknown_model_is_a_clear_error():
    from orca_jax import LLM

    with pytest.raises(ValueError, match="unknown model 'nope'"):
        LLM("nope")


def test_stop_search_spans_the_delta_boundary_without_rescanning():
    from orca_jax.engine.stop_strings import find_stop

    assert find_stop("hello wor", "ld!", ["world"]) == (6, "world")  # starts in old text
    assert find_stop("abc", "def", ["cd", "ef"]) == (2, "cd")  # earliest wins
    assert find_stop("xx stop", "yy", ["stop"]) is None  # wholly in old text: already seen
    assert find_stop("", "xyz", ["y"]) == (1, "y")


@settings(max_examples=200, deadline=None)
@given(
    text=st.text("abc", max_size=8),
    delta=st.text("abc", max_size=6),
    stops=st.lists(st.text("abc", min_size=1, max_size=4), max_size=3),
    floor=st.integers(0, 14),
)
def test_stop_search_matches_a_brute_force_scan(text, delta, stops, floor):
    """The earliest stop occurrence that ends inside the delta, past `floor`."""
    from orca_jax.engine.stop_strings import find_stop

    whole = text + delta
    found = [
        (i, stop)
        for i in range(len(whole))
        for stop in stops
        if whole.startswith(stop, i) and i + len(stop) > len(text) and i + len(stop) > floor
    ]
    want = min(found, key=lambda f: f[0], default=None)
    got = find_stop(text, delta, stops, floor)
    assert (got and got[0]) == (want and want[0])  # ties between stops: either is right


@pytest.mark.parametrize("policy", ["orca", "paged"])
def test_requests_freed_in_an_empty_iteration_give_back_their_rows(policy):
    """With two batches in flight an iteration can schedule nothing yet report finished
    requests; their block-table rows must be freed too, or later waves run out of rows."""
    engine = make_engine(
        policy,
        num_kv_blocks=5,
        block_size=16,
        max_model_len=11,
        n_workers=2,
        max_batch_size=2,
        warmup=False,
    )
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    for _ in range(3):  # waves of 4 one-block requests; the cache and the row table hold 4
        ids = [engine.add_request(list(range(1, 9)), params) for _ in range(4)]
        done = set()
        while engine.has_unfinished_requests():
            done |= {o.request_id for o in engine.step() if o.finished}
        assert done == set(ids)


def test_penalties_follow_the_raw_logprobs_and_the_batch_does_not_matter():
    """Greedy with frequency and presence penalties: each token is the argmax of the step's
    raw log-probabilities (all V reported) minus the penalties of the tokens before it; the
    same tokens come out alone and in a batch (with preemption under `paged`)."""
    V = CFG.vocab_size
    sp = SamplingParams(
        max_tokens=24, presence_penalty=0.4, frequency_penalty=0.7, logprobs=V, ignore_eos=True
    )
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    engine = make_engine(warmup=False, max_logprobs=V)
    engine.add_request(prompt, sp)
    out = None
    while engine.has_unfinished_requests():
        out = next((o for o in engine.step() if o.finished), out)
    comp = out.outputs[0]
    for t, (tok, lps) in enumerate(zip(comp.token_ids, comp.logprobs, strict=True)):
        raw = np.array([lps[v].logprob for v in range(V)])
        before = comp.token_ids[:t]
        penalty = np.array([0.7 * before.count(v) + 0.4 * (v in before) for v in range(V)])
        assert tok == int(np.argmax(raw - penalty))
    unpenalized = SamplingParams(max_tokens=24, ignore_eos=True)
    plain, _ = run(make_engine(warmup=False), [(prompt, unpenalized)])
    assert plain[0] != comp.token_ids  # the penalties changed the output

    rep = dataclasses.replace(sp, repetition_penalty=1.3, logprobs=None)
    for policy, kw in [("orca", {}), ("paged", dict(num_kv_blocks=40))]:
        alone, _ = run(make_engine(policy, warmup=False, **kw), [(prompt, rep)])
        others = _requests(7, seed=4)
        others[2] = (others[2][0], dataclasses.replace(others[2][1], frequency_penalty=1.0))
        engine = make_engine(policy, warmup=False, **kw)
        batched, _ = run(
            engine, others[:3] + [(prompt, rep)] + others[3:], arrivals=[0, 0, 1, 1, 2, 3, 3, 4]
        )
        assert batched[3] == alone[0], policy
        assert (engine.num_preemptions > 0) == (policy == "paged")
        assert engine._history.num_used == 0  # every history row went back


@pytest.mark.parametrize("n_workers,num_kv_blocks", [(1, 200), (2, 200), (1, 30)])
def test_prefix_caching_gives_the_same_tokens_and_computes_less(n_workers, num_kv_blocks):
    """Prompts sharing long prefixes (a system prompt, a shared document): greedy tokens
    equal the run that computes everything, while cached prefixes skip most prompt tokens;
    with 30 blocks requests are also preempted and restart from their cached blocks."""
    rng = np.random.default_rng(8)
    system = rng.integers(0, CFG.vocab_size, 37).tolist()
    doc = rng.integers(0, CFG.vocab_size, 21).tolist()
    prompts = (
        [system + rng.integers(0, CFG.vocab_size, int(n)).tolist() for n in (3, 9, 1, 14)]
        + [system + doc + [int(t)] for t in (5, 6, 7)]
        + [doc + [1, 2]]
    )
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    kw = dict(n_workers=n_workers, num_kv_blocks=num_kv_blocks, warmup=False)
    want, _ = run(make_engine("paged", **kw), [(p, sp) for p in prompts])
    engine = make_engine("paged", enable_prefix_caching=True, **kw)
    arrivals = [0, 2, 4, 6, 8, 10, 12, 14]  # later prompts find earlier ones' blocks
    cached = {}

    def step():  # run() with each request's prefix-cache figure kept
        outs = Engine.step(engine)
        cached.update({o.request_id: o.num_cached_tokens for o in outs if o.finished})
        return outs

    engine.step = step
    got, _ = run(engine, [(p, sp) for p in prompts], arrivals)
    assert got == want
    kv = engine.scheduler.kv_cache_manager
    assert kv.num_prefix_hits >= 6 * 36  # the system prompt's 9 blocks of 4, six times
    # The first request computes everything; the next ones reuse the system prompt's blocks.
    assert cached["0"] == 0 and all(cached[str(i)] >= 36 for i in range(1, 7))
    if num_kv_blocks == 30:
        assert engine.num_preemptions > 0


def test_llm_generate_n_completions_per_prompt():
    """SamplingParams(n=3) through LLM.generate: one output per prompt holding 3 completions,
    completion j as the same prompt sampled alone from seed + j."""
    llm = LLM(params=PARAMS, config=CFG, warmup=False, max_model_len=96)
    prompts = [[5, 6, 7], [9, 8]]
    sp = SamplingParams(max_tokens=8, temperature=1.0, seed=5, n=3, ignore_eos=True)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    assert len(outs) == 2
    for prompt, out in zip(prompts, outs, strict=True):
        assert [c.index for c in out.outputs] == [0, 1, 2] and out.finished
        for j, completion in enumerate(out.outputs):
            alone = dataclasses.replace(sp, n=1, seed=5 + j)
            assert (
                completion.token_ids == llm.generate([prompt], alone, use_tqdm=False)[0].token_ids
            )
        assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    with pytest.raises(ValueError, match="one completion per request"):
        llm.engine.add_request([1, 2], sp)


@pytest.mark.parametrize("policy", ["orca", "paged", "static"])
def test_logit_bias_and_min_tokens(policy):
    """A +100 bias forces a token at every step (greedy or sampled); min_tokens holds a stop
    token off until then, after which the forced stop token ends the request at once; the
    batch neighbours are unaffected."""
    engine = make_engine(policy, warmup=False)
    forced = SamplingParams(max_tokens=6, logit_bias={11: 100}, ignore_eos=True)
    sampled = dataclasses.replace(forced, temperature=1.0, seed=3)
    held = SamplingParams(max_tokens=9, min_tokens=4, logit_bias={11: 100}, stop_token_ids=[11])
    banned = SamplingParams(max_tokens=6, ignore_eos=True)
    prompt = [5, 6, 7]
    plain = run(make_engine(policy, warmup=False), [(prompt, banned)])[0][0]
    banned = dataclasses.replace(banned, logit_bias={plain[0]: -100})
    requests = [(prompt, forced), (prompt, sampled), (prompt, held), (prompt, banned)]
    outputs, _ = run(engine, requests)
    assert outputs[0] == outputs[1] == [11] * 6
    assert outputs[2][-1] == 11 and len(outputs[2]) == 5 and 11 not in outputs[2][:4]
    assert outputs[3][0] != plain[0]


def test_snapshots_keep_their_iteration_while_the_engine_goes_on():
    """`RequestOutput.snapshot()` (what the server hands each stream) stays as it was when
    taken, the same as a deep copy taken then, while the engine keeps updating in place;
    logprobs and prompt logprobs included."""
    import copy

    engine = make_engine(warmup=False, max_logprobs=2)
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    engine.add_request([3, 1, 4, 1, 5], params)
    taken = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            taken.append((out.snapshot(), copy.deepcopy(out)))
    assert len(taken) == 6 and taken[-1][0].finished
    for snap, deep in taken:
        assert snap == deep
    assert [len(s.token_ids) for s, _ in taken] == [1, 2, 3, 4, 5, 6]


def test_priorities_need_an_engine_that_honours_them():
    params = SamplingParams(max_tokens=2)
    with pytest.raises(ValueError, match="first come first served"):
        make_engine("orca", warmup=False).add_request([1, 2], params, priority=1)
    engine = make_engine("paged", warmup=False, scheduling_order="priority")
    urgent = engine.add_request([1, 2], params, priority=-1)
    assert engine.scheduler.requests[urgent].priority == -1


def test_llm_generate_takes_priorities():
    """vLLM's `LLM.generate(..., priority=)`: with one request per iteration, the most
    urgent prompt (lowest value) is served first whatever its place in the list."""
    llm = LLM(
        params=PARAMS,
        config=CFG,
        policy="paged",
        scheduling_order="priority",
        max_batch_size=1,
        num_kv_blocks=64,
        warmup=False,
    )
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=3), priority=[2, 0, 1], use_tqdm=False)
    order = sorted(range(3), key=lambda i: outs[i].first_token_time)
    assert order == [1, 2, 0]
    with pytest.raises(ValueError, match="2 priorities for 3 prompts"):
        llm.generate(prompts, priority=[0, 1])
