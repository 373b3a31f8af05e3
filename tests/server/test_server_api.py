"""The OpenAI-compatible server's protocol on SmolLM2's real weights: chat and completions,
streaming, errors, aborts, shared iterations, metrics, n, echo, tokenize. Driven by the
official `openai` client (an independent reading of the protocol) and by raw HTTP for the
error shapes."""

import asyncio

import openai
import pytest
from fastapi.testclient import TestClient
from server_utils import QUESTION, offline_output, scrape

import orca_jax
from models import get_config, init_params
from orca_jax import LLM, SamplingParams
from orca_jax.server import AsyncEngine, build_app


def test_chat_answers_and_streams_the_same_text(served, llm, offline):
    http, client, _ = served
    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=24, temperature=0
    )
    text = reply.choices[0].message.content
    assert "Paris" in text
    tok = llm.get_tokenizer()
    prompt = tok.apply_chat_template(messages)
    assert text == offline_output(offline, prompt, max_tokens=24).text
    assert reply.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))
    assert reply.usage.completion_tokens <= 24

    chunks = list(
        client.chat.completions.create(
            model="smollm2",
            messages=messages,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == (
        reply.choices[0].finish_reason
    )
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens


def test_completions_batch_stop_and_logprobs(served, llm, offline):
    _, client, _ = served
    ids = [llm.get_tokenizer().encode(p) for p in (QUESTION, "The capital of Germany is")]
    out = client.completions.create(
        model="smollm2",
        prompt=ids,
        max_tokens=8,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},  # our extension, as vLLM's
    )
    assert [c.index for c in out.choices] == [0, 1]
    tok = llm.get_tokenizer()
    for choice, prompt in zip(out.choices, ids, strict=True):
        want = offline_output(offline, prompt, max_tokens=8, ignore_eos=True, logprobs=2)
        assert choice.text == want.text
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(want.token_ids) == 8
        for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
            assert len(top) == 2 and max(top.values()) == pytest.approx(chosen)  # greedy
        for t, entry in zip(want.token_ids, want.logprobs, strict=True):  # vLLM's Logprob
            assert entry[t].rank == 1 and list(entry.values())[1].rank == 2  # greedy
            assert entry[t].decoded_token == tok.decode([t], skip_special_tokens=False)
    assert out.usage.completion_tokens == 16

    prompt = "The capital of France is"
    full = offline_output(offline, prompt, max_tokens=16).text
    stop = full.strip().split()[2]  # a word the greedy text contains
    streamed = client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=16, temperature=0, stop=[stop], stream=True
    )
    chunks = list(streamed)
    text = "".join(c.choices[0].text for c in chunks)
    assert text == full[: full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_models_and_health(served):
    http, client, _ = served
    assert [m.id for m in client.models.list()] == ["smollm2"]
    assert http.get("/health").status_code == 200
    assert http.get("/version").json() == {"version": orca_jax.__version__}


def test_continuous_usage_stats(served):
    """vLLM's stream option: every chunk carries the request's counts so far."""
    http, client, _ = served
    chunks = list(
        client.completions.create(
            model="smollm2",
            prompt=QUESTION,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
            extra_body={"ignore_eos": True},
        )
    )
    counts = [c.usage.completion_tokens for c in chunks[:-1]]
    assert counts == [1, 2, 3, 4, 5]
    assert {c.usage.prompt_tokens for c in chunks} == {chunks[-1].usage.prompt_tokens}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


@pytest.mark.parametrize(
    "route,body,status,words",
    [
        ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
        ("/v1/completions", {"prompt": "hi", "n": 65}, 400, "n"),
        ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of"),
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty"),
        ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition"),
        ("/v1/completions", {"prompt": "hi", "min_p": 1.5}, 400, "min_p"),
        ("/v1/completions", {"prompt": "word " * 400}, 400, "max_model_len"),
        ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "vocabulary"),
        ("/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 404, "gpt-9"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}], "tools": []}, 400, "tools"),
    ],
)
def test_bad_requests_get_openai_errors_and_lose_nothing(served, route, body, status, words):
    http, client, engine = served
    r = http.post(route, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"]
    assert not engine.engine.has_unfinished_requests()
    ok = client.completions.create(
        model="smollm2", prompt="hi", max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert ok.usage.completion_tokens == 2  # the server still serves


def test_a_client_that_leaves_aborts_its_request(served):
    _, _, engine = served

    async def leave_after_first_token():
        stream = await engine.add([1, 2, 3], SamplingParams(max_tokens=200), "leaver")
        async for _ in stream:
            break
        await stream.aclose()  # what Starlette does when the client disconnects
        for _ in range(200):
            if not engine.engine.has_unfinished_requests():
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(leave_after_first_token())


def test_concurrent_requests_share_iterations(served, offline):
    """Requests arriving together are served in the same iterations (not one after another),
    each getting the tokens it gets alone."""
    _, _, engine = served
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14]]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = [offline_output(offline, p, max_tokens=12, ignore_eos=True).token_ids for p in prompts]

    async def together():
        streams = [await engine.add(p, params, f"c{i}") for i, p in enumerate(prompts)]

        async def last(stream):
            async for out in stream:
                final = out
            return final.token_ids

        before = engine.engine.num_iterations
        tokens = await asyncio.gather(*(last(s) for s in streams))
        return tokens, engine.engine.num_iterations - before

    tokens, iterations = asyncio.run(together())
    assert tokens == alone
    assert iterations < 2 * 12  # four requests of 12 tokens alone would take 4 x 12


def test_metrics_count_what_the_responses_report(served):
    http, client, _ = served
    before = scrape(http)
    replies = [
        client.completions.create(
            model="smollm2", prompt=p, max_tokens=n, extra_body={"ignore_eos": True}
        )
        for p, n in (("The capital of France is", 5), ("Hello", 1))
    ]
    after = scrape(http)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert grew("orca:prompt_tokens_total") == sum(r.usage.prompt_tokens for r in replies)
    assert grew("orca:generation_tokens_total") == 6
    assert grew("orca:request_success_total", finished_reason="length") == 2
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert grew(f"orca:{name}_count") == 2
        assert grew(f"orca:{name}_sum") > 0
    assert grew("orca:time_per_output_token_seconds_count") == 1  # a 1-token reply has none
    assert grew("orca:request_generation_tokens_sum") == 6
    assert grew("orca:request_generation_tokens_bucket", le="5.0") == 2
    assert grew("orca:request_generation_tokens_bucket", le="2.0") == 1
    assert grew("orca:iterations_total") >= 5
    # The fixture's engine (orca) caches no prefixes: the counters exist and stay at zero.
    assert grew("orca:prefix_cache_queries_total") == grew("orca:prefix_cache_hits_total") == 0
    assert all(r.usage.prompt_tokens_details.cached_tokens == 0 for r in replies)
    # Nothing is left running, waiting or holding KV blocks.
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert after[(f"orca:{gauge}", ())] == 0.0


def test_n_completions_per_prompt(served, llm, offline):
    """n > 1: choice i * n + j is completion j of prompt i, sampled from seed + j; usage
    counts each prompt once."""
    _, client, _ = served
    prompts = ["The capital of France is", "Once upon a time"]
    kw = dict(max_tokens=6, temperature=1.0, seed=7)
    out = client.completions.create(
        model="smollm2", prompt=prompts, n=3, extra_body={"ignore_eos": True}, **kw
    )
    assert [c.index for c in out.choices] == list(range(6))
    for i, prompt in enumerate(prompts):
        for j in range(3):
            want = offline_output(offline, prompt, ignore_eos=True, **{**kw, "seed": 7 + j})
            assert out.choices[3 * i + j].text == want.text
    assert len({c.text for c in out.choices[:3]}) > 1  # different seeds, different samples
    tok = llm.get_tokenizer()
    assert out.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert out.usage.completion_tokens == 6 * 6

    messages = [{"role": "user", "content": QUESTION}]
    chat = dict(model="smollm2", messages=messages, max_tokens=8, temperature=1.0, seed=3, n=2)
    reply = client.chat.completions.create(**chat)
    assert [c.index for c in reply.choices] == [0, 1]
    chunks = list(
        client.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True})
    )
    streamed = ["", ""]
    for c in chunks:
        for choice in c.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == [c.message.content for c in reply.choices]
    assert chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_tokenize_and_detokenize(served, llm):
    http, client, _ = served
    tok = llm.get_tokenizer()
    r = http.post("/tokenize", json={"prompt": QUESTION}).json()
    assert r == {"tokens": tok.encode(QUESTION), "count": len(r["tokens"]), "max_model_len": 256}
    messages = [{"role": "user", "content": QUESTION}]
    chat = http.post("/tokenize", json={"messages": messages}).json()
    reply = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=1)
    assert chat["count"] == reply.usage.prompt_tokens  # what the chat route feeds the model
    text = "The capital of France is"
    ids = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert http.post("/detokenize", json={"tokens": ids["tokens"]}).json() == {"prompt": text}
    for route, body, words in [
        ("/tokenize", {"prompt": "a", "messages": messages}, "exactly one"),
        ("/tokenize", {}, "exactly one"),
        ("/detokenize", {"tokens": [1, 10**9]}, "vocabulary"),
        ("/detokenize", {"tokens": [1], "model": "gpt-9"}, "gpt-9"),
    ]:
        r = http.post(route, json=body)
        assert r.status_code in (400, 404) and words in r.json()["error"]["message"], r.text
    assert http.get("/v1/models").json()["data"][0]["max_model_len"] == 256


