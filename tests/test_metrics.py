"""Serving metrics on timings worked out by hand."""

import numpy as np
import pytest

from orca_jax.metrics import RequestTiming, percentile, summarize, throughput_at_latency


def test_figures_by_hand():
    a = RequestTiming(arrival=0.0, prompt_tokens=5, token_times=[1.0, 1.5, 2.0, 3.0])
    b = RequestTiming(arrival=1.0, prompt_tokens=3, token_times=[1.5])
    row = summarize([a, b], duration=4.0, slo_ttft=0.9, slo_tpot=1.0)
    assert row["requests"] == 2 and row["throughput_req_s"] == 0.5
    assert row["output_tok_s"] == 5 / 4
    # a: e2e 3 over 4 tokens = 0.75; b: 0.5 / 1 = 0.5
    assert row["normalized_latency_median"] == pytest.approx(0.625)
    assert row["ttft_median"] == pytest.approx(0.75)  # 1.0 and 0.5
    assert row["tpot_median"] == pytest.approx(2 / 3)  # only a has >1 token
    assert row["itl_median"] == pytest.approx(0.5)  # gaps 0.5, 0.5, 1.0
    assert row["e2e_p99"] == pytest.approx(0.5 + 2.5 * 0.99)
    assert row["goodput_req_s"] == 0.25  # a's TTFT 1.0 misses the 0.9 SLO


def test_percentile_matches_numpy():
    xs = list(np.random.default_rng(0).random(37))
    for q in (0, 13, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))


def test_throughput_at_latency_interpolates_to_the_slo():
    # (throughput, median normalized latency) over a rate sweep; saturates past 4 req/s.
    sweep = [(1.0, 0.05), (2.0, 0.06), (4.0, 0.10), (5.0, 0.30), (5.1, 0.90)]
    assert throughput_at_latency(sweep, 0.10) == 4.0
    # Between (4, 0.10) and (5, 0.30): a quarter of the way in latency, so in throughput.
    assert throughput_at_latency(sweep, 0.15) == pytest.approx(4.25)
    assert throughput_at_latency(sweep, 0.04) == 0.0
    assert throughput_at_latency(list(reversed(sweep)), 1.0) == 5.1
    with pytest.raises(ValueError, match="NaN"):
        throughput_at_latency([(1.0, float("nan"))], 0.1)
