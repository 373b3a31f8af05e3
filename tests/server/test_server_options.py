"""What a request may ask of the server beyond plain text: penalties and min_p, logit bias,
structured outputs, vLLM's sampling extensions, tool calls, and how the chat is rendered."""

import json
import re

import openai
from fastapi.testclient import TestClient
from server_utils import QUESTION, offline_output

from orca_jax import BeamSearchParams
from orca_jax.server import build_app, reasoning
from orca_jax.server.tool_parsers import HermesParser


def test_penalties_reach_the_sampler(served, offline):
    _, client, _ = served
    kw = dict(max_tokens=12, temperature=0, frequency_penalty=1.5, presence_penalty=0.5)
    out = client.completions.create(
        model="smollm2",
        prompt=QUESTION,
        extra_body={"ignore_eos": True, "repetition_penalty": 1.2},
        **kw,
    )
    text = out.choices[0].text
    assert (
        text
        == offline_output(offline, QUESTION, ignore_eos=True, repetition_penalty=1.2, **kw).text
    )
    assert text != offline_output(offline, QUESTION, ignore_eos=True, max_tokens=12).text


def test_min_p_reaches_the_sampler(served, offline):
    """Seeded sampling at a high temperature with min_p: the offline engine's tokens."""
    _, client, _ = served
    kw = dict(max_tokens=12, temperature=1.5, seed=3)
    out = client.completions.create(
        model="smollm2", prompt=QUESTION, extra_body={"min_p": 0.3, "ignore_eos": True}, **kw
    )
    text = out.choices[0].text
    assert text == offline_output(offline, QUESTION, min_p=0.3, ignore_eos=True, **kw).text
    assert text != offline_output(offline, QUESTION, ignore_eos=True, **kw).text  # it cut something


def test_logit_bias_and_min_tokens(served, llm):
    """OpenAI's logit_bias (string keys) forces a token; vLLM's min_tokens holds the end of
    the chat answer off; bad biases are 400s."""
    http, client, _ = served
    paris = llm.get_tokenizer().encode(" Paris")
    assert len(paris) == 1
    out = client.completions.create(
        model="smollm2", prompt=QUESTION, max_tokens=3, logit_bias={str(paris[0]): 100}
    )
    assert out.choices[0].text == " Paris" * 3
    messages = [{"role": "user", "content": QUESTION}]
    kw = dict(model="smollm2", messages=messages, max_tokens=40, temperature=0)
    short = client.chat.completions.create(**kw)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 20
    held = client.chat.completions.create(**kw, extra_body={"min_tokens": 20})
    assert held.usage.completion_tokens >= 20
    assert held.choices[0].message.content.startswith(short.choices[0].message.content)
    for bias, words in (({"x": 1}, "token ids"), ({"5": 500}, "[-100, 100]")):
        r = http.post("/v1/completions", json={"prompt": QUESTION, "logit_bias": bias})
        assert r.status_code == 400 and words in r.json()["error"]["message"]


def test_structured_outputs(served):
    """OpenAI's response_format (json_schema, json_object) and vLLM's structured_outputs:
    outputs that Python's json / the choice list accept; bad constraints are 400s."""
    http, client, _ = served
    schema = {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "London"]}, "is_capital": {"type": "boolean"}},
        "required": ["city", "is_capital"],
    }
    messages = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    reply = client.chat.completions.create(
        model="smollm2",
        messages=messages,
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    assert reply.choices[0].finish_reason == "stop"
    assert json.loads(reply.choices[0].message.content) == {"city": "Paris", "is_capital": True}
    out = client.completions.create(
        model="smollm2",
        prompt="The capital of France is",
        max_tokens=8,
        extra_body={"structured_outputs": {"choice": [" Paris", " London", " Rome"]}},
    )
    assert out.choices[0].text == " Paris" and out.choices[0].finish_reason == "stop"
    grammar = 'root ::= " " city "."\ncity ::= "Paris" | "London" | "Rome"'  # GBNF
    out = client.completions.create(
        model="smollm2",
        prompt="The capital of France is",
        max_tokens=8,
        extra_body={"structured_outputs": {"grammar": grammar}},
    )
    assert out.choices[0].text == " Paris." and out.choices[0].finish_reason == "stop"
    for body, words in (
        ({"structured_outputs": {"regex": "(a"}}, "regex"),
        ({"structured_outputs": {"grammar": "root ::= x"}}, "grammar: .*'x' not found"),
        (
            {"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}},
            "not both",
        ),
    ):
        r = http.post("/v1/completions", json={"prompt": QUESTION, **body})
        assert r.status_code == 400 and re.search(words, r.json()["error"]["message"]), r.json()


def test_vllm_sampling_extensions(served, llm):
    """bad_words, allowed_token_ids, include_stop_str_in_output and truncate_prompt_tokens
    reach the engine through the server, as vLLM's server takes them."""
    http, client, _ = served
    tok = llm.get_tokenizer()
    kw = dict(model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert client.completions.create(**kw).choices[0].text.startswith(" Paris")
    banned = client.completions.create(**kw, extra_body={"bad_words": ["Paris"]})
    assert "Paris" not in banned.choices[0].text
    london = tok.encode(" London")
    only = client.completions.create(**kw, extra_body={"allowed_token_ids": london})
    assert only.choices[0].text == " London" * 4
    stop = client.completions.create(
        **kw, stop=[" Paris"], extra_body={"include_stop_str_in_output": True}
    )
    assert stop.choices[0].text == " Paris" and stop.choices[0].finish_reason == "stop"
    short = client.completions.create(**kw, extra_body={"truncate_prompt_tokens": 2})
    assert short.usage.prompt_tokens == 2
    r = http.post("/v1/completions", json={"prompt": "x", "allowed_token_ids": [10**7]})
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "celsius": {"type": "boolean"},
            },
            "required": ["city", "celsius"],
        },
    },
}


TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
        },
    },
}


def test_forced_tool_calls(served):
    """tool_choice naming a function, or "required": the reply is tool calls whose arguments
    parse and follow the function's schema, streamed or not; "auto" and inconsistent choices
    are 400s, "none" answers in text."""
    http, client, _ = served
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(
        model="smollm2", messages=messages, max_tokens=60, temperature=0, tools=[WEATHER, TIME]
    )
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(**kw, tool_choice=named)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert isinstance(args["city"], str) and isinstance(args["celsius"], bool)

    streamed = list(client.chat.completions.create(**kw, tool_choice=named, stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    deltas = [d for c in streamed for d in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].function.name == "get_weather" and len(deltas) > 3  # as it is written
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(arguments) == args and {d.index for d in deltas} == {0}
    assert not any(c.choices[0].delta.content for c in streamed)
    assert streamed[-1].choices[0].finish_reason == "stop"

    required = client.chat.completions.create(
        **kw, tool_choice="required", parallel_tool_calls=False
    )
    assert required.choices[0].finish_reason == "tool_calls"
    (call,) = required.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(call.function.arguments), dict)

    text = client.chat.completions.create(**kw, tool_choice="none")
    assert text.choices[0].message.content and not text.choices[0].message.tool_calls

    body = dict(messages=messages, tools=[WEATHER])
    for extra, words in (
        ({}, "--enable_auto_tool_choice"),
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "not among the tools",
        ),
        ({"tool_choice": "required", "tools": None}, "needs tools"),
        (
            {"tool_choice": "required", "response_format": {"type": "json_object"}},
            "no response_format",
        ),
    ):
        r = http.post("/v1/chat/completions", json=body | extra)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.json()


