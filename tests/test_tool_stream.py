"""Streamed tool calls: what an OpenAI client puts together from the chunks is the
non-streamed reply, however the text is cut into tokens; calls go out as they are written."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orca_jax.engine.outputs import CompletionOutput, RequestOutput
from orca_jax.server import responses
from orca_jax.server.tool_parsers import HermesParser, Llama3JsonParser, PythonicParser
from orca_jax.server.tool_stream import ToolCallStream, value_end
from orca_jax.server.tools import NamedToolChoice, ToolCalling
from tests.test_tools import CALL, TIME, WEATHER

NAMED = NamedToolChoice.model_validate({"type": "function", "function": {"name": "weather"}})
HERMES = ToolCalling.of([WEATHER, TIME], "auto", True, HermesParser())
LLAMA3 = ToolCalling.of([WEATHER, TIME], "auto", True, Llama3JsonParser())
PYTHONIC = ToolCalling.of([WEATHER, TIME], "auto", True, PythonicParser())
REQUIRED = ToolCalling.of([WEATHER, TIME], "required", True)
REQUIRED_ONE = ToolCalling.of([WEATHER, TIME], "required", False)
FORCED = ToolCalling.of([WEATHER, TIME], NAMED, True)
ODD = '{"city": "Pa\\"ris {[", "n": [1, {"a": 2}], "ok": true}'  # brackets inside strings

# (calling, finished text) whose streamed reply adds up to the non-streamed one
CASES = [
    (FORCED, ODD),
    (FORCED, ' {"city": "Paris"}<|im_end|>'),  # text after the object is not arguments
    (
        REQUIRED,
        f'[{{"name": "time", "parameters": {{}}}}, {{"name": "weather", "parameters": {ODD}}}]',
    ),
    (REQUIRED_ONE, f'{{"parameters": {ODD}, "name": "weather"}}'),  # the name comes last
    (REQUIRED, "[{"),  # unfinished: no call is committed, the text comes back as content
    (HERMES, f"Let me check the weather. <tool_call>{CALL}</tool_call>"),
    (HERMES, f'<tool_call>\n{{"name": "time", "arguments": {ODD}}}\n</tool_call><tool_call>{CALL}'),
    (HERMES, f"<tool_call>[{CALL}, {CALL}]</tool_call>"),
    (HERMES, "It is <tool-ish> sunny < in Paris."),
    (HERMES, "<tool_call>{broken</tool_call>"),
    (HERMES, 'Well <tool_call>{"name": "stocks", "arguments": {}}</tool_call>'),  # not offered
    (HERMES, '<tool_call>{"name": "time", "arguments": "{\\"x\\": 1}"}</tool_call>'),
    (LLAMA3, f'<|python_tag|>{{"name": "weather", "parameters": {ODD}}}; {CALL}'),
    (LLAMA3, "The weather is fine."),
    (PYTHONIC, '[weather(city="Pa]ris"), time()]'),  # sent whole at the end
    (PYTHONIC, "Not a call [at all]."),
]


def _snapshots(pieces: list[str], finish_reason: str = "stop") -> list[RequestOutput]:
    """What a stream hands a handler: one snapshot per token, each token one piece."""
    outs, text = [], ""
    for i, piece in enumerate(pieces):
        text += piece
        last = i == len(pieces) - 1
        comp = CompletionOutput(
            0,
            text,
            list(range(i + 1)),
            finish_reason=finish_reason if last else None,
            delta_text=piece,
            delta_token_ids=[i],
        )
        outs.append(RequestOutput("r", None, [1, 2], [comp], finished=last))
    return outs


def _client_view(calling, pieces, finish_reason="stop"):
    """(content, [(id, name, arguments)], finish reason, deltas) as a client adds them up,
    and the non-streamed reply's choice."""
    meta = dict(id="c", created=0, model="m", tokenizer=None, top_n=0, n=1, tools=calling)
    stream = ToolCallStream(calling)
    outs = _snapshots(pieces, finish_reason)
    chunks = [
        responses.chat_chunk(0, out, i == 0, **meta, tool_stream=stream)
        for i, out in enumerate(outs)
    ]
    deltas = [c["choices"][0]["delta"] for c in chunks if c is not None]
    content, calls = "", {}
    for d in deltas:
        content += d.get("content") or ""
        for call in d.get("tool_calls", []):
            if call["index"] not in calls:
                assert len(calls) == call["index"]  # numbered in order, from 0
                assert call["id"].startswith("call_") and call["type"] == "function"
                calls[call["index"]] = [call["id"], call["function"]["name"], ""]
            calls[call["index"]][2] += call["function"].get("arguments", "")
    (reply,) = responses.chat(outs[-1:], **meta)["choices"]
    finish = chunks[-1]["choices"][0]["finish_reason"]
    return (content, list(calls.values()), finish, deltas), reply


def _pieces(text: str, cuts: list[int]) -> list[str]:
    pieces, i = [], 0
    for n in cuts:
        if i < len(text):
            pieces.append(text[i : i + n])
            i += n
    return [*pieces, text[i:]] if i < len(text) else pieces


@settings(max_examples=80, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(1, 7), min_size=40, max_size=40))
def test_streamed_reply_adds_up_to_the_whole_reply(case, cuts):
    calling, text = case
    (content, calls, finish, _), reply = _client_view(calling, _pieces(text, cuts))
    message = reply["message"]
    assert content == (message["content"] or "")
    assert finish == reply["finish_reason"]
    whole = message.get("tool_calls", [])
    assert [name for _, name, _ in calls] == [c["function"]["name"] for c in whole]
    for (_, _, arguments), c in zip(calls, whole, strict=True):
        assert json.loads(arguments) == json.loads(c["function"]["arguments"])


@pytest.mark.parametrize(
    "calling,head,tail",
    [(HERMES, "Sure. <tool_call>", "</tool_call>"), (REQUIRED, "[", "]"), (FORCED, "", "")],
)
def test_calls_stream_as_they_are_written(calling, head, tail):
    """The name goes out once complete, then the arguments grow a token at a time, before
    the output ends; content never shows the start of a call."""
    call = ODD if calling is FORCED else f'{{"name": "weather", "arguments": {ODD}}}'
    text = head + call + tail
    pieces = [text[i : i + 2] for i in range(0, len(text), 2)]
    (content, calls, _, deltas), _ = _client_view(calling, pieces)
    assert content == ("Sure. " if calling is HERMES else "")
    with_args = [d for d in deltas[:-1] if d.get("tool_calls")]
    assert len(with_args) > len(ODD) // 2 - 2  # one delta per piece of the arguments
    assert json.loads(calls[0][2]) == json.loads(ODD)


def test_committed_calls_stay_when_the_output_is_cut():
    """A forced call cut by max_tokens: the arguments streamed stay, the finish reason says
    "length" (the non-streamed reply gives the text back instead)."""
    text = '{"city": "Par'
    (content, calls, finish, _), reply = _client_view(FORCED, list(text), "length")
    assert calls[0][1:] == ["weather", text] and content == "" and finish == "length"
    assert reply["message"]["content"] == text and reply["finish_reason"] == "length"


def test_value_end_follows_strings_and_brackets():
    assert value_end(ODD + " tail", 0) == len(ODD)
    assert value_end(ODD[:-1], 0) is None and value_end('"a\\"', 0) is None
    assert value_end("true, 1", 0) == 4 and value_end("12", 0) is None
