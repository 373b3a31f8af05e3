"""Reading forced tool calls back from an output, and the tool definitions a request may hold."""

import json

import pytest
from pydantic import ValidationError

from orca_jax.server.protocol import ChatMessage
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
    with pytest.raises(ValueError, match='"auto" is not supported'):
        ToolCalling.of([TIME], None, True)
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
