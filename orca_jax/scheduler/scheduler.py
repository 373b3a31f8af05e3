"""The scheduler interface and the bookkeeping every policy shares.

One iteration is `schedule()` -> run the batch -> `update(output)`. Every SchedulerOutput,
empty or not, is closed by exactly one update() with its batch_id; up to `n_workers` may be
open at once (orca's pipelining), and they may be closed in any order. A policy only decides
which requests run and how many tokens each gets (`_schedule`); this class turns that into
ScheduledRequests, tracks batches in flight, appends sampled tokens, checks stops and frees
blocks.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable

from orca_jax.scheduler.config import SchedulerConfig
from orca_jax.scheduler.kv_cache_manager import KVCacheManager
from orca_jax.scheduler.output import (
    ModelRunnerOutput,
    RequestDelta,
    ScheduledRequest,
    SchedulerOutput,
)
from orca_jax.scheduler.request import Request, RequestStatus
from orca_jax.scheduler.request_queue import FCFSQueue, PriorityQueue, RequestQueue


class Scheduler(abc.ABC):
    """Base of the orca, paged and static policies."""

    # Whether prompts may be cut into chunks; without it a prompt must fit one batch.
    chunked_prefill = False

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.kv_cache_manager = KVCacheManager(
            config.num_blocks, config.block_size, config.enable_prefix_caching
        )
        # Live requests, plus finished ones whose blocks wait for their batch to return.
        self.requests: dict[str, Request] = {}
        self.waiting: RequestQueue = (
            PriorityQueue() if config.scheduling_order == "priority" else FCFSQueue()
        )
        # Admitted requests (they hold blocks), in admission order.
        self.running: list[Request] = []
        self._inflight: dict[int, SchedulerOutput] = {}
        self._inflight_req_ids: set[str] = set()
        self._released_req_ids: list[str] = []
        # Deltas made outside the per-token path (a static batch's end), returned by update().
        self._pending_outputs: list[RequestDelta] = []
        self._next_batch_id = 0

    # ---- the policy ------------------------------------------------------------------------

    @abc.abstractmethod
    def _schedule(self) -> tuple[list[tuple[Request, int]], list[Request]]:
        """Pick this iteration's requests.

        Returns (request, num_new_tokens) pairs in packing order, each request already holding
        blocks for its new tokens, and the requests preempted on the way.
        """

    def _on_finished(self, request: Request) -> None:
        """A request reached a stop or its length limit in update(); by default free it now."""
        self.running.remove(request)
        self._release(request)

    def _delta(
        self, request: Request, token_ids: list[int], logprobs: list[float] | None
    ) -> RequestDelta | None:
        """The streaming delta for the tokens one update() appended (None to hold it back)."""
        reason = request.finish_reason  # None while it runs
        return RequestDelta(request.req_id, token_ids, reason is not None, reason, logprobs)

    def _after_update(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Hook run at the end of every update()."""

    # ---- public interface ------------------------------------------------------------------

    @property
    def num_inflight_batches(self) -> int:
        """Batches returned by schedule() and not yet closed by update()."""
        return len(self._inflight)

    def has_unfinished_requests(self) -> bool:
        """True while some request is waiting or running, or a finished one is unreported."""
        return bool(self.waiting) or bool(self.running) or bool(self._pending_outputs)

    def add_request(self, request: Request) -> None:
        """Queue a request; raises ValueError, changing nothing, if it can never be served."""
        self.validate(request)
        self.requests[request.req_id] = request
        self.waiting.add(request)

    def abort_request(self, req_id: str) -> bool:
        """Abort a request wherever it is; True if it was unfinished (False for unknown ids)."""
        return bool(self.finish_requests([req_id], RequestStatus.FINISHED_ABORTED))

    def finish_requests(self, req_ids: str | Iterable[str], status: RequestStatus) -> list[str]:
        """Finish requests from outside (abort, a stop string found by the engine).

        Unknown and already finished ids are ignored. A finished request is never scheduled
        again and produces no further delta (the caller knows it ended). Its blocks are freed
        at once, or, if it sits in a batch in flight, when that batch returns (the device may
        still be writing its K/V). Returns the ids that were finished by this call.
        """
        if not status.is_finished:
            raise ValueError(f"status must be a FINISHED_* status, got {status}")
        if isinstance(req_ids, str):
            req_ids = [req_ids]
        finished = []
        for req_id in req_ids:
            request = self.requests.get(req_id)
            if request is None or request.is_finished:
                continue
            if request.status is RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            if req_id not in self._inflight_req_ids:
                self._release(request)
            finished.append(req_id)
        return finished

    def schedule(self) -> SchedulerOutput:
        """Decide the next iteration's batch (possibly empty); close it later with update()."""
        if len(self._inflight) >= self.config.n_workers:
            raise RuntimeError(
                f"{len(self._inflight)} batches already in flight (n_workers="
                f"{self.config.n_workers}); call update() before schedule()"
            )
        picked, preempted = self._schedule()
        if self.config.draft_token_buckets:
            picked = self._drafts_within_bucket(picked)
        scheduled = []
        block_table = self.kv_cache_manager.block_table
        num_tokens = num_drafts = 0
        for request, num_new_tokens in picked:  # every running request, every iteration
            start = request.num_computed_tokens
            end = start + num_new_tokens
            tokens = request.all_token_ids
            sample = end >= len(tokens)  # the step reaches the last known token
            token_ids = tokens[start:end]
            drafts = 0
            if request.spec_token_ids:  # fed after the known tokens, if the step reaches them
                drafts = max(0, end - len(tokens))
                token_ids += request.spec_token_ids[:drafts]
                request.spec_token_ids = []  # a later iteration gets fresh ones
                num_drafts += drafts
            scheduled.append(
                ScheduledRequest(
                    request.req_id, token_ids, start, block_table(request.req_id), sample, drafts
                )
            )
            num_tokens += num_new_tokens
        output = SchedulerOutput(
            batch_id=self._next_batch_id,
            scheduled=scheduled,
            num_scheduled_tokens=num_tokens,
            preempted_req_ids=[r.req_id for r in preempted],
            finished_req_ids=self._released_req_ids,
            num_draft_tokens=num_drafts,
        )
        self._next_batch_id += 1
        self._released_req_ids = []
        self._inflight[output.batch_id] = output
        self._inflight_req_ids.update(s.req_id for s in scheduled)
        return output

    def update(self, model_output: ModelRunnerOutput) -> list[RequestDelta]:
        """Close a batch: append sampled tokens, finish and free requests, return the deltas.

        A request's last delta has finished=True and comes from the update() in which it
        finished. Raises ValueError, changing nothing, for an unknown batch or a missing token.
        """
        batch = self._inflight.get(model_output.batch_id)
        if batch is None:
            raise ValueError(f"batch {model_output.batch_id} is not in flight")
        sampled = model_output.sampled_token_ids
        logprobs = model_output.logprobs or {}
        for s in batch.scheduled:
            if not s.sample:
                continue
            tokens = sampled.get(s.req_id)
            if tokens is None:
                if not self.requests[s.req_id].is_finished:
                    raise ValueError(f"no sampled token for request {s.req_id!r}")
            elif not isinstance(tokens, int) and not 1 <= len(tokens) <= s.num_draft_tokens + 1:
                raise ValueError(
                    f"request {s.req_id!r}: {len(tokens)} sampled tokens for "
                    f"{s.num_draft_tokens} drafts (1 to {s.num_draft_tokens + 1} expected)"
                )
        del self._inflight[model_output.batch_id]

        outputs = []
        requests, inflight = self.requests, self._inflight_req_ids
        prefix_caching = self.kv_cache_manager.enable_prefix_caching
        for s in batch.scheduled:
            inflight.discard(s.req_id)
            request = requests[s.req_id]
            if request.is_finished:
                # Finished from outside while in flight: its token is dropped, its blocks free.
                self._release(request)
                continue
            if not s.sample:
                request.num_computed_tokens += len(s.token_ids)
                if prefix_caching:
                    self.kv_cache_manager.cache_computed_blocks(request)
                continue
            token_ids, lps = sampled[s.req_id], logprobs.get(s.req_id)
            if isinstance(token_ids, int):  # one token (every request, every iteration)
                request.num_computed_tokens += len(s.token_ids)
                request.append_output_token_id(token_ids, lps)
                stop_status = request.check_stop()
                token_ids, lps = [token_ids], None if lps is None else [lps]
            else:  # verified drafts: several tokens
                token_ids, lps, stop_status = self._append_verified(request, s, token_ids, lps)
            if prefix_caching:
                self.kv_cache_manager.cache_computed_blocks(request)
            if stop_status is not None:
                request.status = stop_status
                self._on_finished(request)
            delta = self._delta(request, token_ids, lps)
            if delta is not None:
                outputs.append(delta)
        self._after_update()
        outputs.extend(self._pending_outputs)
        self._pending_outputs = []
        return outputs

    @staticmethod
    def _append_verified(
        request: Request, s, token_ids: list[int], lps: list[float] | None
    ) -> tuple[list[int], list[float] | None, RequestStatus | None]:
        """Append a verification step's tokens (the accepted drafts, then one more) one by
        one; a stop drops the rest. Returns the tokens kept, their logprobs, the stop."""
        # The K/V of the fed known tokens and of the accepted drafts is now valid.
        computed = request.num_computed_tokens + s.num_tokens - s.num_draft_tokens
        computed += len(token_ids) - 1
        stop_status = None
        for i, token_id in enumerate(token_ids):
            request.append_output_token_id(token_id, None if lps is None else lps[i])
            stop_status = request.check_stop()
            if stop_status is not None:
                token_ids, lps = token_ids[: i + 1], None if lps is None else lps[: i + 1]
                break
        request.num_computed_tokens = min(computed, request.num_tokens)
        return token_ids, lps, stop_status

    def _drafts_within_bucket(self, picked: list[tuple[Request, int]]) -> list[tuple[Request, int]]:
        """Cut drafts to the padding of the token bucket the known tokens need (first
        requests keep theirs first); blocks allocated for the cut ones are used later."""
        known = [min(n, r.num_uncomputed_tokens) for r, n in picked]
        total = sum(known)
        if sum(n for _, n in picked) == total:
            return picked  # no drafts
        buckets = self.config.draft_token_buckets
        spare = next((b for b in buckets if b >= total), total) - total
        out = []
        for (request, n), k in zip(picked, known, strict=True):
            drafts = min(n - k, spare)
            spare -= drafts
            out.append((request, k + drafts))
        return out

    # ---- helpers for policies --------------------------------------------------------------

    def _release(self, request: Request) -> None:
        """Free the request's blocks and forget it."""
        self.kv_cache_manager.free(request)
        del self.requests[request.req_id]
        self._released_req_ids.append(request.req_id)

    def _admit(self, request: Request) -> None:
        """Move the head of the waiting queue (which already holds its blocks) to running."""
        assert self.waiting.peek() is request
        self.waiting.pop()
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def _admit_reserving(self, max_new: int, budget: int) -> list[Request]:
        """Admit waiting requests in queue order, each reserving blocks for prompt + max_tokens.

        At most `max_new` of them, their prompts (fed whole) within `budget` tokens together;
        stops at the first request that does not fit, so nobody overtakes it.
        """
        admitted: list[Request] = []
        while self.waiting and len(admitted) < max_new:
            request = self.waiting.peek()
            if request.num_prompt_tokens > budget:
                break
            if not self.kv_cache_manager.reserve(request, request.max_total_tokens):
                break
            self._admit(request)
            admitted.append(request)
            budget -= request.num_prompt_tokens
        return admitted

    def validate(self, request: Request) -> None:
        """Raise ValueError if `request` can never be served (changes nothing)."""
        config = self.config
        name = f"request {request.req_id!r}"
        if request.req_id in self.requests:
            raise ValueError(f"{name} is already in the scheduler")
        if request.status is not RequestStatus.WAITING or request.output_token_ids:
            raise ValueError(f"{name} has already been scheduled once ({request.status.name})")
        if not request.prompt_token_ids:
            raise ValueError(f"{name} has an empty prompt")
        total = request.max_total_tokens
        if total > config.max_model_len:
            raise ValueError(
                f"{name}: prompt ({request.num_prompt_tokens}) + max_tokens "
                f"({request.max_tokens}) = {total} tokens exceeds max_model_len "
                f"({config.max_model_len})"
            )
        if not self.kv_cache_manager.can_ever_fit(total):
            raise ValueError(
                f"{name}: prompt + max_tokens = {total} tokens needs "
                f"{self.kv_cache_manager.num_blocks_for(total)} KV blocks of {config.block_size} "
                f"tokens, more than the {config.num_blocks - 1} usable blocks of the cache "
                f"(num_blocks={config.num_blocks}, block 0 is reserved)"
            )
        if not self.chunked_prefill and request.num_prompt_tokens > config.max_num_batched_tokens:
            raise ValueError(
                f"{name}: prompt ({request.num_prompt_tokens} tokens) exceeds "
                f"max_num_batched_tokens ({config.max_num_batched_tokens}); policy "
                f"{config.policy!r} feeds a prompt whole"
            )
