"""OpenAI's Responses API (`POST /v1/responses`) on top of the chat route.

A request becomes a chat request (`to_chat`): `instructions` lead as a system message,
`input` (text, or items: messages, earlier `function_call`s and their
`function_call_output`s) follows as the conversation, `text.format` becomes the
`response_format`, flat function tools become chat tools. The chat's reply becomes the
response's `output` items: a `message` with `output_text`, `function_call`s, and (with a
reasoning parser) a `reasoning` item first. Streamed as Responses events, from the chat
stream's deltas: the thinking as `response.reasoning_text.delta`s, the text as
`response.output_text.delta`s, each call as its item (id and name) then
`response.function_call_arguments.delta`s, as they are written. Nothing is stored: `store`,
`previous_response_id` and the other options we do not implement are refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from orca_jax.engine.outputs import RequestOutput
from orca_jax.server.protocol import ChatCompletionRequest
from orca_jax.server.responses import assistant_reply, chat_chunk


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields: refused by `unsupported`

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    stream: bool = False
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_schema" | ...}}
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["disabled"] | None = None

    def unsupported(self) -> str | None:
        """Why this request cannot be served as asked (previous_response_id, include,
        reasoning, background... are not implemented), or None."""
        if self.model_extra:
            return f"unsupported fields: {sorted(self.model_extra)}"
        if self.store:
            return "store=true is not supported: this server keeps no responses"
        return None

    def to_chat(self) -> ChatCompletionRequest:
        """The same request as a chat completion (ValueError for input it cannot take)."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
        else:
            messages += [_message(item) for item in self.input]
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_completion_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stream": self.stream,
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        if self.text and (fmt := self.text.get("format")):
            body["response_format"] = _response_format(fmt)
        if self.tools:
            body["tools"] = [_chat_tool(t) for t in self.tools]
        if self.tool_choice is not None:
            body["tool_choice"] = _chat_tool_choice(self.tool_choice)
        return ChatCompletionRequest.model_validate(body)


def _message(item: dict[str, Any]) -> dict[str, Any]:
    """One input item as a chat message."""
    kind = item.get("type", "message")
    if kind == "message":
        content = item.get("content")
        if isinstance(content, list):  # input_text / output_text parts
            if any(p.get("type") not in ("input_text", "output_text") for p in content):
                raise ValueError("only text content parts are supported")
            content = "".join(p.get("text", "") for p in content)
        return {"role": item.get("role", "user"), "content": content}
    if kind == "function_call":
        call = {"name": item.get("name"), "arguments": item.get("arguments", "{}")}
        tool_call = {"id": item.get("call_id"), "type": "function", "function": call}
        return {"role": "assistant", "content": None, "tool_calls": [tool_call]}
    if kind == "function_call_output":
        return {"role": "tool", "tool_call_id": item.get("call_id"), "content": item.get("output")}
    raise ValueError(f"input items of type {kind!r} are not supported")


def _response_format(fmt: dict[str, Any]) -> dict[str, Any]:
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    return {"type": fmt.get("type")}


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise ValueError(f"only function tools are supported, got {tool.get('type')!r}")
    keys = ("name", "description", "parameters", "strict")
    return {"type": "function", "function": {k: tool[k] for k in keys if k in tool}}


def _chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


# ---- the reply as a response ----------------------------------------------------------------


def _output(out: RequestOutput, rid: str, tools, reasoning) -> tuple[list[dict], str]:
    """The response's output items and its status ("completed", or "incomplete" when cut
    by max_output_tokens)."""
    message, finish_reason = assistant_reply(out, tools, reasoning)
    items: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        text = {"type": "reasoning_text", "text": message["reasoning_content"]}
        items.append({"type": "reasoning", "id": f"rs_{rid}", "summary": [], "content": [text]})
    if message.get("content") or not message.get("tool_calls"):
        items.append(_message_item(rid, message["content"] or ""))
    for call in message.get("tool_calls", []):
        function = call["function"]
        items.append(_call_item(call["id"], function["name"], function["arguments"]))
    return items, "incomplete" if finish_reason == "length" else "completed"


