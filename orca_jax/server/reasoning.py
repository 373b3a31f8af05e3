"""Reasoning models' thinking, kept apart from the answer (vLLM's `--reasoning-parser`).

Reasoning models write their thinking between `<think>` and `</think>`, then the answer. A
server started with a parser returns the thinking as the message's `reasoning_content` and
the rest as its `content` (streamed: `delta.reasoning_content`, then `delta.content`). Two
conventions, as vLLM names them:

- `deepseek_r1` (DeepSeek-R1 and its distillations, Llama and Qwen): the chat template
  opens `<think>` itself, so the output starts inside the thinking (a `<think>` written
  anyway is skipped); all of it is thinking until `</think>`.
- `qwen3` (Qwen3, and models that open the block themselves): thinking only when the output
  starts with `<think>`; otherwise it is all answer.

An output that ends inside the thinking (max_tokens) has all of it as reasoning. A
constrained output (a JSON schema, forced tool calls) is all answer: the server does not
split it. `split`
reads a growing text: what is surely thinking and surely answer so far, holding back an
end that may be the start of a marker.
"""

from __future__ import annotations

import dataclasses

from orca_jax.server.tool_parsers import held_back

START, END = "<think>", "</think>"


@dataclasses.dataclass(frozen=True)
class ReasoningParser:
    name: str
    starts_inside: bool  # the template opened the thinking: the output starts in it

    def split(self, text: str, finished: bool = True) -> tuple[str | None, str]:
        """(reasoning, content) of an output; of an unfinished one, what is surely each so
        far. Reasoning is None when the output has no thinking."""
        head = text.lstrip()
        if head.startswith(START):
            body = head[len(START) :]
        elif not finished and START.startswith(head):  # may still become `<think>`
            return ("" if self.starts_inside else None), ""
        elif self.starts_inside:
            body = text
        else:
            return None, text
        at = body.find(END)
        if at >= 0:
            return body[:at], body[at + len(END) :]
        keep = len(body) if finished else len(body) - held_back(body, END)
        return body[:keep], ""


@dataclasses.dataclass
class ReasoningStream:
    """What one streamed choice has sent of its thinking and of its answer."""

    parser: ReasoningParser
    reasoning: int = 0  # characters sent
    content: int = 0  # characters of the answer sent (streams without tool calls)

    def delta(self, text: str, finished: bool) -> tuple[str, str]:
        """(the thinking `text` adds, the answer so far)."""
        reasoning, content = self.parser.split(text, finished)
        reasoning = reasoning or ""
        new, self.reasoning = reasoning[self.reasoning :], max(self.reasoning, len(reasoning))
        return new, content


PARSERS = {
    "deepseek_r1": ReasoningParser("deepseek_r1", starts_inside=True),
    "qwen3": ReasoningParser("qwen3", starts_inside=False),
}


def get_parser(name: str) -> ReasoningParser:
    if name not in PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {sorted(PARSERS)}")
    return PARSERS[name]
