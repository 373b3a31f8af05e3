"""Draft tokens through the scheduler: fed after the last token, accepted ones kept, KV exact.

The fake runner verifies drafts as the engine does (a token after each known position, kept
while it equals the draft fed after it); a drafter guesses each request's true continuation
with a wrong token somewhere. Every policy that speculates must still deliver exactly the
tokens of one-at-a-time decoding, in fewer iterations.
"""

import random

import pytest
from sched_utils import (
    FakeRunner,
    check_outputs,
    create_requests,
    create_scheduler,
    drive,
    next_token,
)

from orca_jax.scheduler import ModelRunnerOutput, Request, RequestStatus


def drafter(k: int, seed: int = 0):
    """Up to k drafts: the true next tokens, one of them (sometimes) wrong."""
    rng = random.Random(seed)

    def draft(request: Request) -> list[int]:
        context, out = list(request.all_token_ids), []
        for _ in range(rng.randint(0, k)):
            out.append(next_token(context))
            context.append(out[-1])
        if out and rng.random() < 0.5:
            out[rng.randrange(len(out))] += 1
        return out

    return draft


def decoding(policy: str, **params):
    """A scheduler with one request past its prefill (one token out), in decode."""
    scheduler = create_scheduler(policy)
    (request,) = create_requests(1, **params)
    scheduler.add_request(request)
    scheduler.update(FakeRunner(4).run(scheduler.schedule()))
    return scheduler, request


CASES = [
    ("orca", {}),
    ("orca", {"n_workers": 2}),
    ("orca", {"max_num_batched_tokens": 6}),  # the budget cuts drafts
    ("paged", {}),
    ("paged", {"n_workers": 2}),
    ("paged", {"num_blocks": 12, "max_num_batched_tokens": 8}),  # preemptions
    ("paged", {"enable_prefix_caching": True}),
    ("paged", {"draft_token_buckets": (8, 16, 64)}),  # drafts only fill padding
]


@pytest.mark.parametrize("policy,kw", CASES)
def test_drafts_change_no_token_and_save_iterations(policy, kw):
    def run(with_drafts: bool):
        scheduler = create_scheduler(policy, **kw)
        requests = create_requests(8, num_prompt_tokens=5, max_tokens=12)
        requests += create_requests(4, num_prompt_tokens=3, max_tokens=3, prefix="s")
        if kw.get("enable_prefix_caching"):  # shared prompts
            for r in requests:
                r.prompt_token_ids[:] = r.all_token_ids[:] = [1, 2, 3, 4, 5][: r.num_prompt_tokens]
        arrivals = {}
        for i, r in enumerate(requests):
            arrivals.setdefault(i // 3, []).append(r)
        trace = drive(scheduler, arrivals, drafter=drafter(4) if with_drafts else None)
        check_outputs(trace, requests)
        fed = [s.num_draft_tokens for o in trace.outputs for s in o.scheduled]
        return trace.num_steps, sum(fed)

    plain_steps, no_drafts = run(False)
    spec_steps, drafts = run(True)
    assert no_drafts == 0 and drafts > 0
    assert spec_steps < plain_steps


def test_a_stop_among_accepted_drafts_drops_the_tokens_after_it():
    truth = list(create_requests(1)[0].prompt_token_ids)
    for _ in range(5):  # the first output token o1, then the continuation t1 .. t4
        truth.append(next_token(truth))
    t1, t2, t3, t4 = truth[-4:]
    assert t1 != t2  # so the stop is reached at the second token
    scheduler = create_scheduler("orca")
    (request,) = create_requests(1, max_tokens=10, stop_token_ids=(t2,))
    scheduler.add_request(request)
    runner = FakeRunner(4)
    scheduler.update(runner.run(scheduler.schedule()))
    request.spec_token_ids = [t1, t2, t3]
    out = scheduler.schedule()
    (s,) = out.scheduled
    assert (s.num_tokens, s.num_draft_tokens, out.num_draft_tokens) == (4, 3, 3)
    assert request.spec_token_ids == []  # consumed
    result = runner.run(out)
    assert result.sampled_token_ids[request.req_id] == [t1, t2, t3, t4]  # all accepted
    (delta,) = scheduler.update(result)
    assert delta.new_token_ids == [t1, t2] and delta.finished
    assert delta.finish_reason == "stop"


def test_drafts_never_exceed_max_tokens():
    scheduler, request = decoding("orca", max_tokens=3)
    request.spec_token_ids = [1, 2, 3, 4, 5]
    (s,) = scheduler.schedule().scheduled
    assert s.num_draft_tokens == 1  # 1 output so far: one draft and one more token make 3


def test_paged_gives_up_drafts_before_preempting():
    scheduler = create_scheduler("paged", num_blocks=5)  # 4 usable blocks of 4 tokens
    a, b = create_requests(2, num_prompt_tokens=7, max_tokens=8)
    for r in (a, b):
        scheduler.add_request(r)
    runner = FakeRunner(4)
    scheduler.update(runner.run(scheduler.schedule()))  # 2 blocks each, 8 slots for 8 tokens
    a.spec_token_ids = [1, 2, 3]  # would need a third block
    out = scheduler.schedule()
    assert [(s.req_id, s.num_draft_tokens) for s in out.scheduled] == [("r0", 0), ("r1", 0)]
    assert not out.preempted_req_ids and a.status is RequestStatus.RUNNING


def test_a_wrong_number_of_tokens_is_refused_changing_nothing():
    scheduler, request = decoding("orca", max_tokens=10)
    request.spec_token_ids = [7, 8]
    out = scheduler.schedule()
    computed = request.num_computed_tokens
    with pytest.raises(ValueError, match="4 sampled tokens for 2 drafts"):
        scheduler.update(ModelRunnerOutput(out.batch_id, {request.req_id: [1, 2, 3, 4]}))
    assert request.num_computed_tokens == computed and scheduler.num_inflight_batches == 1
    (delta,) = scheduler.update(ModelRunnerOutput(out.batch_id, {request.req_id: [7, 9]}))
    assert delta.new_token_ids == [7, 9]
    assert request.num_computed_tokens == request.num_tokens - 1  # the 7 is kept, not the 8


def test_static_batching_feeds_no_drafts():
    scheduler, request = decoding("static", max_tokens=6)
    request.spec_token_ids = [1, 2]
    (s,) = scheduler.schedule().scheduled
    assert s.num_draft_tokens == 0 and s.num_tokens == 1


def test_drafts_fill_only_the_padding_of_the_bucket_known_tokens_need():
    scheduler = create_scheduler("orca", draft_token_buckets=(4, 8, 16))
    requests = create_requests(3, max_tokens=10)
    for r in requests:
        scheduler.add_request(r)
    runner = FakeRunner(4)
    scheduler.update(runner.run(scheduler.schedule()))
    for r in requests:
        r.spec_token_ids = [1, 2, 3]
    out = scheduler.schedule()  # 3 known tokens: bucket 4, so one draft, the first request's
    assert [s.num_draft_tokens for s in out.scheduled] == [1, 0, 0]
    assert out.num_scheduled_tokens == 4
    scheduler.update(runner.run(out))