def _call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {
        "type": "function_call",
        "id": f"fc_{call_id}",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def _message_item(rid: str, text: str, status: str = "completed") -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": []}
    return {
        "type": "message",
        "id": f"msg_{rid}",
        "status": status,
        "role": "assistant",
        "content": [part] if text or status == "completed" else [],
    }


def response(
    outs: list[RequestOutput],
    *,
    id,
    created,
    model,
    request: ResponsesRequest,
    tools=None,
    reasoning=None,
    status: str | None = None,
    **_,
) -> dict:
    """The response object: finished (`outs[0]`), or in progress (`status`, no output)."""
    out = outs[0]
    items, done = _output(out, id, tools, reasoning) if status is None else ([], status)
    prompt, generated = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
    cached = out.num_cached_tokens
    return {
        "id": id,
        "object": "response",
        "created_at": created,
        "status": done,
        "model": model,
        "output": items,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "tools": request.tools or [],
        "tool_choice": request.tool_choice or "auto",
        "parallel_tool_calls": request.parallel_tool_calls,
        "text": request.text or {"format": {"type": "text"}},
        "metadata": request.metadata or {},
        "store": False,
        "incomplete_details": {"reason": "max_output_tokens"} if done == "incomplete" else None,
        "error": None,
        "usage": None
        if status is not None
        else {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": generated,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + generated,
        },
    }


@dataclasses.dataclass
class ItemStream:
    """What a streamed response has opened so far: an output index per item, in the order
    they appear ("reasoning", "message", then "call0", "call1"...), as the final response
    lists them."""

    opened: dict[str, int] = dataclasses.field(default_factory=dict)


def events(
    i: int, out: RequestOutput, first: bool, *, id, request, items: ItemStream, **meta
) -> list:
    """The Responses stream events of one snapshot of the (single) reply: the chat stream's
    delta (`chat_chunk`: thinking, answer text, tool calls as they are written) turned into
    item events, then, once finished, each item's done events and the response."""
    found: list[dict[str, Any]] = []

    def opened(key: str, item: dict[str, Any], part: dict | None = None) -> int:
        """The output index of item `key`, announced at its first use."""
        if key not in items.opened:
            k = items.opened[key] = len(items.opened)
            found.append(_event("output_item.added", output_index=k, item=item))
            if part is not None:
                found.append(_event("content_part.added", **_at(item, k), part=part))
        return items.opened[key]

    if first:
        started = response([out], id=id, request=request, status="in_progress", **meta)
        found += [_event("created", response=started), _event("in_progress", response=started)]
    chunk = chat_chunk(i, out, first, id=id, **meta)
    delta = chunk["choices"][0]["delta"] if chunk is not None else {}
    if thought := delta.get("reasoning_content"):
        item = {"type": "reasoning", "id": f"rs_{id}", "summary": [], "content": []}
        k = opened("reasoning", item, {"type": "reasoning_text", "text": ""})
        found.append(_event("reasoning_text.delta", **_at(item, k), delta=thought))
    if text := delta.get("content"):
        item = _message_item(id, "", "in_progress")
        k = opened("message", item, {"type": "output_text", "text": "", "annotations": []})
        found.append(_event("output_text.delta", **_at(item, k), delta=text))
    for call in delta.get("tool_calls", []):
        key = f"call{call['index']}"
        if "id" in call:  # its first delta: id and name
            opened(key, _call_item(call["id"], call["function"]["name"], "", "in_progress"))
        if arguments := call["function"].get("arguments"):
            where = dict(item_id=f"fc_{_call_id(key, meta)}", output_index=items.opened[key])
            found.append(_event("function_call_arguments.delta", **where, delta=arguments))
    if out.finished:
        found += _finished(out, id, request, items, meta)
    return found  # the stream numbers them (`sequence_number`)


def _event(kind: str, **fields) -> dict[str, Any]:
    return {"type": f"response.{kind}", **fields}


def _at(item: dict[str, Any], k: int) -> dict[str, Any]:
    """Where a content part's event points: its item, the item's index, the part's."""
    return {"item_id": item["id"], "output_index": k, "content_index": 0}


def _call_id(key: str, meta: dict) -> str:
    """The id a streamed call went out with (`ToolCallStream`'s)."""
    return meta["tool_stream"].calls[int(key[4:])].id


def _finished(out, id, request, items: ItemStream, meta: dict) -> list[dict[str, Any]]:
    """Each item's done events (items not streamed are announced first), then the
    response; streamed calls keep the ids they went out with."""
    final = response([out], id=id, request=request, **meta)
    found: list[dict[str, Any]] = []
    calls = 0
    for k, item in enumerate(final["output"]):
        key = item["type"]
        if key == "function_call":
            key, calls = f"call{calls}", calls + 1
            if key in items.opened:  # as streamed
                call_id = _call_id(key, meta)
                item.update(call_id=call_id, id=f"fc_{call_id}")
        if key not in items.opened:
            items.opened[key] = k
            found.append(_event("output_item.added", output_index=k, item=item))
        if item["type"] == "message":
            part = item["content"][0]
            found.append(_event("output_text.done", **_at(item, k), text=part["text"]))
            found.append(_event("content_part.done", **_at(item, k), part=part))
        elif item["type"] == "reasoning":
            text = item["content"][0]["text"]
            found.append(_event("reasoning_text.done", **_at(item, k), text=text))
        else:
            where = dict(item_id=item["id"], output_index=k)
            found.append(
                _event("function_call_arguments.done", **where, arguments=item["arguments"])
            )
        found.append(_event("output_item.done", output_index=k, item=item))
    found.append(
        _event("completed" if final["status"] == "completed" else "incomplete", response=final)
    )
    return found
