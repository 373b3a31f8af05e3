"""The paged policy: blocks on demand, chunked prefill, preemption by recompute."""

from sched_utils import (
    FakeRunner,
    check_outputs,
    create_requests,
    create_scheduler,
    drive,
    expected_output,
    ids,
)

from orca_jax.scheduler import Request, RequestStatus, SamplingParams


def step(scheduler, runner):
    output = scheduler.schedule()
    return output, scheduler.update(runner.run(output))


def test_long_prompt_is_prefilled_in_chunks_within_the_budget():
    scheduler = create_scheduler("paged", max_num_batched_tokens=8)
    (request,) = create_requests(1, num_prompt_tokens=20, max_tokens=3)
    trace = drive(scheduler, {0: [request]})
    chunks = [(s.start_pos, s.num_tokens, s.sample) for o in trace.outputs for s in o.scheduled]
    assert chunks == [(0, 8, False), (8, 8, False), (16, 4, True), (20, 1, True), (21, 1, True)]
    # Blocks follow the tokens: 2, 4, then 5 blocks of 4 tokens.
    assert [len(o.scheduled[0].block_ids) for o in trace.outputs] == [2, 4, 5, 6, 6]
    assert [len(trace.deltas["r0"][i].new_token_ids) for i in range(3)] == [1, 1, 1]
    check_outputs(trace, [request])


def test_decodes_go_first_and_a_new_prompt_gets_the_rest_of_the_budget():
    scheduler = create_scheduler("paged", max_num_batched_tokens=8)
    (r0,) = create_requests(1, max_tokens=10)
    (r1,) = create_requests(1, num_prompt_tokens=20, max_tokens=2, start=1)
    trace = drive(scheduler, {0: [r0], 1: [r1]})
    step1 = [(s.req_id, s.num_tokens) for s in trace.outputs[1].scheduled]
    step2 = [(s.req_id, s.num_tokens) for s in trace.outputs[2].scheduled]
    assert step1 == [("r0", 1), ("r1", 7)]
    assert step2 == [("r0", 1), ("r1", 7)]
    assert all(o.num_scheduled_tokens <= 8 for o in trace.outputs)
    check_outputs(trace, [r0, r1])


def test_running_prefill_continues_before_new_requests():
    scheduler = create_scheduler("paged", max_num_batched_tokens=6)
    r0, r1 = create_requests(2, num_prompt_tokens=10, max_tokens=2)
    trace = drive(scheduler, {0: [r0, r1]})
    assert [(s.req_id, s.num_tokens) for s in trace.outputs[0].scheduled] == [("r0", 6)]
    assert [(s.req_id, s.num_tokens) for s in trace.outputs[1].scheduled] == [
        ("r0", 4),
        ("r1", 2),
    ]
    check_outputs(trace, [r0, r1])


def test_newest_request_is_preempted_and_recomputed_without_repeating_output():
    # 4 usable blocks of 4 tokens: r0 and r1 (6-token prompts) take 2 each; the first decode
    # needing a third block preempts the newest, r1.
    scheduler = create_scheduler("paged", num_blocks=5, max_model_len=16)
    r0, r1 = create_requests(2, num_prompt_tokens=6, max_tokens=6)
    runner = FakeRunner(4)
    for request in (r0, r1):
        scheduler.add_request(request)
    for _ in range(3):  # prefill, then decodes at positions 6 and 7
        output, _ = step(scheduler, runner)
        assert ids(output) == ["r0", "r1"] and not output.preempted_req_ids
    output, _ = step(scheduler, runner)
    assert output.preempted_req_ids == ["r1"] and ids(output) == ["r0"]
    assert r1.status is RequestStatus.PREEMPTED and r1.num_computed_tokens == 0
    assert r1.num_preemptions == 1 and r0.num_preemptions == 0
    assert scheduler.kv_cache_manager.get_block_ids("r1") == []
    assert scheduler.waiting.peek() is r1
    streamed = list(r1.output_token_ids)
    assert len(streamed) == 3
    trace = drive(scheduler, {}, runner=runner)
    # The recompute feeds prompt + the 3 streamed tokens, then samples the fourth token.
    recompute = next(s for o in trace.outputs for s in o.scheduled if s.req_id == "r1")
    assert recompute.token_ids == r1.prompt_token_ids + streamed and recompute.start_pos == 0
    assert streamed + trace.tokens("r1") == expected_output(r1)[0]
    assert len(trace.tokens("r1")) == 3 and trace.deltas["r1"][-1].finish_reason == "length"
    assert r0.output_token_ids == expected_output(r0)[0]


