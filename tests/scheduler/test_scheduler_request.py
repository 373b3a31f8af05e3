"""Request: token bookkeeping and stop checks."""

import pytest

from orca_jax.scheduler import Request, RequestStatus, SamplingParams


def make(max_tokens=3, eos=None, **params):
    return Request(
        "a", [5, 6], SamplingParams(max_tokens=max_tokens, **params), 0.0, eos_token_id=eos
    )


def test_token_counts_follow_appended_outputs():
    request = make()
    assert request.num_prompt_tokens == 2 and request.num_tokens == 2
    assert request.num_uncomputed_tokens == 2 and request.max_total_tokens == 5
    request.append_output_token_id(9, logprob=-0.5)
    request.num_computed_tokens = 2
    assert request.all_token_ids == [5, 6, 9]
    assert request.output_token_ids == [9] and request.output_logprobs == [-0.5]
    assert request.num_tokens == 3 and request.num_uncomputed_tokens == 1
    # The prompt list given by the caller is copied, not aliased.
    assert request.prompt_token_ids == [5, 6]


def test_new_request_is_waiting_and_unfinished():
    request = make()
    assert request.status is RequestStatus.WAITING
    assert not request.is_finished and request.finish_reason is None
    assert request.check_stop() is None


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (RequestStatus.FINISHED_STOPPED, "stop"),
        (RequestStatus.FINISHED_LENGTH, "length"),
        (RequestStatus.FINISHED_ABORTED, "abort"),
        (RequestStatus.PREEMPTED, None),
        (RequestStatus.RUNNING, None),
    ],
)
def test_finish_reasons(status, reason):
    assert status.finish_reason == reason
    assert status.is_finished == (reason is not None)


def test_length_limit():
    request = make(max_tokens=2)
    request.append_output_token_id(1)
    assert request.check_stop() is None
    request.append_output_token_id(1)
    assert request.check_stop() is RequestStatus.FINISHED_LENGTH


def test_eos_stops_unless_ignored():
    request = make(eos=7)
    request.append_output_token_id(7)
    assert request.check_stop() is RequestStatus.FINISHED_STOPPED
    ignoring = make(eos=7, ignore_eos=True)
    ignoring.append_output_token_id(7)
    assert ignoring.check_stop() is None


def test_stop_token_id_stops_even_with_ignore_eos():
    request = make(stop_token_ids=[4], ignore_eos=True)
    request.append_output_token_id(4)
    assert request.check_stop() is RequestStatus.FINISHED_STOPPED


def test_stop_token_on_the_last_allowed_token_reports_stop():
    request = make(max_tokens=1, stop_token_ids=[4])
    request.append_output_token_id(4)
    assert request.check_stop() is RequestStatus.FINISHED_STOPPED
