"""The static policy: request-level batching, the paper's FasterTransformer baseline."""

from sched_utils import (
    FakeRunner,
    check_outputs,
    create_requests,
    create_scheduler,
    drive,
    expected_output,
    ids,
)


def test_batch_runs_until_its_longest_member_ends_and_nobody_joins():
    scheduler = create_scheduler("static", max_batch_size=3)
    (short,) = create_requests(1, max_tokens=2, prefix="s")
    (long,) = create_requests(1, max_tokens=6, prefix="l")
    (late,) = create_requests(1, max_tokens=1, prefix="x")
    trace = drive(scheduler, {0: [short, long], 1: [late]})
    batches = [ids(o) for o in trace.outputs]
    # short stops being fed after its 2 tokens; late waits for the whole batch to end.
    assert batches == [["s0", "l0"], ["s0", "l0"]] + [["l0"]] * 4 + [["x0"]]
    # Full prompts in the first iteration, whatever the token budget.
    assert [s.num_tokens for s in trace.outputs[0].scheduled] == [5, 5]
    # Each member gets one delta, with all its tokens, when the batch ends.
    assert [len(trace.deltas[r]) for r in ("s0", "l0", "x0")] == [1, 1, 1]
    assert trace.finish_step["s0"] == trace.finish_step["l0"] == 5
    check_outputs(trace, [short, long, late])


def test_finished_member_keeps_its_blocks_until_the_batch_ends():
    scheduler = create_scheduler("static")
    (short,) = create_requests(1, max_tokens=1)
    (long,) = create_requests(1, max_tokens=3, prefix="long")
    scheduler.add_request(short)
    scheduler.add_request(long)
    runner = FakeRunner(4)
    assert scheduler.update(runner.run(scheduler.schedule())) == []
    assert short.is_finished and scheduler.kv_cache_manager.get_block_ids("r0")
    assert scheduler.has_unfinished_requests()
    # Aborting a request that already finished is a no-op: its delta still comes.
    assert not scheduler.abort_request("r0")
    trace = drive(scheduler, {}, runner=runner)
    assert trace.tokens("r0") == expected_output(short)[0]
    assert trace.deltas["r0"][0].finished
    # Even the token sampled before drive() started is in the single final delta.
    assert trace.deltas["long0"][0].new_token_ids == expected_output(long)[0]


def test_admission_takes_fcfs_requests_whose_worst_case_fits():
    # 15 usable blocks; each request reserves prompt 5 + max_tokens 11 = 4 blocks: 3 fit.
    scheduler = create_scheduler("static", num_blocks=16, max_batch_size=8)
    requests = create_requests(5, max_tokens=11)
    trace = drive(scheduler, {0: requests})
    assert ids(trace.outputs[0]) == ["r0", "r1", "r2"]
    assert ids(trace.outputs[11]) == ["r3", "r4"]
    check_outputs(trace, requests)


def test_admission_stops_when_the_prompts_fill_the_token_ceiling():
    scheduler = create_scheduler("static", max_num_batched_tokens=12)
    requests = create_requests(3, num_prompt_tokens=5, max_tokens=2)
    trace = drive(scheduler, {0: requests})
    assert [ids(o) for o in trace.outputs] == [["r0", "r1"], ["r0", "r1"], ["r2"], ["r2"]]
    check_outputs(trace, requests)


def test_aborting_the_last_running_member_ends_the_batch():
    scheduler = create_scheduler("static")
    (short,) = create_requests(1, max_tokens=1)
    (long,) = create_requests(1, max_tokens=8, start=1)
    scheduler.add_request(short)
    scheduler.add_request(long)
    runner = FakeRunner(4)
    scheduler.update(runner.run(scheduler.schedule()))
    assert scheduler.abort_request("r1")
    # The batch is over; r0's final delta comes from the next update().
    output = scheduler.schedule()
    assert output.is_empty and set(output.finished_req_ids) == {"r0", "r1"}
    (delta,) = scheduler.update(runner.run(output))
    assert delta.req_id == "r0" and delta.finished and delta.finish_reason == "length"
    assert not scheduler.has_unfinished_requests()
    assert scheduler.kv_cache_manager.num_free_blocks == 63
