"""Request-level batching: the paper's baseline (FasterTransformer behind a batcher)."""

from __future__ import annotations

from orca_jax.scheduler.config import SchedulerConfig
from orca_jax.scheduler.output import RequestDelta
from orca_jax.scheduler.request import Request
from orca_jax.scheduler.scheduler import Scheduler


class StaticScheduler(Scheduler):
    """Run a batch of whole requests until every one of them is done; nobody joins meanwhile.

    When no batch runs, take waiting requests in FCFS order, up to max_batch_size, each
    reserving blocks for prompt + max_tokens; stop at the first one that does not fit, in the
    KV cache or in max_num_batched_tokens together with the prompts taken before it. The
    first iteration feeds the whole prompts, later ones one token per unfinished member. A
    member that finishes early is no longer fed but keeps its blocks, and its completion is
    not reported until the batch ends, as with FasterTransformer: then each member gets one
    delta holding all its tokens (finished=True). So streaming under this policy means a
    single final delta per request. An aborted member leaves the batch at once (freeing its
    blocks once no batch in flight holds it); if that leaves only finished members, the batch
    ends and their deltas come from the next update().
    """

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        # Members that finished and wait, holding their blocks, for the batch to end.
        self._done: list[Request] = []

    def has_unfinished_requests(self) -> bool:
        """Also True while finished members wait for their batch to end."""
        return super().has_unfinished_requests() or bool(self._done)

    def _schedule(self) -> tuple[list[tuple[Request, int]], list[Request]]:
        if not self.running:
            self._end_batch()
            # The first iteration feeds every prompt; later ones feed fewer tokens.
            self._admit_reserving(self.config.max_batch_size, self.config.max_num_batched_tokens)
        return [(r, r.num_uncomputed_tokens) for r in self.running], []

    def _on_finished(self, request: Request) -> None:
        self.running.remove(request)
        self._done.append(request)

    def _delta(self, request: Request, token_ids: list[int], logprobs: list[float] | None) -> None:
        return None

    def _after_update(self) -> None:
        if not self.running:
            self._end_batch()

    def _end_batch(self) -> None:
        for request in self._done:
            self._pending_outputs.append(
                RequestDelta(
                    req_id=request.req_id,
                    new_token_ids=list(request.output_token_ids),
                    finished=True,
                    finish_reason=request.finish_reason,
                    logprobs=list(request.output_logprobs) or None,
                )
            )
            self._release(request)
        self._done = []
