"""The orca policy: Algorithm 1 of the paper."""

import pytest
from sched_utils import (
    FakeRunner,
    check_outputs,
    create_requests,
    create_scheduler,
    drive,
    ids,
)

from orca_jax.scheduler import ModelRunnerOutput


def test_whole_prompt_in_one_iteration_then_one_token_each():
    # A prompt is never chunked: 30 tokens in one batch.
    scheduler = create_scheduler("orca", max_num_batched_tokens=30)
    (request,) = create_requests(1, num_prompt_tokens=30, max_tokens=3)
    trace = drive(scheduler, {0: [request]})
    sizes = [[(s.start_pos, s.num_tokens, s.sample) for s in o.scheduled] for o in trace.outputs]
    assert sizes == [[(0, 30, True)], [(30, 1, True)], [(31, 1, True)]]
    # Blocks for prompt + max_tokens were reserved at admission and never grew.
    assert {len(o.scheduled[0].block_ids) for o in trace.outputs} == {33 // 4 + 1}
    check_outputs(trace, [request])


def test_new_request_joins_the_running_batch_at_the_next_iteration():
    scheduler = create_scheduler("orca")
    r0, r1 = create_requests(2, max_tokens=6)
    trace = drive(scheduler, {0: [r0], 2: [r1]})
    step2 = trace.outputs[2].scheduled
    # Selective batching: r0's decode token and r1's whole prompt share one batch, oldest first.
    assert [(s.req_id, s.num_tokens) for s in step2] == [("r0", 1), ("r1", 5)]
    assert trace.finish_step["r0"] < trace.finish_step["r1"]
    check_outputs(trace, [r0, r1])


def test_admission_stops_at_the_first_request_that_does_not_fit():
    # 15 usable blocks of 4 tokens. r0 reserves 8 blocks; big r1 needs 8 more and does not
    # fit; small r2 would fit but must not overtake r1.
    scheduler = create_scheduler("orca", num_blocks=16, max_model_len=64)
    (r0,) = create_requests(1, num_prompt_tokens=20, max_tokens=12)
    (r1,) = create_requests(1, num_prompt_tokens=20, max_tokens=12, start=1)
    (r2,) = create_requests(1, num_prompt_tokens=2, max_tokens=2, start=2)
    for request in (r0, r1, r2):
        scheduler.add_request(request)
    runner = FakeRunner(4)
    first = scheduler.schedule()
    assert ids(first) == ["r0"] and scheduler.kv_cache_manager.num_free_blocks == 7
    scheduler.update(runner.run(first))
    second = scheduler.schedule()
    assert ids(second) == ["r0"]
    assert [r.req_id for r in scheduler.waiting] == ["r1", "r2"]
    scheduler.update(runner.run(second))
    trace = drive(scheduler, {}, runner=runner)
    # r1 and r2 enter together in the iteration after r0 releases its reservation.
    joined = next(o for o in trace.outputs if "r1" in ids(o))
    assert ids(joined) == ["r1", "r2"]
    assert trace.outputs.index(joined) == trace.finish_step["r0"] + 1
    assert all(r.num_preemptions == 0 for r in (r0, r1, r2))
    check_outputs(trace, [r1, r2])


def test_batch_stops_at_the_first_prompt_past_the_token_ceiling():
    scheduler = create_scheduler("orca", max_num_batched_tokens=12)
    (a,) = create_requests(1, num_prompt_tokens=6)
    (b,) = create_requests(1, num_prompt_tokens=8, start=1)
    (c,) = create_requests(1, num_prompt_tokens=2, start=2)
    trace = drive(scheduler, {0: [a, b, c]})
    # b does not fit beside a's 6 tokens, and c (which would) does not overtake it.
    assert ids(trace.outputs[0]) == ["r0"]
    assert [(s.req_id, s.num_tokens) for s in trace.outputs[1].scheduled] == [
        ("r0", 1),
        ("r1", 8),
        ("r2", 2),
    ]
    assert all(o.num_scheduled_tokens <= 12 for o in trace.outputs)
    check_outputs(trace, [a, b, c])


def test_at_most_max_batch_size_and_a_free_seat_is_refilled_at_once():
    scheduler = create_scheduler("orca", max_batch_size=2)
    r0, r1, r2 = create_requests(3, max_tokens=5)
    r0_short = create_requests(1, max_tokens=2, prefix="s")[0]
    trace = drive(scheduler, {0: [r0_short, r0, r1, r2]})
    assert max(len(o.scheduled) for o in trace.outputs) == 2
    # s0 finishes after 2 iterations; r1 takes its seat in the very next batch.
    assert ids(trace.outputs[0]) == ["s0", "r0"] and ids(trace.outputs[2]) == ["r0", "r1"]
    check_outputs(trace, [r0_short, r0, r1, r2])


def test_pipelined_batches_never_share_a_request():
    scheduler = create_scheduler("orca", max_batch_size=2, n_workers=2)
    for request in create_requests(4, max_tokens=3):
        scheduler.add_request(request)
    runner = FakeRunner(4)
    b0 = scheduler.schedule()
    b1 = scheduler.schedule()
    assert ids(b0) == ["r0", "r1"] and ids(b1) == ["r2", "r3"]
    assert scheduler.num_inflight_batches == 2
    with pytest.raises(RuntimeError, match="n_workers=2"):
        scheduler.schedule()
    out0, out1 = runner.run(b0), runner.run(b1)
    assert [d.req_id for d in scheduler.update(out0)] == ["r0", "r1"]
    # r0 and r1 are back; r2 and r3 are still in flight and are skipped.
    b2 = scheduler.schedule()
    assert ids(b2) == ["r0", "r1"] and b2.batch_id == 2
    out2 = runner.run(b2)
    scheduler.update(out1)
    assert ids(scheduler.schedule()) == ["r2", "r3"]
    scheduler.update(out2)
    # r0 and r1 are back and r2, r3 in flight again: the two pairs alternate between workers.
    assert ids(scheduler.schedule()) == ["r0", "r1"]


def test_a_free_worker_with_every_request_in_flight_gets_an_empty_batch():
    scheduler = create_scheduler("orca", n_workers=2)
    scheduler.add_request(create_requests(1)[0])
    b0 = scheduler.schedule()
    b1 = scheduler.schedule()
    assert ids(b0) == ["r0"] and b1.is_empty
    assert scheduler.update(ModelRunnerOutput(batch_id=b1.batch_id)) == []
    assert scheduler.num_inflight_batches == 1


@pytest.mark.parametrize("n_workers", [1, 2, 3])
def test_a_full_cache_makes_requests_wait_instead_of_preempting(n_workers):
    # Room for two reservations at a time, six requests.
    scheduler = create_scheduler("orca", num_blocks=7, n_workers=n_workers)
    requests = create_requests(6, num_prompt_tokens=6, max_tokens=6)

    def check(output, in_flight):
        assert not output.preempted_req_ids
        assert len(scheduler.kv_cache_manager.req_to_block_ids) <= 2

    trace = drive(scheduler, {0: requests}, on_schedule=check)
    assert all(r.num_preemptions == 0 for r in requests)
    assert sorted(trace.finish_step, key=trace.finish_step.get) == [r.req_id for r in requests]
    check_outputs(trace, requests)
