"""Streaming tool calls as the model writes them: OpenAI's deltas, each call's id and name
first, then its arguments piece by piece, as vLLM streams them.

A call is a JSON object with a name and arguments (`"arguments"` or `"parameters"`), found
where the request's mode puts it (`ToolCalling`): a forced named function's output is its
arguments object alone; "required" writes one call object, or a JSON list of them; "auto"
writes them in the model's own syntax, whose parser says where they start (`objects`). Each
chunk scans the calls' text again; `re` skips all but the structural characters, in C.

Once a call's name has gone out the call is committed: if the finished output turns out not
to hold well-formed calls (cut by max_tokens, a later block malformed), what was streamed
stays, and the chunk that ends the choice says so by its finish reason. A call naming a tool
that was not offered is never streamed: it and what follows wait for the end, where the whole
reply decides (as `ToolCalling.parse_auto` reads it).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orca_jax.server.tools import ToolCalling

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_PLAIN = re.compile(r'[^"{}\[\]]*')
_SCALAR_END = re.compile(r"[\s,}\]]")
_SPACE = re.compile(r"\s*")
_ARGUMENT_KEYS = ("arguments", "parameters")


def skip_space(text: str, i: int) -> int:
    return _SPACE.match(text, i).end()


def value_end(text: str, i: int) -> int | None:
    """End of the JSON value that starts at `text[i]`, or None while the text may still be
    in it (not a validator: it only follows strings and brackets)."""
    if i >= len(text):
        return None
    if text[i] == '"':
        m = _STRING.match(text, i)
        return m.end() if m else None
    if text[i] not in "{[":
        m = _SCALAR_END.search(text, i)
        return m.start() if m else None
    depth = 0
    while True:
        i = _PLAIN.match(text, i).end()
        if i >= len(text):
            return None
        if text[i] == '"':
            m = _STRING.match(text, i)
            if m is None:
                return None
            i = m.end()
            continue
        depth += 1 if text[i] in "{[" else -1
        i += 1
        if depth == 0:
            return i


def objects(text: str, i: int, sep: str = ",") -> list[int]:
    """Where the JSON objects from `text[i]` on start, one after another with `sep` between
    them; the last may be unfinished. Stops at anything else."""
    starts = []
    while True:
        i = skip_space(text, i)
        if i >= len(text) or text[i] != "{":
            return starts
        starts.append(i)
        end = value_end(text, i)
        if end is None:
            return starts
        i = skip_space(text, end)
        if i >= len(text) or text[i] != sep:
            return starts
        i += 1


@dataclasses.dataclass(frozen=True)
class CallSpan:
    """What a call object holds so far."""

    name: str | None = None  # None until its string is complete
    args: int | None = None  # where its arguments value starts
    args_end: int | None = None  # where it ends; None while it is being written
    bad: bool = False  # not shaped like a call

    def arguments(self, text: str) -> str:
        """Its arguments as OpenAI sends them: the object's text so far; arguments written
        as a JSON string come decoded, once complete."""
        if self.args is None or self.args >= len(text):
            return ""
        if text[self.args] == "{":
            return text[self.args : self.args_end]
        return json.loads(text[self.args : self.args_end]) if self.args_end is not None else ""


def read_call(text: str, start: int) -> CallSpan:
    """The call object that starts at `text[start]` ("{"), as far as it is written."""
    name = args = args_end = None
    i = start + 1
    while True:
        i = skip_space(text, i)
        if i >= len(text):
            return CallSpan(name, args, args_end)
        if text[i] in ",}":
            if text[i] == "}":
                return CallSpan(name, args, args_end, bad=name is None)
            i += 1
            continue
        key_end = value_end(text, i) if text[i] == '"' else -1
        if key_end is None:
            return CallSpan(name, args, args_end)
        if key_end < 0:
            return CallSpan(bad=True)
        key, i = json.loads(text[i:key_end]), skip_space(text, key_end)
        if i < len(text) and text[i] != ":":
            return CallSpan(bad=True)
        i = skip_space(text, i + 1)
        end = value_end(text, i)
        if key in _ARGUMENT_KEYS and i < len(text):
            if text[i] not in '{"':
                return CallSpan(bad=True)
            args, args_end = i, end
        elif key == "name" and end is not None:
            if text[i] != '"':
                return CallSpan(bad=True)
            name = json.loads(text[i:end])
        if end is None:
            return CallSpan(name, args, args_end)
        i = end


@dataclasses.dataclass
class _Sent:
    id: str
    args: int = 0  # characters of its arguments sent


@dataclasses.dataclass
class ToolCallStream:
    """What one streamed choice has sent: content characters and each call's arguments."""

    calling: ToolCalling
    content: int = 0
    calls: list[_Sent] = dataclasses.field(default_factory=list)
    stopped: bool = False  # a call not to stream came: the rest waits for the end

    def delta(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """The content and the tool-call deltas that `text`, the output so far, adds."""
        content = ""
        if (parser := self.calling.parser) is not None:
            end = parser.streamable(text)
            content, self.content = text[self.content : end], max(self.content, end)
        deltas: list[dict[str, Any]] = []
        for k, span in enumerate([] if self.stopped else self._spans(text)):
            if k == len(self.calls):
                if span.bad or (span.name is not None and span.name not in self.calling.names):
                    self.stopped = True  # never streamed: the whole reply decides at the end
                if self.stopped or span.name is None:
                    break
                self.calls.append(_Sent(self.calling.new_call_id()))
                header = {"id": self.calls[k].id, "type": "function"}
                function = {"name": span.name}
            else:
                header, function = {}, {}
            arguments = span.arguments(text)
            if new := arguments[self.calls[k].args :]:
                function["arguments"] = new
            elif header:
                function["arguments"] = ""
            self.calls[k].args = len(arguments)
            if function:
                deltas.append({"index": k, **header, "function": function})
        return content, deltas

    def finish(self, text: str, message: dict[str, Any]) -> tuple[str | None, list[dict]]:
        """The last chunk's content and tool-call deltas, from the whole reply `message`
        (the non-streamed one): what was not streamed yet."""
        if not self.calls:  # nothing committed: the whole reply decides
            content = message["content"]
            calls = message.get("tool_calls", [])
            return content[self.content :] if content else content, _numbered(calls, 0)
        content, deltas = self.delta(text)
        rest = message.get("tool_calls", [])[len(self.calls) :]
        if self.calling.parser is not None:  # text the calls did not take is content
            content = (message["content"] or "")[self.content :]
        return content or None, deltas + _numbered(rest, len(self.calls))

    def _spans(self, text: str) -> list[CallSpan]:
        calling = self.calling
        if calling.parser is not None:
            return [read_call(text, i) for i in calling.parser.objects(text)]
        i = skip_space(text, 0)
        if calling.named is not None:  # the output is the arguments object
            return [CallSpan(calling.named, i, value_end(text, i))]
        if calling.parallel:
            starts = objects(text, i + 1) if text[i : i + 1] == "[" else []
        else:
            starts = objects(text, i)[:1]
        return [read_call(text, s) for s in starts]


def _numbered(calls: list[dict[str, Any]], first: int) -> list[dict[str, Any]]:
    return [{"index": first + j, **c} for j, c in enumerate(calls)]