def test_prefix_caching_shows_in_usage_and_metrics():
    """A paged engine with prefix caching behind the server: a repeated prompt's usage
    reports the cached tokens, and /metrics counts them."""
    cfg = get_config("tiny-llama")
    llm = LLM(
        params=init_params(cfg, seed=1),
        config=cfg,
        policy="paged",
        enable_prefix_caching=True,
        block_size=4,
        num_kv_blocks=64,
        max_model_len=128,
        warmup=False,
    )
    engine = AsyncEngine(llm.engine)
    try:
        with TestClient(build_app(engine, "tiny")) as http:
            body = {"prompt": list(range(1, 40)), "max_tokens": 3, "temperature": 0}
            first, again = (http.post("/v1/completions", json=body).json() for _ in range(2))
            assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 36  # 9 blocks
            assert again["choices"][0]["token_ids"] == first["choices"][0]["token_ids"]
            metrics = scrape(http)
            assert metrics[("orca:prefix_cache_hits_total", ())] == 36
            assert metrics[("orca:prefix_cache_queries_total", ())] == 2 * 39
    finally:
        engine.shutdown()


def test_speculative_decoding_behind_the_server_counts_its_drafts():
    """An engine with n-gram drafts serves the same greedy tokens, and /metrics counts the
    drafts verified and accepted."""
    cfg = get_config("tiny-llama")
    kw = dict(params=init_params(cfg, seed=1), config=cfg, block_size=4, warmup=False)
    kw |= dict(num_kv_blocks=64, max_model_len=128)
    plain = LLM(**kw)
    engine = AsyncEngine(LLM(**kw, speculative_config={"num_speculative_tokens": 3}).engine)
    prompt = [5, 6, 7, 8] * 6
    try:
        with TestClient(build_app(engine, "tiny")) as http:
            body = {"prompt": prompt, "max_tokens": 24, "temperature": 0}
            choice = http.post("/v1/completions", json=body).json()["choices"][0]
            metrics = scrape(http)
    finally:
        engine.shutdown()
    ref = plain.generate([prompt], SamplingParams(max_tokens=24), use_tqdm=False)[0]
    assert choice["token_ids"] == ref.outputs[0].token_ids
    drafts = metrics[("orca:spec_decode_num_draft_tokens_total", ())]
    accepted = metrics[("orca:spec_decode_num_accepted_tokens_total", ())]
    assert drafts == engine.engine.num_draft_tokens > 0
    assert accepted == engine.engine.num_accepted_tokens > 0


