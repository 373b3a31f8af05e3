"""Reading a model's own tool calls out of its free text (`tool_choice: "auto"`).

Models write tool calls in their own syntax, so a server is told which (vLLM's
`--tool-call-parser`). Three families cover most open models:

- `hermes` (Hermes, Qwen, SmolLM3 and others): calls sit in
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (or a JSON list of such
  objects in one block), possibly after some text; a last block the model ended without
  closing still counts.
- `llama3_json` (Llama 3.x): the whole output is the call(s), a JSON object
  `{"name": ..., "parameters": {...}}` (or `"arguments"`), several separated by `;`,
  optionally after `<|python_tag|>`.
- `pythonic` (Llama 3.2 / 4 and others): the whole output is a Python list of calls,
  `[get_weather(city="Paris")]`, read with Python's own `ast`.

A parser says how much of a growing text is surely content (`streamable`: a stream sends
that much as it comes and holds the rest back), where the call objects start in it
(`objects`: a stream sends their names and arguments as they come, `tool_stream.py`), and
reads a finished text into its content and calls (`parse`). Text that does not hold
well-formed calls is content: nothing is lost.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any, Protocol

from orca_jax.server.tool_stream import objects, skip_space

Call = tuple[str, dict[str, Any]]  # (function name, arguments)


class ToolParser(Protocol):
    name: str

    def streamable(self, text: str) -> int:
        """Length of the prefix of `text` (an unfinished output) that is content whatever
        comes next."""

    def objects(self, text: str) -> list[int]:
        """Where the call objects written so far in `text` start, in order."""

    def parse(self, text: str) -> tuple[str, list[Call]]:
        """(content, calls) of a finished output; no calls: all of it is content."""


def _unless_a_call(text: str, opener: str, tag: str) -> int:
    """`streamable` of formats whose whole output is the calls: nothing while the text may
    still turn out to start with `opener` or `tag`, all of it once it cannot."""
    head = text.lstrip()
    if not head or head.startswith(opener) or tag.startswith(head[: len(tag)]):
        return 0
    return len(text)


def _call(value: Any) -> Call | None:
    """A call from a decoded JSON value, or None if it is not shaped like one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return None
    return (value["name"], arguments) if isinstance(arguments, dict) else None


def held_back(text: str, marker: str) -> int:
    """Characters at the end of `text` that could be the start of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class HermesParser:
    name = "hermes"
    start, end = "<tool_call>", "</tool_call>"
    _block = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)

    def streamable(self, text: str) -> int:
        at = text.find(self.start)
        return at if at >= 0 else len(text) - held_back(text, self.start)

    def objects(self, text: str) -> list[int]:
        starts, at = [], text.find(self.start)
        while at >= 0:
            i = skip_space(text, at + len(self.start))
            starts += objects(text, i + 1) if text[i : i + 1] == "[" else objects(text, i)[:1]
            at = text.find(self.start, i)
        return starts

    def parse(self, text: str) -> tuple[str, list[Call]]:
        at = text.find(self.start)
        if at < 0:
            return text, []
        calls = []
        for body in self._block.findall(text, at):
            try:
                value = json.loads(body)
            except (ValueError, RecursionError):
                return text, []  # a malformed block: the whole text stays content
            # One call per block, or (SmolLM2's habit) a list of them in one block.
            block = [_call(v) for v in (value if isinstance(value, list) else [value])]
            if not block or None in block:
                return text, []
            calls += block
        return text[:at], calls


class Llama3JsonParser:
    name = "llama3_json"
    tag = "<|python_tag|>"

    def streamable(self, text: str) -> int:
        return _unless_a_call(text, "{", self.tag)

    def objects(self, text: str) -> list[int]:
        i = skip_space(text, 0)
        if text.startswith(self.tag, i):
            i += len(self.tag)
        return objects(text, i, sep=";")

    def parse(self, text: str) -> tuple[str, list[Call]]:
        rest = text.lstrip()
        if rest.startswith(self.tag):
            rest = rest[len(self.tag) :].lstrip()
        if not rest.startswith("{"):
            return text, []
        decoder, calls = json.JSONDecoder(), []
        while rest:
            try:
                value, end = decoder.raw_decode(rest)
            except (ValueError, RecursionError):
                return text, []
            call = _call(value)
            if call is None:
                return text, []
            calls.append(call)
            rest = rest[end:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            elif rest:  # text after the calls: not this format after all
                return text, []
        return "", calls


class PythonicParser:
    """Llama 3.2 / 4 style: the whole output is a Python list of calls with keyword
    arguments, `[get_weather(city="Paris"), get_time()]` (Llama 4 may wrap it in
    `<|python_start|>...<|python_end|>`). Its arguments are not JSON, so a stream sends the
    calls whole at the end (`objects` finds none)."""

    name = "pythonic"
    start, end = "<|python_start|>", "<|python_end|>"

    def streamable(self, text: str) -> int:
        return _unless_a_call(text, "[", self.start)

    def objects(self, text: str) -> list[int]:
        return []

    def parse(self, text: str) -> tuple[str, list[Call]]:
        rest = text.strip()
        if rest.startswith(self.start):
            rest = rest[len(self.start) :].removesuffix(self.end).strip()
        if not rest.startswith("["):
            return text, []
        try:
            tree = ast.parse(rest, mode="eval").body
            if not isinstance(tree, ast.List) or not tree.elts:
                return text, []
            calls = [_python_call(node) for node in tree.elts]
        except (SyntaxError, ValueError, RecursionError):
            return text, []
        return "", calls


def _python_call(node: ast.expr) -> Call:
    """`name(key=literal, ...)` as a call (ValueError for anything else)."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        raise ValueError("not a call with keyword arguments")
    if any(k.arg is None for k in node.keywords):  # **kwargs
        raise ValueError("not a call with keyword arguments")
    return node.func.id, {k.arg: _literal(k.value) for k in node.keywords}


_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


def _literal(node: ast.expr) -> Any:
    """A Python (or JSON-spelled: true, false, null) literal's value."""
    if isinstance(node, ast.Name) and node.id in _NAMES:
        return _NAMES[node.id]
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(x) for x in node.elts]
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values, strict=True)}
    return ast.literal_eval(node)  # numbers, strings, -1 ... (ValueError otherwise)


PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesParser, Llama3JsonParser, PythonicParser)
}


def get_parser(name: str) -> ToolParser:
    if name not in PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; known: {sorted(PARSERS)}")
    return PARSERS[name]()
