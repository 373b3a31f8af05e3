"""Reasoning models' thinking apart from the answer (`--reasoning_parser`), streamed or not."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orca_jax.server import responses
from orca_jax.server.reasoning import ReasoningStream, get_parser
from orca_jax.server.tool_parsers import HermesParser
from orca_jax.server.tool_stream import ToolCallStream
from orca_jax.server.tools import ToolCalling
from tests.test_tool_stream import CALL, TIME, WEATHER, _pieces, _snapshots

R1, QWEN3 = get_parser("deepseek_r1"), get_parser("qwen3")


@pytest.mark.parametrize(
    "parser,text,reasoning,content",
    [
        (R1, "Let me think.</think>Paris.", "Let me think.", "Paris."),
        (R1, "<think>\nHmm.\n</think>\n\nParis.", "\nHmm.\n", "\n\nParis."),
        (R1, "Still thinking when cut", "Still thinking when cut", ""),
        (QWEN3, "<think>Hmm.</think>Paris.", "Hmm.", "Paris."),
        (QWEN3, "Paris.", None, "Paris."),  # no thinking: all answer
        (QWEN3, "<think>cut short", "cut short", ""),
    ],
)
def test_split(parser, text, reasoning, content):
    assert parser.split(text) == (reasoning, content)
    with pytest.raises(ValueError, match="known"):
        get_parser("granite")


def test_an_unfinished_text_holds_back_what_may_be_a_marker():
    assert R1.split("abc</thi", finished=False) == ("abc", "")
    assert QWEN3.split("<thi", finished=False) == (None, "")
    assert QWEN3.split("<thought", finished=False) == (None, "<thought")


HERMES = ToolCalling.of([WEATHER, TIME], "auto", True, HermesParser())
CASES = [
    (R1, None, "I should answer with the capital.</think>\n\nThe capital is Paris."),
    (R1, None, "<think>Cut in the middle of the thinking"),
    (QWEN3, None, "<think>Short.</think>Paris."),
    (QWEN3, None, "No thinking at all."),
    (R1, HERMES, f"The user wants weather.</think>Checking. <tool_call>{CALL}</tool_call>"),
    (QWEN3, HERMES, f"<think>weather</think><tool_call>{CALL}</tool_call>"),
]


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(1, 6), min_size=40, max_size=40))
def test_streamed_thinking_and_answer_add_up_to_the_whole_reply(case, cuts):
    parser, tools, text = case
    meta = dict(id="c", created=0, model="m", tokenizer=None, top_n=0, n=1)
    meta |= dict(tools=tools, reasoning=parser)
    own = {"reasoning_stream": ReasoningStream(parser)}
    if tools is not None:
        own["tool_stream"] = ToolCallStream(tools)
    outs = _snapshots(_pieces(text, cuts))
    chunks = [responses.chat_chunk(0, o, i == 0, **meta, **own) for i, o in enumerate(outs)]
    deltas = [c["choices"][0]["delta"] for c in chunks if c is not None]
    (reply,) = responses.chat(outs[-1:], **meta)["choices"]
    message = reply["message"]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == (
        message.get("reasoning_content") or ""
    )
    assert "".join(d.get("content") or "" for d in deltas) == (message["content"] or "")
    assert "</think" not in "".join(d.get("content") or "" for d in deltas)
    calls = [c["function"]["name"] for d in deltas for c in d.get("tool_calls", []) if "id" in c]
    assert calls == [c["function"]["name"] for c in message.get("tool_calls", [])]
    assert chunks[-1]["choices"][0]["finish_reason"] == reply["finish_reason"]
