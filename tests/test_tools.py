"""Reading forced tool calls back from an output, and the tool definitions a request may hold."""

import json

import pytest
from pydantic import ValidationError

from orca_jax.server.protocol import ChatMessage
from orca_jax.server.tool_parsers import HermesParser, Llama3JsonParser, PythonicParser, get_parser
from orca_jax.server.tools import NamedToolChoice, Tool, ToolCalling

WEATHER = Tool.model_validate(
    {
        "type": "function",
        "function": {
            "name": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
)
TIME = Tool.model_validate({"type": "function", "function": {"name": "time"}})


def test_parsing_named_and_required_calls():
    choice = NamedToolChoice.model_validate({"type": "function", "function": {"name": "weather"}})
    named = ToolCalling.of([WEATHER, TIME], choice, True)
    (call,) = named.parse('{"city": "Paris"}<|im_end|>')  # special token text kept: ignored
    assert call["function"] == {"name": "weather", "arguments": '{"city": "Paris"}'}
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert named.parse('{"city": "Par') is None  # cut by max_tokens: no call
    assert named.parse("[1]") is None
    assert named.parse('{"n": ' + "9" * 5000 + "}") is None  # Python's integer-size limit

    required = ToolCalling.of([WEATHER, TIME], "required", True)
    calls = required.parse(
        '[{"name": "time", "parameters": {}}, {"name": "weather", "parameters": {"city": "Rome"}}]'
    )
    assert [c["function"]["name"] for c in calls] == ["time", "weather"]
    assert json.loads(calls[1]["function"]["arguments"]) == {"city": "Rome"}
    assert required.parse('[{"name": "time", "parameters": [1]}]') is None
    one = ToolCalling.of([WEATHER], "required", False)
    assert one.parse('{"name": "weather", "parameters": {}}')[0]["function"]["name"] == "weather"
    assert one.constraint().json is not None and "anyOf" in one.constraint().json


def test_bad_tool_definitions_and_choices():
    with pytest.raises(ValidationError, match="JSON schema of an object"):
        Tool.model_validate(
            {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
        )
    with pytest.raises(ValidationError):
        Tool.model_validate({"type": "function", "function": {"name": "has space"}})
    with pytest.raises(ValueError, match="unique"):
        ToolCalling.of([TIME, TIME], "required", True)
    with pytest.raises(ValueError, match="--enable_auto_tool_choice"):
        ToolCalling.of([TIME], None, True)  # "auto", the default with tools: needs a parser
    assert ToolCalling.of([TIME], "none", True) is None and ToolCalling.of(None, None, True) is None


def test_earlier_tool_calls_reach_the_template_with_object_arguments():
    msg = ChatMessage.model_validate(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
                {"id": "d", "type": "function", "function": {"name": "g", "arguments": "not json"}},
            ],
        }
    )
    calls = msg.as_template_message()["tool_calls"]
    assert calls[0]["function"]["arguments"] == {"a": 1}
    assert calls[1]["function"]["arguments"] == "not json"


# ---------------------------------------------------------------- tool_choice "auto"

CALL = '{"name": "weather", "arguments": {"city": "Paris"}}'


@pytest.mark.parametrize(
    "text,content,calls",
    [
        ("It is sunny.", "It is sunny.", []),
        (f"Let me check.\n<tool_call>\n{CALL}\n</tool_call>", "Let me check.\n", ["weather"]),
        (f"<tool_call>{CALL}</tool_call><tool_call>{CALL}</tool_call>", "", ["weather"] * 2),
        (f"<tool_call>{CALL}", "", ["weather"]),  # ended before closing: still a call
        (f"<tool_call>[{CALL}, {CALL}]</tool_call>", "", ["weather"] * 2),  # a list in one
        ("<tool_call>[]</tool_call>", "<tool_call>[]</tool_call>", []),
        ("<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
        (
            '<tool_call>{"arguments": {}}</tool_call>',
            '<tool_call>{"arguments": {}}</tool_call>',
            [],
        ),
    ],
)
def test_hermes_parser(text, content, calls):
    got_content, got_calls = HermesParser().parse(text)
    assert got_content == content and [name for name, _ in got_calls] == calls
    if calls:
        assert got_calls[0][1] == {"city": "Paris"}


def test_hermes_streams_up_to_a_possible_call():
    parser = HermesParser()
    assert parser.streamable("Let me check. <tool") == len("Let me check. ")  # may be one
    assert parser.streamable("a <toolbox") == len("a <toolbox")  # was not
    assert parser.streamable(f"ok <tool_call>{CALL[:9]}") == len("ok ")


@pytest.mark.parametrize(
    "text,calls",
    [
        ('{"name": "weather", "parameters": {"city": "Paris"}}', ["weather"]),
        ('<|python_tag|>{"name": "weather", "arguments": {"city": "Paris"}}', ["weather"]),
        ('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {}}', ["a", "b"]),
        ('{"name": "a", "parameters": "{\\"x\\": 1}"}', ["a"]),  # arguments as a JSON string
        ("The weather is fine.", []),
        ('{"name": "a", "parameters": {}} and then some text', []),
        ('{"city": "Paris"}', []),  # JSON, but no call
    ],
)
def test_llama3_json_parser(text, calls):
    content, got = Llama3JsonParser().parse(text)
    assert [name for name, _ in got] == calls
    assert content == ("" if calls else text)


def test_llama3_json_holds_back_what_may_be_a_call():
    parser = Llama3JsonParser()
    assert parser.streamable("  ") == 0 and parser.streamable(' {"na') == 0
    assert parser.streamable("<|python") == 0
    assert parser.streamable("Sure, the weather") == len("Sure, the weather")
    with pytest.raises(ValueError, match="known"):
        get_parser("mistral")


def test_auto_calls_are_read_only_for_offered_tools():
    auto = ToolCalling.of([WEATHER, TIME], "auto", True, HermesParser())
    assert auto.constraint() is None  # the output stays free
    content, calls = auto.parse_auto(f"Checking.<tool_call>{CALL}</tool_call>")
    assert content == "Checking." and calls[0]["function"]["name"] == "weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    other = '<tool_call>{"name": "stocks", "arguments": {}}</tool_call>'
    assert auto.parse_auto(other) == (other, None)  # not offered: text


@pytest.mark.parametrize(
    "text,calls",
    [
        ('[weather(city="Paris")]', [("weather", {"city": "Paris"})]),
        (
            '[weather(city="Paris", days=[1, 2], opts={"metric": true}), time()]',
            [
                ("weather", {"city": "Paris", "days": [1, 2], "opts": {"metric": True}}),
                ("time", {}),
            ],
        ),
        (
            "<|python_start|>[time(zone=None, offset=-2)]<|python_end|>",
            [("time", {"zone": None, "offset": -2})],
        ),
        ("[weather('Paris')]", []),  # positional arguments: not a call of this format
        ("[weather(city=get_city())]", []),  # not a literal
        ("[]", []),
        ("The weather is fine.", []),
        ("[1, 2", []),
    ],
)
def test_pythonic_parser(text, calls):
    content, got = PythonicParser().parse(text)
    assert got == calls
    assert content == ("" if calls else text)
    parser = PythonicParser()
    assert parser.streamable("[wea") == 0 and parser.streamable("<|python") == 0
    assert parser.streamable("Sure") == 4