def test_auto_tool_choice_with_a_parser_serves_text_replies(served, offline):
    """A server started with a tool-call parser takes tools with the default "auto": a
    reply that calls no tool is the model's text, the same as without tools offered."""
    http, client, engine = served
    messages = [{"role": "user", "content": QUESTION}]
    with TestClient(build_app(engine, "smollm2", tool_parser=HermesParser())) as with_parser:
        tooled = openai.OpenAI(
            base_url="http://testserver/v1", api_key="-", http_client=with_parser
        )
        kw = dict(model="smollm2", messages=messages, max_tokens=16, temperature=0)
        reply = tooled.chat.completions.create(**kw, tools=[WEATHER])
        plain = client.chat.completions.create(**kw)
        assert reply.choices[0].message.content == plain.choices[0].message.content
        assert not reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == plain.choices[0].finish_reason
        chunks = list(tooled.chat.completions.create(**kw, tools=[WEATHER], stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == plain.choices[0].message.content


def test_chat_rendering_options(served, llm, offline):
    """vLLM's chat options: continue_final_message leaves the assistant's started reply open
    (the model goes on from it), template arguments reach the template, a request's own
    template only on a server that trusts them, and priorities only where honoured."""
    http, client, engine = served
    tok = llm.get_tokenizer()
    started = "The capital of France is"
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": started}]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    rendered = tok.apply_chat_template(messages, **options)
    assert rendered.endswith(started)  # no end-of-turn after it (tested against transformers)
    r = http.post("/tokenize", json={"messages": messages} | options).json()
    assert r["tokens"] == tok.encode(rendered, add_special_tokens=False)
    reply = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=8, temperature=0, extra_body=options
    )
    want = offline_output(offline, r["tokens"], max_tokens=8).text
    assert reply.choices[0].message.content == want and "Paris" in want

    template = "{% if shout %}LOUD {% endif %}{{ messages[0].content }}"
    for body, status, words in [
        ({"continue_final_message": True}, 400, "add_generation_prompt=false"),
        ({"chat_template_kwargs": {"messages": []}}, 400, "cannot set ['messages']"),
        ({"chat_template": template}, 400, "--trust_request_chat_template"),
        ({"priority": 1}, 400, "priority"),
    ]:
        r = http.post("/v1/chat/completions", json={"messages": messages[:1]} | body)
        assert r.status_code == status and words in r.json()["error"]["message"], r.text
    with TestClient(build_app(engine, "smollm2", trust_request_chat_template=True)) as trusting:
        body = {"messages": messages[:1], "chat_template": template}
        plain = trusting.post("/tokenize", json=body).json()["tokens"]
        loud = trusting.post("/tokenize", json=body | {"chat_template_kwargs": {"shout": True}})
        assert tok.decode(plain) == QUESTION
        assert tok.decode(loud.json()["tokens"]) == "LOUD " + QUESTION


def test_beam_search(served, offline):
    """vLLM's `use_beam_search`: the n best beams are the n choices, as the offline
    `LLM.beam_search` finds them; a chat's too; options it would not honour are refused."""
    http, _, _ = served
    prompt = "The capital of France is"
    body = dict(prompt=prompt, n=2, max_tokens=6, temperature=0, use_beam_search=True)
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.json()
    [want] = offline.beam_search([prompt], BeamSearchParams(beam_width=2, max_tokens=6))
    choices = r.json()["choices"]
    assert [c["text"] for c in choices] == [b.text for b in want.sequences]
    assert [c["finish_reason"] for c in choices] == [b.finish_reason for b in want.sequences]
    assert want.sequences[0].text.startswith(" Paris")

    messages = [{"role": "user", "content": QUESTION}]
    chat = {"messages": messages, "n": 2, "max_tokens": 12, "temperature": 0}
    r = http.post("/v1/chat/completions", json=chat | {"use_beam_search": True})
    replies = [c["message"]["content"] for c in r.json()["choices"]]
    assert len(replies) == 2 and "Paris" in replies[0] and replies[0] != replies[1]

    for extra, words in (
        ({"logprobs": 1}, "also sets ['logprobs']"),
        ({"stream": True}, "stream"),
        ({"n": 3}, "max_logprobs >= 6"),  # each step asks for 2 x width alternatives
    ):
        r = http.post("/v1/completions", json=body | extra)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.json()


def test_reasoning_parser(served):
    """--reasoning_parser: deepseek_r1 reads an output with no </think> as all thinking
    (its template opens the block), qwen3 as all answer; streamed the same."""
    _, client, engine = served
    kw = dict(model="smollm2", messages=[{"role": "user", "content": QUESTION}], max_tokens=10)
    plain = client.chat.completions.create(**kw, temperature=0).choices[0].message.content
    for name, thought, answer in (("deepseek_r1", plain, ""), ("qwen3", None, plain)):
        app = build_app(engine, "smollm2", reasoning_parser=reasoning.get_parser(name))
        with TestClient(app) as http:
            body = kw | {"temperature": 0}
            message = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
            assert message.get("reasoning_content") == thought and message["content"] == answer
            lines = http.post("/v1/chat/completions", json=body | {"stream": True}).text
            deltas = [
                json.loads(x[6:])["choices"][0]["delta"]
                for x in lines.splitlines()
                if x.startswith("data: {")
            ]
            assert "".join(d.get("reasoning_content") or "" for d in deltas) == (thought or "")
            assert "".join(d.get("content") or "" for d in deltas) == answer
            # a constrained output is all answer, whatever the parser: here a forced call
            forced = {"type": "function", "function": {"name": "get_weather"}}
            body |= {"tools": [WEATHER], "tool_choice": forced, "max_tokens": 40}
            message = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
            assert message["tool_calls"][0]["function"]["name"] == "get_weather", message
            assert "reasoning_content" not in message