def test_a_victim_already_picked_this_iteration_is_taken_back():
    # Priority order, equal priorities: `late` arrived at t=5 but was admitted first; `early`
    # (t=0) is admitted next and prefills in chunks. Decodes go first, so `late` is picked
    # before `early` runs short of blocks; `late` is still the victim (newest arrival), so it
    # is taken out of the batch again and its budget refunded.
    scheduler = create_scheduler(
        "paged",
        num_blocks=5,
        max_num_batched_tokens=4,
        max_model_len=16,
        scheduling_order="priority",
    )
    late = Request("late", [1, 2], SamplingParams(max_tokens=6), arrival_time=5.0)
    early = Request("early", list(range(10)), SamplingParams(max_tokens=2), arrival_time=0.0)
    runner = FakeRunner(4)
    scheduler.add_request(late)
    step(scheduler, runner)
    scheduler.add_request(early)
    chunks = []
    for _ in range(2):
        output, _ = step(scheduler, runner)
        chunks.append([(s.req_id, s.num_tokens) for s in output.scheduled])
    assert chunks == [[("late", 1), ("early", 3)], [("late", 1), ("early", 3)]]
    output, _ = step(scheduler, runner)
    assert output.preempted_req_ids == ["late"]
    assert [(s.req_id, s.start_pos, s.num_tokens) for s in output.scheduled] == [("early", 6, 3)]
    assert late.status is RequestStatus.PREEMPTED
    assert scheduler.kv_cache_manager.get_block_ids("late") == []
    drive(scheduler, {}, runner=runner)
    assert late.output_token_ids == expected_output(late)[0]
    assert early.output_token_ids == expected_output(early)[0]


def test_no_admission_in_an_iteration_that_preempted():
    scheduler = create_scheduler("paged", num_blocks=5, max_model_len=16)
    r0, r1 = create_requests(2, num_prompt_tokens=6, max_tokens=6)
    (late,) = create_requests(1, num_prompt_tokens=1, max_tokens=1, start=2)

    def check(output, in_flight):
        if output.preempted_req_ids:
            assert all(s.start_pos > 0 for s in output.scheduled)

    trace = drive(scheduler, {0: [r0, r1], 2: [late]}, on_schedule=check)
    assert any(o.preempted_req_ids for o in trace.outputs)
    check_outputs(trace, [r0, r1, late])


def test_waiting_head_that_does_not_fit_blocks_the_queue():
    # 6 usable blocks: r0's prompt takes 3, r1's needs 4, r2's would fit in 1 but must wait.
    scheduler = create_scheduler("paged", num_blocks=7, max_model_len=24)
    (r0,) = create_requests(1, num_prompt_tokens=12, max_tokens=8)
    (r1,) = create_requests(1, num_prompt_tokens=16, max_tokens=2, start=1)
    (r2,) = create_requests(1, num_prompt_tokens=1, max_tokens=1, start=2)
    runner = FakeRunner(4)
    for request in (r0, r1, r2):
        scheduler.add_request(request)
    output, _ = step(scheduler, runner)
    assert ids(output) == ["r0"]
    assert [r.req_id for r in scheduler.waiting] == ["r1", "r2"]
    trace = drive(scheduler, {}, runner=runner)
    first_step = {}
    for i, o in enumerate(trace.outputs):
        for req_id in ids(o):
            first_step.setdefault(req_id, i)
    assert first_step["r1"] == first_step["r2"] > 0
    check_outputs(trace, [r1, r2])


def test_priority_order_admits_and_preempts_by_priority():
    scheduler = create_scheduler(
        "paged", num_blocks=5, max_model_len=16, scheduling_order="priority"
    )
    params = SamplingParams(max_tokens=6)
    low = Request("low", [1] * 6, params, arrival_time=0.0, priority=5)
    high = Request("high", [2] * 6, params, arrival_time=1.0, priority=0)
    mid = Request("mid", [3] * 6, params, arrival_time=2.0, priority=1)
    for request in (low, high, mid):
        scheduler.add_request(request)
    runner = FakeRunner(4)
    output, _ = step(scheduler, runner)
    assert ids(output) == ["high", "mid"]  # low waits although it arrived first
    trace = drive(scheduler, {}, runner=runner)
    preempted = [i for o in trace.outputs for i in o.preempted_req_ids]
    assert preempted and "high" not in preempted
    assert trace.finish_step["high"] <= trace.finish_step["mid"] < trace.finish_step["low"]
    check_outputs(trace, [low])
    assert high.output_token_ids == expected_output(high)[0]
    assert mid.output_token_ids == expected_output(mid)[0]


def test_batches_in_flight_wait_for_their_victim_instead_of_livelocking():
    """n_workers=3, room for one request: a request whose victim is in flight waits for it
    (nothing new is admitted meanwhile) instead of preempting itself; every request ends.

    Found by the property test: q1 (in flight) and q2 kept preempting each other forever
    when a request that needed room gave way to a newer one that was in flight."""
    scheduler = create_scheduler(
        "paged",
        block_size=1,
        num_blocks=5,
        max_num_batched_tokens=2,
        max_batch_size=1,
        n_workers=3,
        max_model_len=4,
    )
    params = SamplingParams(max_tokens=1)
    requests = [Request(f"q{i}", [0] * n, params, float(i)) for i, n in enumerate((1, 3, 3))]

    def check(output, in_flight):
        busy = {s.req_id for batch in in_flight for s in batch.scheduled}
        assert not busy & set(output.preempted_req_ids), "preempted a request in flight"

    trace = drive(scheduler, {0: requests}, on_schedule=check, max_steps=100)
    check_outputs(trace, requests)
    assert trace.num_steps < 30
