"""Iteration-level scheduling's point: a short request need not wait for a long one."""

import pytest
from sched_utils import check_outputs, create_requests, create_scheduler, drive


@pytest.mark.parametrize(
    ("policy", "short_first"), [("orca", True), ("paged", True), ("static", False)]
)
def test_short_request_arriving_after_a_long_one(policy, short_first):
    scheduler = create_scheduler(policy)
    (long,) = create_requests(1, num_prompt_tokens=8, max_tokens=40, prefix="long")
    (short,) = create_requests(1, num_prompt_tokens=4, max_tokens=2, prefix="short")
    trace = drive(scheduler, {0: [long], 2: [short]})
    finished_first = trace.finish_step["short0"] < trace.finish_step["long0"]
    assert finished_first == short_first
    if short_first:
        # It joins at once and is done two iterations after it arrived.
        assert trace.finish_step["short0"] == 3
    else:
        # Under request-level batching it waits for the whole 40-iteration batch.
        assert trace.finish_step["short0"] == trace.finish_step["long0"] + 2
    check_outputs(trace, [long, short])
