"""Response bodies in OpenAI's shapes, built from engine snapshots (`RequestOutput`)."""

from __future__ import annotations

from orca_jax.engine.outputs import Logprob, RequestOutput
from orca_jax.server.reasoning import ReasoningParser, ReasoningStream
from orca_jax.server.tool_stream import ToolCallStream
from orca_jax.server.tools import ToolCalling
from orca_jax.tokenizer import Tokenizer


def model_list(model_name: str, max_model_len: int, lora_modules: dict | None = None) -> dict:
    """The base model, then its LoRA adapters (`root`: the adapter's path, `parent`: the
    base model, as vLLM lists them)."""
    card = {
        "id": model_name,
        "object": "model",
        "created": 0,
        "owned_by": "orca-jax",
        "root": model_name,
        "parent": None,
        "max_model_len": max_model_len,  # as vLLM's model card has it
    }
    adapters = [
        card | {"id": name, "root": lora.lora_path, "parent": model_name}
        for name, lora in (lora_modules or {}).items()
    ]
    return {"object": "list", "data": [card, *adapters]}


def _usage(outs: list[RequestOutput], n: int) -> dict:
    """Token counts; each prompt counts once however many (n) completions it has."""
    prompt = sum(len(o.prompt_token_ids) for o in outs[::n])
    completion = sum(len(o.token_ids) for o in outs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outs[::n])},
    }


def running_usage(out: RequestOutput) -> dict:
    """One request's counts so far (vLLM's `continuous_usage_stats` chunks)."""
    prompt, completion = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _token_text(tokenizer: Tokenizer | None, token_id: int) -> str:
    return f"token_id:{token_id}" if tokenizer is None else tokenizer.token_text(token_id)


def _token_bytes(tokenizer: Tokenizer | None, token_id: int) -> list[int]:
    """The bytes the token stands for: a piece of a character keeps its own bytes."""
    if tokenizer is None:
        return list(_token_text(tokenizer, token_id).encode())
    return list(tokenizer.token_utf8(token_id))


def _ranked(entry: dict[int, Logprob], n: int) -> list[tuple[int, float]]:
    """(id, logprob) of the n most likely of one token's entry (the sampled one is there
    too)."""
    return sorted(((t, e.logprob) for t, e in entry.items()), key=lambda kv: -kv[1])[:n]


def _new_logprobs(out: RequestOutput, new_only: bool):
    comp = out.outputs[0]
    if comp.logprobs is None:
        return None, None
    n = len(comp.delta_token_ids) if new_only else len(comp.token_ids)
    return comp.token_ids[len(comp.token_ids) - n :], comp.logprobs[len(comp.logprobs) - n :]


def completion_logprobs(
    out,
    tokenizer,
    num: int,
    new_only: bool,
    offset: int = 0,
    with_prompt: bool = False,
    scored: RequestOutput | None = None,
) -> dict | None:
    """The legacy completions format: tokens, token_logprobs, top_logprobs, text_offset.

    `with_prompt` (echo): the prompt's tokens lead, the first with None for its logprob and
    alternatives, as OpenAI scores an echoed prompt; their scores are `scored`'s (the
    completion of the same prompt that scored it), by default `out`'s."""
    ids, entries = _new_logprobs(out, new_only)
    if ids is None:
        return None
    prompt_scores = (scored or out).prompt_logprobs
    if with_prompt and prompt_scores is not None:
        ids, entries = out.prompt_token_ids + ids, prompt_scores + entries
    tokens = [_token_text(tokenizer, t) for t in ids]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [
            None if e is None else e[t].logprob for t, e in zip(ids, entries, strict=True)
        ],
        "top_logprobs": [
            None if e is None else {_token_text(tokenizer, k): v for k, v in _ranked(e, num)}
            for e in entries
        ],
        "text_offset": offsets,
    }


