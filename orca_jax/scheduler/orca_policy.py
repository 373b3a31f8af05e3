"""Orca's iteration-level scheduler: Algorithm 1 of the paper."""

from __future__ import annotations

from orca_jax.scheduler.request import Request
from orca_jax.scheduler.scheduler import Scheduler


class OrcaScheduler(Scheduler):
    """FCFS selection with worst-case KV reservation at admission; never preempts.

    Select() of the paper: walk the requests not in a batch in flight, oldest first (admitted
    ones, then the waiting queue), until the batch holds max_batch_size. A request entering
    (INITIATION) reserves blocks for prompt + max_tokens; when they do not fit, selection
    stops: later requests are not tried, so nobody overtakes. An admitted request feeds its
    whole prompt in one iteration (no chunking), then one token per iteration (INCREMENT), and
    keeps its reservation until it finishes. With n_workers > 1, schedule() may run again
    before earlier batches return; a request in a batch in flight is skipped until it returns.
    The reservation covers prompt + max_tokens, one token more than the K/V ever written (the
    last sampled token is never fed back), to keep the paper's accounting.

    One addition to the paper: a batch holds at most max_num_batched_tokens tokens (the
    device's packed-axis ceiling), and selection also stops at the first request whose tokens
    would not fit. With max_num_batched_tokens >= max_batch_size * max_model_len this never
    bites and Select() is the paper's exactly.
    """

    def _schedule(self) -> tuple[list[tuple[Request, int]], list[Request]]:
        max_batch_size = self.config.max_batch_size
        budget = self.config.max_num_batched_tokens
        picked: list[tuple[Request, int]] = []
        inflight = self._inflight_req_ids
        # Admitted requests are older than every waiting one: admission is FCFS and stops at
        # the first request that does not fit.
        for request in self.running:
            if len(picked) == max_batch_size or budget == 0:
                break
            if request.req_id not in inflight:
                # 1 (prompts are fed whole), or more with drafts to verify, within the budget.
                num_new = request.num_wanted_tokens
                if num_new > budget:
                    num_new = budget
                picked.append((request, num_new))
                budget -= num_new
        admitted = self._admit_reserving(max_batch_size - len(picked), budget)
        return picked + [(r, r.num_uncomputed_tokens) for r in admitted], []