def test_echo_prepends_the_prompt(served):
    http, client, _ = served
    prompt = "The capital of France is"
    kw = dict(model="smollm2", prompt=prompt, max_tokens=6, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    echoed = client.completions.create(**kw, echo=True).choices[0].text
    assert echoed == prompt + plain
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(**kw, echo=True, stream=True)
    )
    assert streamed == prompt + plain


def test_echo_with_logprobs_scores_the_prompt(served, llm, offline):
    """What evaluation harnesses send (echo, logprobs, max_tokens=1) to score a continuation:
    prompt tokens lead with their log-probabilities (None for the first), then the generated
    ones; the same streamed; and with real weights " Paris" beats " London" after "The
    capital of France is"."""
    _, client, _ = served
    tok = llm.get_tokenizer()
    kw = dict(model="smollm2", max_tokens=1, temperature=0, echo=True, logprobs=2)

    def scored(text):
        choice = client.completions.create(prompt=text, **kw).choices[0]
        assert choice.text.startswith(text)
        return choice.logprobs

    lp = scored("The capital of France is Paris")
    ids = tok.encode("The capital of France is Paris")
    want = offline.generate(
        [ids], SamplingParams(max_tokens=1, logprobs=2, prompt_logprobs=2), use_tqdm=False
    )[0]
    assert len(lp.tokens) == len(ids) + 1 and "".join(lp.tokens[:-1]) == tok.decode(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:-1] == pytest.approx(
        [e[t].logprob for t, e in zip(ids[1:], want.prompt_logprobs[1:], strict=True)], abs=1e-5
    )
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()))  # greedy
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]

    two = client.completions.create(prompt="The capital of France is Paris", **kw, n=2).choices
    a, b = (c.logprobs.token_logprobs[:-1] for c in two)  # the prompt, scored once, shared
    assert a == b and a[1:] == pytest.approx(lp.token_logprobs[1:-1], abs=1e-5)

    london = scored("The capital of France is London")
    assert lp.token_logprobs[-2] > london.token_logprobs[-2] + 2.0  # " Paris" vs " London"

    chunks = list(
        client.completions.create(prompt="The capital of France is Paris", **kw, stream=True)
    )
    first = chunks[0].choices[0].logprobs
    assert first.tokens == lp.tokens and first.token_logprobs[1:] == pytest.approx(
        lp.token_logprobs[1:], abs=1e-5
    )


