"""Request bodies of the OpenAI API subset we serve, as pydantic models.

Fields we do not implement are refused with a 400 (see `unsupported()`), never ignored
silently. Extensions in vLLM's style: `top_k`, `min_p`, `ignore_eos`, `stop_token_ids`,
`repetition_penalty`, `min_tokens`, `structured_outputs`, `allowed_token_ids`, `bad_words`,
`include_stop_str_in_output`, `skip_special_tokens`, `truncate_prompt_tokens`, `priority`;
for chats `add_generation_prompt`, `continue_final_message`, `chat_template`,
`chat_template_kwargs`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from orca_jax.beam_search import BeamSearchParams
from orca_jax.scheduler import SamplingParams, StructuredOutputs
from orca_jax.server.tool_parsers import ToolParser
from orca_jax.server.tools import Tool, ToolCalling, ToolChoice

MAX_N = 64  # most completions one request may ask per prompt
_BEAM_SEARCH_OPTIONS = {"n", "max_tokens", "ignore_eos", "temperature", "seed"}
_DEFAULTS = SamplingParams()


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON with a schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def structured(self) -> StructuredOutputs | None:
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError("response_format json_schema needs its json_schema.schema")
            return StructuredOutputs(json=self.json_schema.schema_)
        return StructuredOutputs(json_object=True) if self.type == "json_object" else None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the counts so far


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields: checked by unsupported()

    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0  # a vLLM extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)  # completions per prompt
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # a vLLM extension
    logit_bias: dict[str, float] | None = None  # {token id (as text): bias in [-100, 100]}
    min_tokens: int = 0  # a vLLM extension
    response_format: ResponseFormat | None = None
    # vLLM's: json / regex / choice / grammar / json_object
    structured_outputs: dict[str, Any] | None = None
    # vLLM's sampling extensions, as its server takes them.
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    priority: int = 0  # vLLM's: lower first, with --scheduling_order=priority
    prompt_logprobs: int | None = Field(default=None, ge=0)  # vLLM's: score the prompt
    # vLLM's beam search: the n best beams of width n (not streamed)
    use_beam_search: bool = False
    length_penalty: float = 1.0

    def unsupported(self) -> str | None:
        """Why this request cannot be served as asked, or None."""
        if self.model_extra:
            return f"unsupported fields: {sorted(self.model_extra)}"
        if self.prompt_logprobs is not None and getattr(self, "stream", False):
            return "prompt_logprobs are not available when stream=true (as in vLLM)"
        if self.use_beam_search and getattr(self, "stream", False):
            return "use_beam_search returns the finished beams: stream=true is not available"
        return None

    def beam_search_params(self, params: SamplingParams) -> BeamSearchParams:
        """`use_beam_search`: n beams of `params` (what `sampling_params` built); ValueError
        for a sampling option a beam search would not honour."""
        unused = [
            f.name
            for f in dataclasses.fields(SamplingParams)
            if f.name not in _BEAM_SEARCH_OPTIONS
            and getattr(params, f.name) != getattr(_DEFAULTS, f.name)
        ]
        if unused:
            raise ValueError(
                f"use_beam_search takes only {sorted(_BEAM_SEARCH_OPTIONS)}; this request "
                f"also sets {unused}"
            )
        return BeamSearchParams(
            beam_width=params.n,
            max_tokens=params.max_tokens,
            ignore_eos=params.ignore_eos,
            temperature=params.temperature,
            length_penalty=self.length_penalty,
        )

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            seed=self.seed,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias={_token_id(k): v for k, v in (self.logit_bias or {}).items()},
            min_tokens=self.min_tokens,
            structured_outputs=self._structured(),
            allowed_token_ids=self.allowed_token_ids,
            bad_words=tuple(self.bad_words),
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            n=self.n,
            prompt_logprobs=self.prompt_logprobs,
        )

    def _structured(self) -> StructuredOutputs | None:
        spec = self.response_format.structured() if self.response_format else None
        if self.structured_outputs is not None:
            if spec is not None:
                raise ValueError("send response_format or structured_outputs, not both")
            try:
                spec = StructuredOutputs(**self.structured_outputs)
            except TypeError as e:  # an unknown field
                raise ValueError(f"structured_outputs: {e}") from None
        return spec


def _token_id(key: str) -> int:
    """A `logit_bias` key: a token id written as a JSON object key."""
    try:
        return int(key)
    except ValueError:
        raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None


class CompletionRequest(_Common):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = 16
    logprobs: int | None = None  # top log-probabilities per token (and prompt token, if echo)
    echo: bool = False
    suffix: str | None = None

    def unsupported(self) -> str | None:
        if self.suffix:
            return "suffix is not supported"
        return super().unsupported()

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """Echo with logprobs scores the prompt too (what evaluation harnesses ask for)."""
        params = super().sampling_params(max_tokens, logprobs)
        if self.echo and logprobs is not None:
            params = dataclasses.replace(
                params, prompt_logprobs=max(logprobs, self.prompt_logprobs or 0)
            )
        return params

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: one text or token-id list per choice."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id...: passed to the template

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def as_template_message(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if any(part.get("type") != "text" for part in content):
                raise ValueError("only text content parts are supported")
            content = "".join(part.get("text", "") for part in content)
        extra = dict(self.model_extra or {})
        if isinstance(extra.get("tool_calls"), list):  # templates expect arguments as objects
            extra["tool_calls"] = [_with_parsed_arguments(c) for c in extra["tool_calls"]]
        return {**extra, "role": self.role, "content": content or ""}


def _with_parsed_arguments(call: Any) -> Any:
    """An earlier assistant tool call with its JSON-string `arguments` parsed (as vLLM and
    transformers templates expect: `| tojson` would encode a string twice)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except (ValueError, RecursionError):
        return call
    return {**call, "function": {**function, "arguments": arguments}}


