"""Behaviour shared by the three policies: admission checks, aborts, the batch protocol."""

import pytest
from sched_utils import FakeRunner, create_requests, create_scheduler, drive, expected_output

from orca_jax.scheduler import (
    ModelRunnerOutput,
    Request,
    RequestStatus,
    SamplingParams,
)

POLICIES = ["orca", "paged", "static"]


@pytest.fixture(params=POLICIES)
def policy(request):
    return request.param


def test_a_single_request_gets_its_expected_tokens(policy):
    scheduler = create_scheduler(policy)
    (request,) = create_requests(1, num_prompt_tokens=6, max_tokens=5)
    trace = drive(scheduler, {0: [request]})
    assert trace.tokens("r0") == expected_output(request)[0]
    assert trace.deltas["r0"][-1].finish_reason == "length"
    assert request.status is RequestStatus.FINISHED_LENGTH


def test_eos_finishes_with_stop(policy):
    (probe,) = create_requests(1, max_tokens=5)
    eos = expected_output(probe)[0][1]  # the second generated token
    (request,) = create_requests(1, max_tokens=5)
    request.eos_token_id = eos
    trace = drive(create_scheduler(policy), {0: [request]})
    tokens = trace.tokens("r0")
    assert tokens[-1] == eos and len(tokens) == expected_output(request)[0].index(eos) + 1
    assert trace.deltas["r0"][-1].finish_reason == "stop"


@pytest.mark.parametrize(
    ("make_request", "message"),
    [
        (lambda: Request("x", []), "empty prompt"),
        (
            lambda: Request("x", [1] * 200, SamplingParams(max_tokens=57)),
            r"prompt \(200\) \+ max_tokens \(57\) = 257 tokens exceeds max_model_len \(256\)",
        ),
        (
            lambda: Request("x", [1] * 200, SamplingParams(max_tokens=53)),
            "needs 64 KV blocks of 4 tokens, more than the 63 usable blocks",
        ),
    ],
)
def test_add_request_rejects_what_can_never_run(policy, make_request, message):
    scheduler = create_scheduler(policy)
    (other,) = create_requests(1)
    scheduler.add_request(other)
    with pytest.raises(ValueError, match=message):
        scheduler.add_request(make_request())
    # Nothing else disturbed: the earlier request still runs to its expected end.
    assert list(scheduler.requests) == ["r0"] and len(scheduler.waiting) == 1
    trace = drive(scheduler, {})
    assert trace.tokens("r0") == expected_output(other)[0]


def test_a_prompt_longer_than_the_token_ceiling_needs_chunked_prefill(policy):
    scheduler = create_scheduler(policy, max_num_batched_tokens=8)
    (request,) = create_requests(1, num_prompt_tokens=9, max_tokens=2)
    if policy == "paged":
        trace = drive(scheduler, {0: [request]})
        assert [o.num_scheduled_tokens for o in trace.outputs] == [8, 1, 1]
        return
    message = rf"prompt \(9 tokens\) exceeds max_num_batched_tokens \(8\); policy '{policy}'"
    with pytest.raises(ValueError, match=message):
        scheduler.add_request(request)
    assert not scheduler.requests


def test_duplicate_live_req_id_is_rejected_but_reuse_after_finish_is_fine(policy):
    scheduler = create_scheduler(policy)
    first, again = create_requests(1)[0], create_requests(1)[0]
    scheduler.add_request(first)
    with pytest.raises(ValueError, match="'r0' is already in the scheduler"):
        scheduler.add_request(again)
    drive(scheduler, {})
    scheduler.add_request(again)
    assert scheduler.has_unfinished_requests()


def test_a_request_object_cannot_be_added_twice(policy):
    scheduler = create_scheduler(policy)
    (request,) = create_requests(1, max_tokens=1)
    drive(scheduler, {0: [request]})
    with pytest.raises(ValueError, match="already been scheduled once"):
        scheduler.add_request(request)


