"""What the engine returns to users, in vLLM's shape (`.outputs[0].text`, `.token_ids`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


def _shallow_copy[T](obj: T) -> T:
    """`copy.copy` of a plain dataclass without its generic reduce protocol (several times
    faster; snapshots are taken per request per iteration)."""
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    return new


class Logprob(NamedTuple):
    """One token's log-probability under the model's raw distribution, as vLLM reports it
    (a named tuple: thousands are made per step when many requests ask for logprobs)."""

    logprob: float
    rank: int | None = None  # 1: the most likely token
    decoded_token: str | None = None  # its text alone (None without a tokenizer)


@dataclass
class CompletionOutput:
    """One completion of a request (orca-jax produces one per request)."""

    index: int
    # Text generated so far (a stop string that ended it is not included).
    text: str
    # Tokens generated so far.
    token_ids: list[int]
    # None while running, then "stop", "length" or "abort".
    finish_reason: str | None = None
    # The stop string or stop token id that finished the request, if any.
    stop_reason: str | int | None = None
    # Per generated token, when asked for (SamplingParams.logprobs = n): {token id: Logprob}
    # holding the sampled token (first) and the n most likely ones.
    logprobs: list[dict[int, Logprob]] | None = None
    # What this iteration added (for streaming).
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    def snapshot(self) -> CompletionOutput:
        """A copy later iterations leave alone (see `RequestOutput.snapshot`)."""
        snap = _shallow_copy(self)
        snap.token_ids = self.token_ids.copy()
        snap.delta_token_ids = self.delta_token_ids.copy()
        if self.logprobs is not None:
            snap.logprobs = self.logprobs.copy()
        return snap


@dataclass
class RequestOutput:
    """A request's state after an iteration: cumulative outputs plus this iteration's delta.

    The engine updates one object per request in place from iteration to iteration (no copy
    on the hot path); `snapshot()` keeps its state as of now.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    # Per prompt token, when asked for (SamplingParams.prompt_logprobs = n): None for the
    # first, then {token id: Logprob} holding that prompt token (first) and the n most likely
    # ones given the tokens before it. Complete once the first generated token arrives.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # Prompt tokens whose K/V came from the prefix cache (paged + enable_prefix_caching).
    num_cached_tokens: int = 0
    # Engine-clock timestamps (seconds): arrival, first token, last token.
    arrival_time: float = 0.0
    first_token_time: float | None = None
    last_token_time: float | None = None

    def snapshot(self) -> RequestOutput:
        """A copy the engine's later iterations do not change. The engine only appends to
        lists (and fills `prompt_logprobs` slots) and replaces strings and ints; the dicts
        and lists it has handed out are never changed again. So copying the lists, not what
        they hold, is enough: a few microseconds, where `copy.deepcopy` walks every token
        and logprob (about 200 us for 300 tokens; a server takes one snapshot per request
        per iteration)."""
        snap = _shallow_copy(self)
        snap.outputs = [c.snapshot() for c in self.outputs]
        if self.prompt_logprobs is not None:
            snap.prompt_logprobs = self.prompt_logprobs.copy()
        return snap

    @property
    def token_ids(self) -> list[int]:
        """Generated tokens of the (single) completion."""
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text
