"""Tool calls (OpenAI's `tools` / `tool_choice`): forced ones as structured outputs, "auto"
read from the model's own syntax.

A forced choice is a constraint on the output (`orca_jax.structured`): a named function makes
the output that function's arguments, a JSON object of its `parameters` schema; "required"
makes it a JSON list of `{"name": ..., "parameters": {...}}` objects, each one of the tools
(one object, not a list, with `parallel_tool_calls: false`). The finished text is then read
back into OpenAI's `tool_calls`; an output cut by max_tokens comes back as text, with
finish_reason "length". "auto" (OpenAI's default when tools are offered) leaves the output
free and reads the model's own tool-call syntax out of it, which differs from model to model:
the server must be started with a parser for it (`tool_parsers.py`; vLLM's
`--enable-auto-tool-choice --tool-call-parser`), else it is refused with a clear error.
"none" serves the chat as if no tool were offered (the template still sees them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orca_jax.scheduler import StructuredOutputs
from orca_jax.server.tool_parsers import ToolParser

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object; None: any object
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _an_object(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None and schema.get("type", "object") != "object":
            raise ValueError("a function's parameters must be a JSON schema of an object")
        return schema


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


class _FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: _FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


@dataclasses.dataclass(frozen=True)
class ToolCalling:
    """A chat request whose output must be tool calls: which tools, and how many calls."""

    tools: tuple[Tool, ...]
    named: str | None  # the forced function, or None for "required" / "auto" (any of them)
    parallel: bool  # "required" may call several
    parser: ToolParser | None = None  # "auto": the calls are read from free text with it

    @classmethod
    def of(
        cls,
        tools: list[Tool] | None,
        choice: ToolChoice | None,
        parallel: bool,
        auto_parser: ToolParser | None = None,
    ) -> ToolCalling | None:
        """The tool calling a request asks for; None when it asks for text (ValueError for
        a choice that cannot be served: "auto" needs the server's `auto_parser`)."""
        if choice is None:  # OpenAI's default: "auto" when tools are offered
            choice = "auto" if tools else "none"
        if choice == "none":
            return None
        if not tools:
            raise ValueError(f"tool_choice {_describe(choice)} needs tools")
        names = [t.function.name for t in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        if choice == "auto":
            if auto_parser is None:
                raise ValueError(
                    'tool_choice "auto" (the default when tools are sent) needs the model\'s '
                    "own tool-call syntax read from free text: start the server with "
                    "--enable_auto_tool_choice --tool_call_parser=NAME, or send tool_choice "
                    '"required", a named function, or "none"'
                )
            return cls(tuple(tools), None, parallel, auto_parser)
        named = None if choice == "required" else choice.function.name
        if named is not None and named not in {t.function.name for t in tools}:
            raise ValueError(f"tool_choice names {named!r}, which is not among the tools")
        return cls(tuple(tools), named, parallel)

    def constraint(self) -> StructuredOutputs | None:
        """What the output must be (see the module docstring); None for "auto"."""
        if self.parser is not None:
            return None
        if self.named is not None:
            return StructuredOutputs(json=self._parameters(self.named))
        one = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": [t.function.name]},
                        "parameters": t.function.parameters or _ANY_OBJECT,
                    },
                    "required": ["name", "parameters"],
                }
                for t in self.tools
            ]
        }
        schema = {"type": "array", "items": one, "minItems": 1} if self.parallel else one
        return StructuredOutputs(json=schema)

    def parse(self, text: str) -> list[dict[str, Any]] | None:
        """OpenAI's `tool_calls` read from a finished output; None if it does not start with
        complete JSON of the expected shape (a length-limited output, say). Text after the
        JSON (an end-of-sequence token kept by skip_special_tokens=false) is ignored.
        "auto": see `parse_auto`."""
        if self.parser is not None:
            return self.parse_auto(text)[1]
        try:
            value, _ = json.JSONDecoder().raw_decode(text.lstrip())
        except (ValueError, RecursionError):  # also Python's limit on huge integers
            return None
        if self.named is not None:
            return [_call(self.named, value)] if isinstance(value, dict) else None
        calls = value if self.parallel else [value]
        if not isinstance(calls, list) or not all(
            isinstance(c, dict)
            and isinstance(c.get("name"), str)
            and isinstance(c.get("parameters"), dict)
            for c in calls
        ):
            return None
        return [_call(c["name"], c["parameters"]) for c in calls]

    def parse_auto(self, text: str) -> tuple[str, list[dict[str, Any]] | None]:
        """ "auto": the content (the text before the calls) and the calls the model wrote,
        or (the whole text, None) when it called none of the offered tools."""
        content, calls = self.parser.parse(text)
        if not calls or any(name not in self.names for name, _ in calls):
            return text, None
        return content, [_call(name, arguments) for name, arguments in calls]

    @functools.cached_property
    def names(self) -> frozenset[str]:
        """The offered functions' names (built once: streams ask at every chunk)."""
        return frozenset(t.function.name for t in self.tools)

    @staticmethod
    def new_call_id() -> str:
        return f"call_{uuid.uuid4().hex[:24]}"

    @property
    def finish_reason(self) -> str:
        """OpenAI's: "stop" for a forced function, "tool_calls" when the call was chosen."""
        return "stop" if self.named is not None else "tool_calls"

    def _parameters(self, name: str) -> dict[str, Any]:
        tool = next(t for t in self.tools if t.function.name == name)
        return tool.function.parameters or _ANY_OBJECT


def _call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": ToolCalling.new_call_id(),
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


def _describe(choice: ToolChoice) -> str:
    return f'"{choice}"' if isinstance(choice, str) else f"function {choice.function.name!r}"
