"""Test factories, a fake runner whose tokens can be worked out by hand, and a driver loop."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from orca_jax.scheduler import (
    NULL_BLOCK_ID,
    ModelRunnerOutput,
    Request,
    RequestDelta,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    make_scheduler,
)
from orca_jax.scheduler.kv_cache_manager import cdiv

VOCAB_SIZE = 50


def create_scheduler(policy: str = "orca", **overrides) -> Scheduler:
    """A scheduler with small defaults: 4 requests a batch, 64 blocks of 4 tokens."""
    kwargs = dict(
        policy=policy,
        max_batch_size=4,
        num_blocks=64,
        block_size=4,
        max_num_batched_tokens=64,
        max_model_len=256,
    )
    kwargs.update(overrides)
    return make_scheduler(SchedulerConfig(**kwargs))


def create_requests(
    num_requests: int,
    num_prompt_tokens: int = 5,
    max_tokens: int = 4,
    *,
    prefix: str = "r",
    start: int = 0,
    **params,
) -> list[Request]:
    """Requests `{prefix}{i}` with distinct prompts, arrival_time i, greedy by default."""
    return [
        Request(
            req_id=f"{prefix}{i}",
            prompt_token_ids=[(7 * i + j) % VOCAB_SIZE for j in range(num_prompt_tokens)],
            sampling_params=SamplingParams(max_tokens=max_tokens, **params),
            arrival_time=float(i),
        )
        for i in range(start, start + num_requests)
    ]


def ids(output: SchedulerOutput) -> list[str]:
    """The req_ids of a batch, in packing order."""
    return [s.req_id for s in output.scheduled]


def next_token(context: list[int]) -> int:
    """The fake model: a deterministic function of the whole context."""
    return (31 * sum(context) + 7 * len(context)) % VOCAB_SIZE


def expected_output(request: Request) -> tuple[list[int], str]:
    """What a correct scheduler must deliver for `request`: its tokens and finish reason."""
    params = request.sampling_params
    context = list(request.prompt_token_ids)
    tokens: list[int] = []
    while True:
        token = next_token(context)
        context.append(token)
        tokens.append(token)
        eos = not params.ignore_eos and token == request.eos_token_id
        if eos or token in params.stop_token_ids:
            return tokens, "stop"
        if len(tokens) == params.max_tokens:
            return tokens, "length"


class FakeRunner:
    """Keeps a fake KV cache of (req_id, position, token) per slot and checks every read.

    Each step reads the request's whole context back through its block table, so a block
    freed too early, shared, or a wrong start_pos fails loudly; the sampled token depends on
    that context only, so recomputation after preemption must give the same tokens.
    """

    def __init__(self, block_size: int, requests: dict[str, Request] | None = None) -> None:
        """With `requests` (the scheduler's, for prefix caching) a read is checked by content,
        position and token equal to the reader's own, so blocks another request computed
        pass; without, it must come from the reader's own writes."""
        self.block_size = block_size
        self.requests = requests
        self.cache: dict[int, tuple[str, int, int]] = {}
        self.num_steps = 0

    def _slot(self, block_ids: list[int], pos: int) -> int:
        return block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    def run(self, output: SchedulerOutput) -> ModelRunnerOutput:
        """Execute one batch at once; the result may be handed to update() later."""
        self.num_steps += 1
        sampled = {}
        for s in output.scheduled:
            assert s.token_ids, s
            assert NULL_BLOCK_ID not in s.block_ids, s
            assert len(s.block_ids) * self.block_size >= s.start_pos + s.num_tokens, s
            context = []
            for pos in range(s.start_pos):
                entry = self.cache.get(self._slot(s.block_ids, pos))
                if self.requests is None:
                    assert entry is not None and entry[:2] == (s.req_id, pos), (s, pos, entry)
                else:
                    want = (pos, self.requests[s.req_id].all_token_ids[pos])
                    assert entry is not None and entry[1:] == want, (s, pos, entry, want)
                context.append(entry[2])
            for offset, token in enumerate(s.token_ids):
                pos = s.start_pos + offset
                self.cache[self._slot(s.block_ids, pos)] = (s.req_id, pos, token)
                context.append(token)
            if s.sample and s.num_draft_tokens:  # a token after each known position...
                known = len(context) - s.num_draft_tokens
                tokens = [next_token(context[:n]) for n in range(known, len(context) + 1)]
                accepted = 1  # ... kept while it matches the draft fed after it
                while (
                    accepted <= s.num_draft_tokens
                    and tokens[accepted - 1] == context[known + accepted - 1]
                ):
                    accepted += 1
                sampled[s.req_id] = tokens[:accepted]
            elif s.sample:
                sampled[s.req_id] = next_token(context)
        return ModelRunnerOutput(batch_id=output.batch_id, sampled_token_ids=sampled)


def check_kv_invariants(scheduler: Scheduler) -> None:
    """No block shared, leaked or null; only known requests hold blocks, enough of them."""
    kv = scheduler.kv_cache_manager
    tables = kv.req_to_block_ids
    held = [b for block_ids in tables.values() for b in block_ids]
    holders = collections.Counter(held)
    if kv.enable_prefix_caching:  # shared blocks: each one counts its holders
        assert all(kv.block_pool.ref_count(b) == n for b, n in holders.items())
    else:
        assert len(held) == len(set(held)), "a block is in two tables"
    assert NULL_BLOCK_ID not in held
    assert len(holders) + kv.num_free_blocks == scheduler.config.num_blocks - 1, "leaked blocks"
    assert set(tables) <= set(scheduler.requests)
    for request in scheduler.running:
        assert len(tables.get(request.req_id, ())) >= cdiv(
            request.num_computed_tokens, kv.block_size
        )
    for request in scheduler.waiting:
        assert request.req_id not in tables


@dataclass
class Trace:
    """What a driven run produced."""

    deltas: dict[str, list[RequestDelta]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    # req_id -> step at which its finished delta arrived.
    finish_step: dict[str, int] = field(default_factory=dict)
    # Requests whose abort_request() returned True.
    aborted: set[str] = field(default_factory=set)
    outputs: list[SchedulerOutput] = field(default_factory=list)
    num_steps: int = 0

    def tokens(self, req_id: str) -> list[int]:
        return [t for d in self.deltas.get(req_id, ()) for t in d.new_token_ids]


def drive(
    scheduler: Scheduler,
    arrivals: dict[int, Iterable[Request]],
    aborts: dict[int, Iterable[str]] | None = None,
    inflight_aborts: dict[int, Iterable[str]] | None = None,
    on_schedule: Callable[[SchedulerOutput, list[SchedulerOutput]], None] | None = None,
    max_steps: int = 10_000,
    runner: FakeRunner | None = None,
    drafter: Callable[[Request], list[int]] | None = None,
) -> Trace:
    """Run the scheduler against a FakeRunner until everything has finished.

    At step i: add arrivals[i]; abort aborts[i]; schedule and run one batch; abort
    inflight_aborts[i] (while that batch is in flight); close the oldest batch once n_workers
    are in flight. So with n_workers > 1,
    every schedule() sees n_workers - 1 batches in flight. `on_schedule(output, in_flight)`
    sees every batch and the batches in flight when it was made. KV invariants are checked
    after every call. Pass the `runner` that ran earlier batches to continue a run.
    `drafter(request)` gives draft tokens (speculative decoding) to each decoding request
    after every update().
    """
    aborts = aborts or {}
    inflight_aborts = inflight_aborts or {}
    shared = scheduler.requests if scheduler.config.enable_prefix_caching else None
    runner = runner or FakeRunner(scheduler.config.block_size, shared)
    trace = Trace()
    in_flight: collections.deque[tuple[SchedulerOutput, ModelRunnerOutput]] = collections.deque()

    def close_oldest(step: int) -> None:
        _, result = in_flight.popleft()
        for delta in scheduler.update(result):
            previous = trace.deltas[delta.req_id]
            assert not previous or not previous[-1].finished, "delta after the finished one"
            previous.append(delta)
            if delta.finished:
                trace.finish_step[delta.req_id] = step
        check_kv_invariants(scheduler)
        if drafter is not None:
            for request in scheduler.running:
                if request.num_uncomputed_tokens == 1:
                    request.spec_token_ids = drafter(request)

    def abort(req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            if scheduler.abort_request(req_id):
                trace.aborted.add(req_id)
            check_kv_invariants(scheduler)

    last_event = max([*arrivals, *aborts, *inflight_aborts, 0])
    for step in range(max_steps):
        if step > last_event and not scheduler.has_unfinished_requests():
            break
        for request in arrivals.get(step, ()):
            scheduler.add_request(request)
        abort(aborts.get(step, ()))
        output = scheduler.schedule()
        check_kv_invariants(scheduler)
        if on_schedule is not None:
            on_schedule(output, [o for o, _ in in_flight])
        trace.outputs.append(output)
        in_flight.append((output, runner.run(output)))
        abort(inflight_aborts.get(step, ()))
        if len(in_flight) == scheduler.config.n_workers:
            close_oldest(step)
    else:
        raise AssertionError(f"not done after {max_steps} steps")
    while in_flight:
        close_oldest(step)
    trace.num_steps = step
    assert not scheduler.requests, scheduler.requests
    assert scheduler.num_inflight_batches == 0
    kv = scheduler.kv_cache_manager
    assert kv.num_free_blocks == scheduler.config.num_blocks - 1
    return trace


def check_outputs(trace: Trace, requests: Iterable[Request]) -> None:
    """Every request ended exactly once, with exactly its expected tokens (a prefix if aborted)."""
    for request in requests:
        deltas = trace.deltas.get(request.req_id, [])
        tokens = trace.tokens(request.req_id)
        expected, reason = expected_output(request)
        num_finished = sum(d.finished for d in deltas)
        aborted = request.req_id in trace.aborted
        assert num_finished + aborted == 1, (request.req_id, deltas, aborted)
        if aborted:
            assert tokens == expected[: len(tokens)] and len(tokens) < len(expected)
        else:
            assert tokens == expected, (request.req_id, tokens, expected)
            assert deltas[-1].finished and deltas[-1].finish_reason == reason
