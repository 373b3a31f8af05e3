"""One generation request and its life cycle."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from orca_jax.scheduler.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is in its life; the FINISHED_* ones are final."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    # Blocks taken away; back in the waiting queue to recompute prompt + output so far.
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        """True for the final states (declared last; a value compare, no enum hashing, since
        this runs for every request every iteration)."""
        return self._value_ >= _FIRST_FINISHED

    @property
    def finish_reason(self) -> str | None:
        """The finish reason of a final state ("stop", "length", "abort"), else None."""
        return _FINISH_REASONS.get(self)


_FIRST_FINISHED = RequestStatus.FINISHED_STOPPED.value
_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(eq=False)
class Request:
    """A prompt, how to sample it, and the scheduler's record of its progress.

    Identity semantics (eq=False): two requests are the same only if they are the same object.
    """

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    # Seconds on the engine's clock; FCFS order itself is add_request order.
    arrival_time: float = field(default_factory=time.monotonic)
    # Lower value is served first under the "priority" order (vLLM's convention).
    priority: int = 0
    # End-of-sequence token of the model; None when the model has none.
    eos_token_id: int | None = None
    # The LoRA adapter it runs with (0: none); K/V computed under one adapter are not
    # another's, so it also roots the request's prefix-cache keys.
    lora_int_id: int = 0

    status: RequestStatus = field(default=RequestStatus.WAITING, init=False)
    output_token_ids: list[int] = field(default_factory=list, init=False)
    # Log-probability of each output token, when the runner reports them.
    output_logprobs: list[float] = field(default_factory=list, init=False)
    # Tokens whose K/V is in the cache: they never need to be fed again (until a preemption).
    num_computed_tokens: int = field(default=0, init=False)
    # Times this request lost its blocks and went back to recompute.
    num_preemptions: int = field(default=0, init=False)
    # Prompt tokens found in the prefix cache when it first started (not recomputed).
    num_cached_tokens: int = field(default=0, init=False)
    # Speculative decoding: draft tokens guessed to follow the known ones, for the next
    # iteration to verify (set by the engine while the request decodes; the scheduler feeds
    # them after its last token and clears them once scheduled or preempted).
    spec_token_ids: list[int] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self._all_token_ids = list(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output tokens (a live view: do not mutate)."""
        return self._all_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        """Length of the prompt."""
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens known so far."""
        return len(self._all_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Known tokens whose K/V is not in the cache yet (1 for a request in decode)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def num_wanted_tokens(self) -> int:
        """Tokens the next iteration would feed: the uncomputed ones and the drafts (as many
        as `num_draft_slots`)."""
        uncomputed = len(self._all_token_ids) - self.num_computed_tokens
        if not self.spec_token_ids:
            return uncomputed
        return uncomputed + min(len(self.spec_token_ids), self.num_draft_slots)

    @property
    def num_draft_slots(self) -> int:
        """Drafts max_tokens leaves room for: each accepted one is an output token, and one
        more token comes after them."""
        return max(0, self.sampling_params.max_tokens - len(self.output_token_ids) - 1)

    @property
    def max_tokens(self) -> int:
        """The sampling params' output limit."""
        return self.sampling_params.max_tokens

    @property
    def max_total_tokens(self) -> int:
        """Worst-case length: prompt plus max_tokens."""
        return self.num_prompt_tokens + self.max_tokens

    @property
    def is_finished(self) -> bool:
        """True once the request reached a final status."""
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        """The finish reason ("stop", "length", "abort"), or None while unfinished."""
        return self.status.finish_reason

    def append_output_token_id(self, token_id: int, logprob: float | None = None) -> None:
        """Record one generated token (and its log-probability, if the runner gave one)."""
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)

    def check_stop(self) -> RequestStatus | None:
        """The final status the last generated token puts this request in, or None.

        End-of-sequence and stop token ids win over the length limit when both hold, as in vLLM;
        neither stops a request before `min_tokens`.
        """
        if not self.output_token_ids:
            return None
        last = self.output_token_ids[-1]
        params = self.sampling_params
        if self.num_output_tokens < params.min_tokens:  # < max_tokens: no length stop either
            return None
        if not params.ignore_eos and self.eos_token_id is not None and last == self.eos_token_id:
            return RequestStatus.FINISHED_STOPPED
        if last in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