def chat_logprobs(out, tokenizer, num: int, new_only: bool) -> dict | None:
    """The chat format: per token its text, logprob, UTF-8 bytes and its top alternatives."""
    ids, entries = _new_logprobs(out, new_only)
    if ids is None:
        return None

    def item(token_id: int, logprob: float) -> dict:
        text, raw = _token_text(tokenizer, token_id), _token_bytes(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {
        "content": [
            {**item(t, e[t].logprob), "top_logprobs": [item(k, v) for k, v in _ranked(e, num)]}
            for t, e in zip(ids, entries, strict=True)
        ]
    }


def prompt_logprobs(out: RequestOutput) -> list[dict | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token (None for the first), {token id: logprob,
    rank and text} of that token and the most likely ones."""
    if out.prompt_logprobs is None:
        return None
    return [
        None
        if entry is None
        else {
            str(t): {"logprob": e.logprob, "rank": e.rank, "decoded_token": e.decoded_token}
            for t, e in entry.items()
        }
        for entry in out.prompt_logprobs
    ]


def _prompt_text(out: RequestOutput, tokenizer: Tokenizer | None) -> str:
    """The prompt as text, for `echo` (token-id prompts decoded; "" without a tokenizer)."""
    if out.prompt is not None:
        return out.prompt
    return tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False) if tokenizer else ""


def completion(
    outs: list[RequestOutput], *, id, created, model, tokenizer, top_n, n, echo=False
) -> dict:
    choices = []
    for i, out in enumerate(outs):
        comp = out.outputs[0]
        text = comp.text if tokenizer is not None else ""
        if echo:
            text = _prompt_text(out, tokenizer) + text
        choices.append(
            {
                "index": i,
                "text": text,
                "finish_reason": comp.finish_reason,
                "stop_reason": comp.stop_reason,
                "logprobs": completion_logprobs(
                    out, tokenizer, top_n, False, with_prompt=echo, scored=outs[i - i % n]
                ),
                "token_ids": list(comp.token_ids),  # an extension, as vLLM's return_token_ids
                "prompt_logprobs": prompt_logprobs(outs[i - i % n]),  # scored by its first
            }
        )
    return {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": _usage(outs, n),
    }


def completion_chunk(
    i: int, out: RequestOutput, first: bool, *, id, created, model, tokenizer, top_n, n, echo=False
):
    comp = out.outputs[0]
    if not comp.delta_token_ids and not out.finished and not (first and echo):
        return None
    prompt = _prompt_text(out, tokenizer) if echo else ""  # echoed text leads the offsets
    choice = {
        "index": i,
        "text": (prompt if first else "") + comp.delta_text,
        "finish_reason": comp.finish_reason,
        "stop_reason": comp.stop_reason,
        "logprobs": completion_logprobs(
            out,
            tokenizer,
            top_n,
            True,
            0 if first else len(prompt) + len(comp.text) - len(comp.delta_text),
            with_prompt=first and echo,
        ),
        "token_ids": list(comp.delta_token_ids),
    }
    return {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def assistant_reply(
    out: RequestOutput, tools: ToolCalling | None, reasoning: ReasoningParser | None = None
) -> tuple[dict, str | None]:
    """The assistant's message and finish reason: its thinking apart (`reasoning`), then tool
    calls when the request forced them and the output completed them, or (tool_choice
    "auto") when the model wrote some; its text otherwise."""
    comp = out.outputs[0]
    thought, text = reasoning.split(comp.text) if reasoning is not None else (None, comp.text)
    message: dict = {"role": "assistant", "content": text}
    if thought is not None:
        message["reasoning_content"] = thought
    if tools is not None and tools.parser is not None:
        content, calls = tools.parse_auto(text)
        if calls is None:
            return message, comp.finish_reason
        return message | {"content": content or None, "tool_calls": calls}, "tool_calls"
    calls = tools.parse(text) if tools is not None and comp.finish_reason == "stop" else None
    if calls is None:
        return message, comp.finish_reason
    return message | {"content": None, "tool_calls": calls}, tools.finish_reason


def chat(
    outs: list[RequestOutput],
    *,
    id,
    created,
    model,
    tokenizer,
    top_n,
    n,
    tools=None,
    reasoning: ReasoningParser | None = None,
) -> dict:
    choices = []
    for i, out in enumerate(outs):
        message, finish_reason = assistant_reply(out, tools, reasoning)
        choices.append(
            {
                "index": i,
                "message": message,
                "finish_reason": finish_reason,
                "stop_reason": out.outputs[0].stop_reason,
                "logprobs": chat_logprobs(out, tokenizer, top_n, False),
            }
        )
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": _usage(outs, n),
        "prompt_logprobs": prompt_logprobs(outs[0]),  # vLLM's place for it in a chat
    }


def chat_chunk(
    i: int,
    out: RequestOutput,
    first: bool,
    *,
    id,
    created,
    model,
    tokenizer,
    top_n,
    n,
    tools=None,
    reasoning: ReasoningParser | None = None,
    tool_stream: ToolCallStream | None = None,
    reasoning_stream: ReasoningStream | None = None,
):
    """A stream chunk. With a reasoning parser (`reasoning_stream`: this choice's) the
    thinking streams as `reasoning_content` and the answer as `content`. With tools
    (`tool_stream`: this choice's), the answer streams until it may be turning into a call,
    calls go out as they are written (id and name, then the arguments piece by piece), and
    the last chunk sends what the whole reply holds beyond what was streamed
    (`tool_stream.py`)."""
    comp = out.outputs[0]
    if not first and not comp.delta_token_ids and not out.finished:
        return None
    finish_reason, delta = comp.finish_reason, {}
    text = comp.text
    if reasoning_stream is not None:
        thought, text = reasoning_stream.delta(comp.text, out.finished)
        if thought:
            delta["reasoning_content"] = thought
    if tools is None and reasoning_stream is None:
        delta["content"] = comp.delta_text
    elif tools is None:
        new, reasoning_stream.content = text[reasoning_stream.content :], len(text)
        if new or not delta:
            delta["content"] = new
    else:
        if out.finished:
            message, finish_reason = assistant_reply(out, tools, reasoning)
            content, calls = tool_stream.finish(text, message)
            delta["content"] = content
        else:
            content, calls = tool_stream.delta(text)
            if content or tools.parser is not None:
                delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
    if first:
        delta = {"role": "assistant", **delta}
    choice = {
        "index": i,
        "delta": delta,
        "finish_reason": finish_reason,
        "logprobs": chat_logprobs(out, tokenizer, top_n, True),
    }
    return {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk(
    outs: list[RequestOutput],
    chunk_fn,
    *,
    id,
    created,
    model,
    tokenizer,
    top_n,
    n,
    echo=False,
    tools=None,
    reasoning=None,
) -> dict:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, usage."""
    kind = "chat.completion.chunk" if chunk_fn is chat_chunk else "text_completion"
    return {
        "id": id,
        "object": kind,
        "created": created,
        "model": model,
        "choices": [],
        "usage": _usage(outs, n),
    }
