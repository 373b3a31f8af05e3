"""OpenAI's Responses API (`/v1/responses`) through the official client: the reply is the
chat route's, shaped as a response; streamed as Responses events."""

import json

import openai
import pytest
from fastapi.testclient import TestClient
from server_utils import QUESTION

from orca_jax.server import build_app, reasoning

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def test_text_reply_matches_the_chat_route(served):
    _, client, _ = served
    kw = dict(model="smollm2", max_tokens=12, temperature=0)
    chat = client.chat.completions.create(
        **kw,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": QUESTION},
        ],
    )
    want = chat.choices[0].message.content
    kw = dict(model="smollm2", max_output_tokens=12, temperature=0, instructions="Be brief.")
    resp = client.responses.create(**kw, input=QUESTION)
    assert resp.output_text == want and resp.object == "response"
    assert resp.status == (
        "incomplete" if chat.choices[0].finish_reason == "length" else "completed"
    )
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.usage.output_tokens == chat.usage.completion_tokens
    items = [{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}]
    assert client.responses.create(**kw, input=items).output_text == want

    events = list(client.responses.create(**kw, input=QUESTION, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == want
    assert events[-1].response.output_text == want


def test_structured_text_and_tool_calls(served):
    _, client, _ = served
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
    }
    fmt = {"format": {"type": "json_schema", "name": "answer", "schema": schema}}
    resp = client.responses.create(
        model="smollm2", input=QUESTION, max_output_tokens=40, temperature=0, text=fmt
    )
    assert isinstance(json.loads(resp.output_text)["city"], str)

    forced = dict(
        model="smollm2",
        input="What is the weather in Paris?",
        max_output_tokens=40,
        temperature=0,
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
    )
    called = client.responses.create(**forced)
    (call,) = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    with client.responses.stream(**forced) as stream:  # the client's own, strict reader
        kinds = [e.type for e in stream]
        (streamed,) = stream.get_final_response().output
    assert "response.function_call_arguments.done" in kinds
    assert kinds.count("response.function_call_arguments.delta") > 1  # as they are written
    assert (streamed.name, streamed.arguments) == (call.name, call.arguments)
    # the call and its result go back as input items: the conversation goes on
    follow = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "type": "function_call",
            "call_id": call.call_id,
            "name": call.name,
            "arguments": call.arguments,
        },
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"},
    ]
    reply = client.responses.create(model="smollm2", input=follow, max_output_tokens=8)
    assert reply.output_text


@pytest.mark.parametrize(
    "extra,words",
    [
        ({"previous_response_id": "resp_1"}, "unsupported fields"),
        ({"store": True}, "store"),
        ({"input": [{"type": "image", "url": "x"}]}, "not supported"),
        ({"tools": [{"type": "web_search"}]}, "function tools"),
    ],
)
def test_unsupported_options_are_refused(served, extra, words):
    http, _, _ = served
    r = http.post("/v1/responses", json={"model": "smollm2", "input": QUESTION} | extra)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.json()


def test_streamed_thinking_and_calls_as_items(served):
    """With a reasoning parser the thinking streams as a reasoning item; the client's own
    strict reader rebuilds the same response as the one not streamed."""
    _, client, engine = served
    app = build_app(engine, "smollm2", reasoning_parser=reasoning.get_parser("deepseek_r1"))
    with TestClient(app) as http:
        thinking = openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=http)
        kw = dict(model="smollm2", input=QUESTION, max_output_tokens=10, temperature=0)
        whole = thinking.responses.create(**kw)
        with thinking.responses.stream(**kw) as stream:
            kinds = [e.type for e in stream]
            streamed = stream.get_final_response()
    assert (
        [o.type for o in whole.output]
        == [o.type for o in streamed.output]
        == [
            "reasoning",
            "message",
        ]
    )
    assert streamed.output[0].content[0].text == whole.output[0].content[0].text != ""
    assert kinds.count("response.reasoning_text.delta") > 1