# Names a chat is rendered with that `chat_template_kwargs` may not set.
_TEMPLATE_NAMES = {
    "messages",
    "tools",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template",
}


class _ChatTemplating(BaseModel):
    """vLLM's chat rendering options (chat completions, and /tokenize with messages)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False  # leave the last message open; the model goes on
    chat_template: str | None = None  # a template for this request (--trust_request_...)
    chat_template_kwargs: dict[str, Any] | None = None  # the template's own switches

    def templating_unsupported(self) -> str | None:
        if self.continue_final_message and self.add_generation_prompt:
            return (
                "continue_final_message continues the last message; send "
                "add_generation_prompt=false with it"
            )
        if clash := _TEMPLATE_NAMES & (self.chat_template_kwargs or {}).keys():
            return f"chat_template_kwargs cannot set {sorted(clash)}"
        return None

    def template_options(self) -> dict[str, Any]:
        """Keyword arguments of `Tokenizer.apply_chat_template` (besides the messages)."""
        return {
            **(self.chat_template_kwargs or {}),
            "add_generation_prompt": self.add_generation_prompt,
            "continue_final_message": self.continue_final_message,
            "chat_template": self.chat_template,
        }


class ChatCompletionRequest(_Common, _ChatTemplating):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = Field(default=None, min_length=1)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    _tool_parser: ToolParser | None = PrivateAttr(default=None)

    def unsupported(self) -> str | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs needs logprobs=true"
        if why := self.templating_unsupported():
            return why
        try:
            self.tool_calling()
        except ValueError as e:
            return str(e)
        return super().unsupported()

    def use_tool_parser(self, parser: ToolParser | None) -> None:
        """The server's parser of the model's own tool calls (`tool_choice: "auto"`)."""
        self._tool_parser = parser

    def tool_calling(self) -> ToolCalling | None:
        """What tool calls the reply may or must be, if any (ValueError: a choice not
        served)."""
        return ToolCalling.of(
            self.tools, self.tool_choice, self.parallel_tool_calls, self._tool_parser
        )

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates take them (OpenAI's JSON)."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def _structured(self) -> StructuredOutputs | None:
        spec = super()._structured()
        calling = self.tool_calling()
        if calling is None:
            return spec
        if spec is not None:
            raise ValueError(
                "tool calls set the output's format: no response_format or structured_outputs "
                "with them"
            )
        return calling.constraint()

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_ChatTemplating):
    """POST /tokenize (vLLM's extension): a completion `prompt` or chat `messages` (rendered
    with the chat options)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # for `prompt`; chat text is already templated

    def unsupported(self) -> str | None:
        if (self.prompt is None) == (self.messages is None):
            return "send exactly one of prompt and messages"
        return self.templating_unsupported()


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's extension)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]

    def unsupported(self) -> str | None:
        return None
