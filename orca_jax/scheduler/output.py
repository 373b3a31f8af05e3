"""What crosses between scheduler, runner and engine each iteration: ints and lists of ints."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a batch."""

    req_id: str
    # Tokens fed this iteration: a prompt chunk, the last generated token, or (after a
    # preemption) a chunk of prompt + generated tokens being recomputed.
    token_ids: list[int]
    # Position of token_ids[0] in the sequence (== num_computed_tokens before this step).
    start_pos: int
    # The request's whole block table after this step's allocation (shared with the KV
    # manager, which never changes it in place: read it, do not modify it).
    block_ids: list[int]
    # True when token_ids reach the end of the known tokens, so the step must sample a next
    # token for this request; False for a non-final prefill chunk.
    sample: bool
    # Speculative decoding: the last `num_draft_tokens` of token_ids are drafts, guesses of
    # the tokens after the known ones. The step samples a token after each fed position from
    # the last known one on; the sampled tokens that match the drafts are accepted, up to
    # and including the first that does not (or one past all drafts).
    num_draft_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        """Tokens fed for this request this iteration."""
        return len(self.token_ids)


@dataclass(slots=True)
class SchedulerOutput:
    """One iteration's batch, as the scheduler decided it."""

    # Identifies the batch; the ModelRunnerOutput closing it carries the same id.
    batch_id: int
    # Requests in packing order (their tokens are laid out on the packed axis in this order).
    scheduled: list[ScheduledRequest]
    # Sum of len(token_ids) over `scheduled`.
    num_scheduled_tokens: int
    # Requests preempted by this schedule(): their blocks are freed and their K/V is gone.
    preempted_req_ids: list[str] = field(default_factory=list)
    # Requests whose blocks were released since the previous schedule() (finished or
    # aborted): the runner may drop any state it keeps for them.
    finished_req_ids: list[str] = field(default_factory=list)
    # Drafts the batch verifies (speculative decoding), summed over its requests.
    num_draft_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        """True when no token is scheduled (the batch still has to be closed by update())."""
        return not self.scheduled

    @property
    def num_reqs(self) -> int:
        """Requests in the batch."""
        return len(self.scheduled)


@dataclass(slots=True)
class ModelRunnerOutput:
    """What the runner returns for one batch."""

    batch_id: int
    # The sampled token of each request whose ScheduledRequest.sample was True; for a request
    # with drafts, a list: the accepted drafts then one more token (1 to num_draft_tokens + 1).
    sampled_token_ids: dict[str, int | list[int]] = field(default_factory=dict)
    # Log-probability of each sampled token (a list where the tokens are one), when requested.
    logprobs: dict[str, float | list[float]] | None = None


@dataclass(slots=True)
class RequestDelta:
    """A streaming delta of one request, returned by Scheduler.update()."""

    req_id: str
    # Tokens generated since the previous delta of this request (a fresh list: the receiver
    # may keep it).
    new_token_ids: list[int]
    # True on the request's last delta.
    finished: bool = False
    # "stop", "length" or "abort" once finished, else None.
    finish_reason: str | None = None
    # Log-probabilities of new_token_ids, when the runner reported them.
    logprobs: list[float] | None = None
