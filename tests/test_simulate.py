"""The scheduler on a virtual clock with a roofline cost model (no JAX, no model)."""

import pytest

from models import get_config
from orca_jax.metrics import summarize
from orca_jax.scheduler import SchedulerConfig
from orca_jax.simulate import A100_40GB, CostModel, simulate
from orca_jax.workload import WorkItem, poisson

GPT3_13B = get_config("gpt3-13b", dtype="bfloat16")


def _config(policy="orca", max_batch_size=8, n_workers=1, num_blocks=4096):
    return SchedulerConfig(
        policy=policy,
        max_batch_size=max_batch_size,
        num_blocks=num_blocks,
        block_size=16,
        max_num_batched_tokens=max_batch_size * 2048,
        n_workers=n_workers,
        max_model_len=2048,
    )


def test_one_request_takes_the_sum_of_its_steps():
    cost = CostModel(GPT3_13B, A100_40GB)
    [timing], end = simulate([WorkItem(0.5, 100, 4)], _config(), cost)
    want, t = [], 0.5
    for n, ctx in [(100, 100), (1, 101), (1, 102), (1, 103)]:  # prefill, then decodes
        t += cost.stage_time([(n, ctx)], last=True) + cost.overhead_s
        want.append(t)
    assert timing.token_times == pytest.approx(want)
    assert end == pytest.approx(want[-1])


def test_cost_model_is_memory_bound_for_decodes_and_compute_bound_for_prefill():
    cost = CostModel(GPT3_13B, A100_40GB)
    bandwidth = A100_40GB.hbm_bytes_per_s * cost.bandwidth_efficiency
    weights_s = cost.layer_params() * 2 * 40 / bandwidth
    decode = cost.stage_time([(1, 512)], last=False)
    assert decode == pytest.approx(weights_s, rel=0.03)  # one token: weights dominate (KV 2%)
    prefill = cost.stage_time([(2048, 2048)], last=False)
    flops_s = 2 * 2048 * cost.layer_params() * 40 / (A100_40GB.flops_per_s * cost.flops_efficiency)
    assert prefill == pytest.approx(flops_s, rel=0.05)  # 2048 tokens: matmul FLOPs dominate


def test_pipeline_stages_overlap_batches_in_flight():
    """Two stages, n_workers=2: stage 0 runs batch i+1 while stage 1 runs batch i."""
    cost = CostModel(get_config("gpt3-175b", dtype="bfloat16"), A100_40GB, tp=8, pp=2)
    work = [WorkItem(0.0, 64, 32) for _ in range(8)]
    _, one = simulate(work, _config(max_batch_size=4, n_workers=1), cost)
    _, two = simulate(work, _config(max_batch_size=4, n_workers=2), cost)
    assert two < 0.75 * one


def test_memory_planning():
    big = CostModel(get_config("gpt3-175b", dtype="bfloat16"), A100_40GB, tp=8, pp=2)
    assert 20_000 < big.kv_capacity_tokens() < 200_000
    with pytest.raises(ValueError, match="do not fit"):
        CostModel(get_config("gpt3-175b", dtype="bfloat16"), A100_40GB).kv_capacity_tokens()


def test_int8_weights_halve_the_weight_bytes():
    """Weight-only int8: a one-token decode (weights dominate) takes about half as long, and
    the freed memory holds more K/V."""
    cfg = get_config("gpt3-13b", dtype="bfloat16")
    bf16, int8 = CostModel(cfg, A100_40GB), CostModel(cfg.replace(quantization="int8"), A100_40GB)
    ratio = int8.stage_time([(1, 512)], last=False) / bf16.stage_time([(1, 512)], last=False)
    assert 0.5 < ratio < 0.53  # the K/V read stays in bf16
    layers = cfg.n_layers * bf16.layer_params()  # bytes freed: one per layer weight
    gained = (int8.kv_capacity_tokens() - bf16.kv_capacity_tokens()) * cfg.kv_bytes_per_token()
    assert gained == pytest.approx(layers, rel=0.01)


def test_fp8_kv_cache_doubles_capacity_and_halves_the_kv_read():
    cfg = get_config("gpt3-13b", dtype="bfloat16")
    bf16, fp8 = CostModel(cfg, A100_40GB), CostModel(cfg.replace(kv_cache_dtype="fp8"), A100_40GB)
    assert fp8.kv_capacity_tokens() == pytest.approx(2 * bf16.kv_capacity_tokens(), abs=1)
    # 64 decodes of context 2048, memory-bound: per layer 0.63 GB of bf16 weights and 2.68 GB
    # of bf16 K/V (1.34 GB in fp8), so (0.63 + 1.34) / (0.63 + 2.68) = 0.595 of the time.
    batch = [(1, 2048)] * 64
    ratio = fp8.stage_time(batch, last=False) / bf16.stage_time(batch, last=False)
    assert ratio == pytest.approx(0.595, abs=0.005)


def test_iteration_level_scheduling_beats_request_level_under_load():
    """The paper's claim, in simulation: at a rate the request-level baseline cannot keep
    up with, Orca's median normalized latency is far lower."""
    cost = CostModel(GPT3_13B, A100_40GB)
    blocks = cost.kv_capacity_tokens() // 16
    work = poisson(rate=4.0, num_requests=300, seed=0)
    rows = {}
    for policy in ("orca", "static"):
        timings, end = simulate(work, _config(policy, 8, num_blocks=blocks), cost)
        assert sorted(len(t.token_times) for t in timings) == sorted(w.output_len for w in work)
        rows[policy] = summarize(timings, end)
    orca, static = rows["orca"], rows["static"]
    assert orca["normalized_latency_median"] < 0.5 * static["normalized_latency_median"]
    assert orca["throughput_req_s"] > static["throughput_req_s"]


def test_static_batches_cost_what_fastertransformer_runs():
    """Prompts padded to the batch's longest; every member decodes until the batch ends."""
    cost = CostModel(GPT3_13B, A100_40GB)
    work = [WorkItem(0.0, 10, 1), WorkItem(0.0, 100, 4)]
    want, t = [], 0.0
    steps = [[(100, 100)] * 2] + [[(1, 100 + i)] * 2 for i in (1, 2, 3)]
    for shape in steps:
        t += cost.stage_time(shape, last=True) + cost.overhead_s
        want.append(t)
    timings, end = simulate(work, _config("static"), cost)
    # Both answer when the batch ends, as FasterTransformer's callers saw it.
    assert [len(t.token_times) for t in timings] == [1, 4]
    assert [x for t in timings for x in t.token_times] == pytest.approx([want[-1]] * 5)
    assert end == pytest.approx(want[-1])
    # Unpadded, the batch costs only its real tokens: a stronger baseline than the paper's.
    _, unpadded = simulate(work, _config("static"), cost, pad_static=False)
    real = [[(10, 10), (100, 100)]] + [[(1, 100 + i)] for i in (1, 2, 3)]
    assert unpadded == pytest.approx(
        sum(cost.stage_time(s, last=True) + cost.overhead_s for s in real)
    )
    assert unpadded < end
