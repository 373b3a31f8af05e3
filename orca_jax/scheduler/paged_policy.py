"""Paged KV cache, chunked prefill and recompute preemption (the step beyond the paper)."""

from __future__ import annotations

from orca_jax.scheduler.request import Request, RequestStatus
from orca_jax.scheduler.request_queue import priority_key
from orca_jax.scheduler.scheduler import Scheduler


class PagedScheduler(Scheduler):
    """Blocks allocated as tokens arrive, a per-iteration token budget, preemption by recompute.

    Each iteration spends at most max_num_batched_tokens tokens and max_batch_size requests:
    first on running requests (decodes before continuing prefills; under "priority", best
    priority first), then on new requests from the waiting queue. A prompt longer than what
    is left of the budget is cut into chunks, so decodes keep flowing beside long prefills.

    When a running request cannot get its next block, the newest running request ("fcfs") or
    the lowest-priority one ("priority", ties to the newest) is preempted: its blocks are freed
    (if it was already picked this iteration it is taken out again), its K/V is dropped, and
    it goes back to the front of the waiting queue to recompute prompt + generated tokens; the
    tokens it already streamed are not produced again. The victim may be the request itself.
    An iteration that preempted admits no new request, and a waiting request that does not
    fit stops admission (no skipping ahead, no preemption to make room for it).

    With prefix caching, a request starts from the longest prefix of full blocks already
    computed (by any request, or by itself before a preemption) and computes only the rest.

    With `n_workers` > 1 batches in flight (pipeline stages, or host work overlapping the
    device), a request in a batch in flight is neither scheduled nor preempted until that
    batch returns, as in the paper's Algorithm 1: when the victim the policy picks is in
    flight, the request that needs room waits for the next iteration instead (and nothing
    new is admitted in this one).
    """

    chunked_prefill = True

    def _schedule(self) -> tuple[list[tuple[Request, int]], list[Request]]:
        config = self.config
        budget = config.max_num_batched_tokens
        # req_id -> (request, num_new_tokens), in packing order.
        picked: dict[str, tuple[Request, int]] = {}
        preempted: list[Request] = []
        waits = False  # a running request is waiting for room a batch in flight holds

        for request in self._running_order():
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if request.req_id in self._inflight_req_ids:
                continue  # its next token is still on the device (n_workers > 1)
            if len(picked) == config.max_batch_size or budget == 0:
                break
            num_new_tokens = min(request.num_wanted_tokens, budget)
            while self.kv_cache_manager.allocate_slots(request, num_new_tokens) is None:
                if request.spec_token_ids:  # drafts are the first thing to give up
                    request.spec_token_ids = []
                    num_new_tokens = min(request.num_uncomputed_tokens, budget)
                    continue
                victim = self._pick_victim()
                if victim.req_id in self._inflight_req_ids:
                    # The victim's batch is still on the device: this request waits for the
                    # next iteration (the victim is preempted then), rather than giving way
                    # to a newer request, which could livelock two requests.
                    waits = True
                    break
                if victim.req_id in picked:
                    budget += picked.pop(victim.req_id)[1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                picked[request.req_id] = (request, num_new_tokens)
                budget -= num_new_tokens

        while self.waiting and not preempted and not waits:
            if len(picked) == config.max_batch_size or budget == 0:
                break
            request = self.waiting.peek()
            kv = self.kv_cache_manager
            cached = kv.claim_cached_prefix(request)
            num_new_tokens = min(request.num_uncomputed_tokens, budget)
            if kv.allocate_slots(request, num_new_tokens) is None:
                kv.unclaim(request)  # give any shared blocks back; claim again when it fits
                break
            kv.record_start(request, cached)
            self._admit(request)
            picked[request.req_id] = (request, num_new_tokens)
            budget -= num_new_tokens
        return list(picked.values()), preempted

    def _running_order(self) -> list[Request]:
        # Stable sorts over admission order.
        def is_prefill(request: Request) -> bool:
            return request.num_uncomputed_tokens > 1

        if self.config.scheduling_order == "priority":
            return sorted(self.running, key=lambda r: (r.priority, is_prefill(r)))
        return sorted(self.running, key=is_prefill)

    def _pick_victim(self) -> Request:
        if self.config.scheduling_order == "priority":
            # max() keeps the first of equal keys: scan newest first so ties go to the newest.
            return max(reversed(self.running), key=priority_key)
        return self.running[-1]

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache_manager.free(request)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.waiting.prepend(request)