def test_prompt_logprobs_in_vllm_shape(served, llm, offline):
    """vLLM's `prompt_logprobs`: per prompt token (None first) its id's logprob, rank and
    text with the top ones; n completions share the scores of the first; a
    chat reports them beside its choices; a stream cannot have them (as in vLLM)."""
    http, _, _ = served
    tok = llm.get_tokenizer()
    ids = tok.encode("The capital of France is Paris")
    body = dict(prompt=ids, max_tokens=2, temperature=0.8, seed=3, n=2, prompt_logprobs=2)
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.json()
    a, b = (c["prompt_logprobs"] for c in r.json()["choices"])
    assert a == b and len(a) == len(ids) and a[0] is None
    scored = SamplingParams(max_tokens=1, prompt_logprobs=2)
    want = offline.generate([ids], scored, use_tqdm=False)[0]
    for t, got, entry in zip(ids[1:], a[1:], want.prompt_logprobs[1:], strict=True):
        assert got[str(t)]["logprob"] == pytest.approx(entry[t].logprob, abs=1e-5)
        assert got[str(t)]["decoded_token"] == tok.decode([t])
        assert sorted(e["rank"] for e in got.values())[:2] == [1, 2] and len(got) <= 3
    no_scores = http.post("/v1/completions", json=body | {"prompt_logprobs": None})
    assert no_scores.json()["choices"][0]["prompt_logprobs"] is None

    chat = http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1}
        | {"prompt_logprobs": 0},
    ).json()
    rendered = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": QUESTION}])
    assert len(chat["prompt_logprobs"]) == len(tok.encode(rendered, add_special_tokens=False))
    assert all(len(e) == 1 for e in chat["prompt_logprobs"][1:])  # the token alone
    r = http.post("/v1/completions", json=body | {"stream": True})
    assert r.status_code == 400 and "stream" in r.json()["error"]["message"]


def test_api_key(served):
    """With an API key, /v1 answers only requests bearing it; /health stays open."""
    _, _, engine = served
    with TestClient(build_app(engine, "smollm2", api_key="sesame")) as http:
        assert http.get("/v1/models").status_code == 401
        wrong = http.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
        ok = http.get("/v1/models", headers={"Authorization": "Bearer sesame"})
        assert ok.status_code == 200 and http.get("/health").status_code == 200
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="sesame", http_client=http)
        assert client.completions.create(model="smollm2", prompt="Hi", max_tokens=2).choices