def test_abort_waiting_request_frees_it_at_once(policy):
    scheduler = create_scheduler(policy)
    (request,) = create_requests(1)
    scheduler.add_request(request)
    assert scheduler.abort_request("r0")
    assert request.status is RequestStatus.FINISHED_ABORTED
    assert not scheduler.has_unfinished_requests()
    output = scheduler.schedule()
    assert output.is_empty and output.finished_req_ids == ["r0"]
    assert not scheduler.abort_request("r0") and not scheduler.abort_request("nope")


def test_abort_in_flight_request_frees_blocks_when_its_batch_returns(policy):
    scheduler = create_scheduler(policy)
    (request,) = create_requests(1, max_tokens=8)
    scheduler.add_request(request)
    runner = FakeRunner(scheduler.config.block_size)
    output = scheduler.schedule()
    assert output.scheduled[0].req_id == "r0"
    held = scheduler.kv_cache_manager.get_block_ids("r0")
    assert held
    assert scheduler.abort_request("r0")
    # The device may still write r0's K/V: its blocks stay taken until the batch returns.
    assert scheduler.kv_cache_manager.get_block_ids("r0") == held
    assert not scheduler.has_unfinished_requests()
    deltas = scheduler.update(runner.run(output))
    assert deltas == []  # the token sampled for it is dropped; the caller knows it aborted
    assert scheduler.kv_cache_manager.num_free_blocks == 63
    assert scheduler.schedule().finished_req_ids == ["r0"]


def test_finish_requests_for_a_stop_string(policy):
    scheduler = create_scheduler(policy)
    a, b = create_requests(2, max_tokens=6)
    scheduler.add_request(a)
    scheduler.add_request(b)
    runner = FakeRunner(scheduler.config.block_size)
    scheduler.update(runner.run(scheduler.schedule()))
    assert scheduler.finish_requests("r0", RequestStatus.FINISHED_STOPPED) == ["r0"]
    assert a.finish_reason == "stop"
    assert scheduler.finish_requests(["r0"], RequestStatus.FINISHED_STOPPED) == []
    with pytest.raises(ValueError, match="FINISHED_"):
        scheduler.finish_requests(["r1"], RequestStatus.RUNNING)
    trace = drive(scheduler, {}, runner=runner)
    assert "r0" not in trace.deltas
    assert trace.deltas["r1"][-1].finished


def test_update_rejects_unknown_batches_and_missing_tokens(policy):
    scheduler = create_scheduler(policy)
    scheduler.add_request(create_requests(1, max_tokens=1)[0])
    output = scheduler.schedule()
    with pytest.raises(ValueError, match="batch 7 is not in flight"):
        scheduler.update(ModelRunnerOutput(batch_id=7))
    with pytest.raises(ValueError, match="no sampled token for request 'r0'"):
        scheduler.update(ModelRunnerOutput(batch_id=output.batch_id))
    # The failed calls changed nothing: the batch can still be closed.
    assert scheduler.num_inflight_batches == 1
    deltas = scheduler.update(FakeRunner(4).run(output))
    assert [d.req_id for d in deltas] == ["r0"]
    with pytest.raises(ValueError, match="not in flight"):
        scheduler.update(FakeRunner(4).run(output))


def test_schedule_refuses_more_than_n_workers_open_batches(policy):
    scheduler = create_scheduler(policy)
    output = scheduler.schedule()
    assert output.is_empty and output.num_scheduled_tokens == 0
    with pytest.raises(RuntimeError, match="call update"):
        scheduler.schedule()
    assert scheduler.update(ModelRunnerOutput(batch_id=output.batch_id)) == []
    assert scheduler.schedule().batch_id == output.batch_id + 1


def test_logprobs_pass_through_to_deltas(policy):
    scheduler = create_scheduler(policy)
    scheduler.add_request(create_requests(1, max_tokens=2)[0])
    runner = FakeRunner(scheduler.config.block_size)
    collected = []
    while scheduler.has_unfinished_requests():
        result = runner.run(scheduler.schedule())
        result.logprobs = {r: -1.0 * token for r, token in result.sampled_token_ids.items()}
        collected += scheduler.update(result)
    tokens = [t for d in collected for t in d.new_token_ids]
    logprobs = [lp for d in collected for lp in d.logprobs]
    assert logprobs == [-1.0 * t for t in tokens] and len(tokens) == 2
