"""Workloads (the paper's Poisson one, Azure traces) and their real-time replay on the engine."""

import numpy as np
import pytest

from models import get_config, init_params
from orca_jax import Engine, EngineConfig
from orca_jax.metrics import summarize
from orca_jax.replay import replay
from orca_jax.workload import azure_trace, poisson

CFG = get_config("tiny-gpt")
PARAMS = init_params(CFG, seed=4)


def test_poisson_workload_statistics():
    w = poisson(rate=50.0, num_requests=4000, seed=3)
    gaps = np.diff([0.0] + [x.arrival for x in w])
    assert np.mean(gaps) == pytest.approx(1 / 50, rel=0.05)
    assert np.std(gaps) == pytest.approx(1 / 50, rel=0.08)  # exponential: std = mean
    prompts, outputs = [x.prompt_len for x in w], [x.output_len for x in w]
    assert (min(prompts), max(prompts)) == (32, 512) and (min(outputs), max(outputs)) == (1, 128)
    assert np.mean(outputs) == pytest.approx(64.5, rel=0.05)


def test_azure_trace_is_clipped_and_rescaled(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.5000000,374,44\n"
        "2023-11-16 18:15:50.5000000,900,10\n"  # prompt too long for 512
        "2023-11-16 18:15:52.5000000,500,40\n"  # output clipped to 12
        "2023-11-16 18:16:00.5000000,20,0\n"  # no output: one token
    )
    items, stats = azure_trace(path, max_model_len=512, time_scale=2.0)
    assert [x.arrival for x in items] == [0.0, 2.0, 3.0, 7.0]
    assert [(x.prompt_len, x.output_len) for x in items] == [
        (374, 44),
        (511, 1),
        (500, 12),
        (20, 1),
    ]
    assert (stats.requests, stats.clipped_prompts, stats.clipped_outputs) == (4, 1, 2)
    assert len(azure_trace(path, max_model_len=512, limit=2)[0]) == 2


@pytest.mark.parametrize("policy", ["orca", "paged", "static"])
def test_replay_serves_every_request_its_length(policy):
    workload = poisson(rate=40.0, num_requests=12, prompt_len=(4, 40), output_len=(1, 12), seed=2)
    config = EngineConfig(policy=policy, max_batch_size=4, max_model_len=64, num_kv_blocks=64)
    timings, duration = replay(Engine(CFG, PARAMS, None, config), workload)
    assert [len(t.token_times) for t in timings] == [w.output_len for w in workload]
    for t, w in zip(timings, workload, strict=True):
        assert t.arrival == w.arrival and t.prompt_tokens == w.prompt_len
        assert w.arrival < t.token_times[0] and t.token_times == sorted(t.token_times)
        assert t.token_times[-1] <= duration
        if policy == "static":  # request-level batching answers when the whole batch ends
            assert len(set(t.token_times)) == 1
    row = summarize(timings, duration)
    assert row["requests"] == 12 and row["ttft_median"] <= row["e2e_p99"]
