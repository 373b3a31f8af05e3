"""Property-based tests: random arrivals, lengths, stops and aborts against the FakeRunner.

Each example drives one scheduler to completion and checks that every request ends exactly
once with exactly the tokens the fake model implies, that blocks are never shared or leaked
(after every call), and each policy's own promises.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sched_utils import VOCAB_SIZE, check_outputs, create_scheduler, drive

from orca_jax.scheduler import Request, SamplingParams, Scheduler
from orca_jax.scheduler.kv_cache_manager import cdiv

SETTINGS = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def workloads(draw, policy: str, max_cache_factor: int = 3, prefix_caching: bool = False):
    """(scheduler, arrivals by step, (aborts, in-flight aborts) by step, requests).

    With `prefix_caching`, prompts start with a cut of one of two shared prompts (then
    tokens of their own), so cached prefixes are found, shared and evicted."""
    block_size = draw(st.integers(1, 6))
    max_prompt = draw(st.integers(1, 16))
    max_output = draw(st.integers(1, 12))
    worst_blocks = cdiv(max_prompt + max_output, block_size)
    # From room for one worst-case request to room for a few: plenty of contention.
    num_blocks = draw(st.integers(worst_blocks + 1, max_cache_factor * worst_blocks + 1))
    config = dict(
        # A cache for one worst case needs two requests in a batch to preempt anything.
        max_batch_size=draw(st.integers(1 if max_cache_factor > 1 else 2, 5)),
        num_blocks=num_blocks,
        block_size=block_size,
        max_model_len=max_prompt + max_output,
    )
    if policy in ("orca", "paged"):
        config["n_workers"] = draw(st.integers(1, 3))
    # orca and static feed prompts whole: their ceiling must hold the longest one.
    min_budget = 1 if policy == "paged" else max_prompt
    config["max_num_batched_tokens"] = draw(st.integers(min_budget, min_budget + 24))
    if policy == "paged":
        config["scheduling_order"] = draw(st.sampled_from(["fcfs", "priority"]))
        config["enable_prefix_caching"] = prefix_caching
    scheduler = create_scheduler(policy, **config)
    token = st.integers(0, VOCAB_SIZE - 1)
    prompt = st.lists(token, min_size=1, max_size=max_prompt)
    if prefix_caching:
        fixed = st.lists(token, min_size=max_prompt, max_size=max_prompt)
        shared = draw(st.lists(fixed, min_size=2, max_size=2))
        prompt = st.tuples(
            st.sampled_from(shared), st.integers(0, max_prompt), st.lists(token, max_size=3)
        ).map(lambda t: (t[0][: t[1]] + t[2])[:max_prompt] or [0])

    specs = draw(
        st.lists(
            st.tuples(
                st.integers(0, 20),  # arrival step
                prompt,
                st.integers(1, max_output),  # max_tokens
                st.one_of(st.none(), st.integers(0, VOCAB_SIZE - 1)),  # eos
                st.lists(st.integers(0, VOCAB_SIZE - 1), max_size=2),  # stop ids
                st.booleans(),  # ignore_eos
                st.integers(0, 3),  # priority
                # Abort after this many steps (None: never), while a batch is in flight or not.
                st.one_of(st.none(), st.none(), st.none(), st.integers(0, 30)),
                st.booleans(),
            ),
            min_size=3,
            max_size=30,
        )
    )
    specs.sort(key=lambda spec: spec[0])
    arrivals: dict[int, list[Request]] = {}
    aborts: tuple[dict[int, list[str]], dict[int, list[str]]] = ({}, {})
    requests = []
    for i, spec in enumerate(specs):
        step, prompt, max_tokens, eos, stop_ids, ignore_eos, priority, delay, in_flight = spec
        params = SamplingParams(
            max_tokens=max_tokens, stop_token_ids=stop_ids, ignore_eos=ignore_eos
        )
        request = Request(f"q{i}", prompt, params, float(i), priority, eos_token_id=eos)
        requests.append(request)
        arrivals.setdefault(step, []).append(request)
        if delay is not None:
            aborts[in_flight].setdefault(step + delay, []).append(request.req_id)
    return scheduler, arrivals, aborts, requests


def ids(output) -> list[str]:
    return [s.req_id for s in output.scheduled]


def index(req_id: str) -> int:
    return int(req_id[1:])


def common_checks(scheduler: Scheduler, output, in_flight) -> None:
    assert len(output.scheduled) <= scheduler.config.max_batch_size
    assert len(set(ids(output))) == len(output.scheduled)
    busy = {req_id for batch in in_flight for req_id in ids(batch)}
    assert not busy & set(ids(output)), "a request in two batches in flight"
    assert output.num_scheduled_tokens == sum(s.num_tokens for s in output.scheduled)
    assert output.num_scheduled_tokens <= scheduler.config.max_num_batched_tokens


def check_fcfs_reservations(scheduler: Scheduler, output) -> None:
    """orca and static: FCFS admission with no skipping, worst case reserved, no preemption."""
    assert not output.preempted_req_ids
    admitted = [index(r.req_id) for r in scheduler.running]
    waiting = [index(r.req_id) for r in scheduler.waiting]
    assert not admitted or not waiting or max(admitted) < min(waiting)
    assert [index(i) for i in ids(output)] == sorted(index(i) for i in ids(output))
    kv = scheduler.kv_cache_manager
    for request in scheduler.running:
        assert len(kv.get_block_ids(request.req_id)) == kv.num_blocks_for(request.max_total_tokens)


@given(workloads("orca"))
@SETTINGS
def test_orca_properties(workload):
    scheduler, arrivals, aborts, requests = workload

    def check(output, in_flight):
        common_checks(scheduler, output, in_flight)
        check_fcfs_reservations(scheduler, output)
        # Whole prompts, then one token: every scheduled chunk ends with a sample.
        assert all(s.sample for s in output.scheduled)

    trace = drive(scheduler, arrivals, *aborts, on_schedule=check)
    check_outputs(trace, requests)
    assert all(r.num_preemptions == 0 for r in requests)


@given(st.one_of(workloads("paged"), workloads("paged", max_cache_factor=1)))
@SETTINGS
def test_paged_properties(workload):
    scheduler, arrivals, aborts, requests = workload

    def check(output, in_flight):
        common_checks(scheduler, output, in_flight)
        for req_id in output.preempted_req_ids:
            assert req_id not in ids(output)
            assert not scheduler.kv_cache_manager.get_block_ids(req_id)

    trace = drive(scheduler, arrivals, *aborts, on_schedule=check)
    check_outputs(trace, requests)


@given(
    st.one_of(
        workloads("paged", prefix_caching=True),
        workloads("paged", max_cache_factor=1, prefix_caching=True),
    )
)
@SETTINGS
def test_paged_prefix_caching_properties(workload):
    """Shared prefixes: the same tokens as computing everything (the fake runner checks each
    read against the reader's own tokens), blocks counted per holder, none leaked."""
    scheduler, arrivals, aborts, requests = workload
    trace = drive(
        scheduler, arrivals, *aborts, on_schedule=lambda o, f: common_checks(scheduler, o, f)
    )
    check_outputs(trace, requests)


@given(workloads("static"))
@SETTINGS
def test_static_properties(workload):
    scheduler, arrivals, aborts, requests = workload
    batch: set[str] = set()
    left: set[str] = set()  # members no longer fed

    def check(output, in_flight):
        nonlocal batch, left
        common_checks(scheduler, output, in_flight)
        check_fcfs_reservations(scheduler, output)
        fed = set(ids(output))
        if fed - batch:
            # A new batch may only start once every member of the old one is gone.
            assert not batch & set(scheduler.requests)
            batch, left = fed, set()
        assert fed <= batch and not fed & left, "a running static batch changed"
        left |= batch - fed

    trace = drive(scheduler, arrivals, *aborts, on_schedule=check)
    check_outputs(trace, requests)
    # One delta per request, carrying all its tokens.
    assert all(len(deltas) == 1 and deltas[0].finished for deltas in trace.deltas.values())
