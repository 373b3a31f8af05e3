"""Pipeline parallelism over the 8 fake CPU devices: stages give one device's logits/tokens."""

import jax
import numpy as np
import pytest
from parallel_utils import NUM_PAGES, PAGE, engine_matches_one_device, mixed_batches

from models import get_config, init_kv_cache, init_params, step
from orca_jax import EngineConfig
from orca_jax.runner import ModelRunner, RunnerConfig
from sharding import ParallelConfig, layer_ranges


def test_layer_ranges():
    assert layer_ranges(12, 5) == [(0, 3), (3, 6), (6, 8), (8, 10), (10, 12)]
    assert layer_ranges(2, 2) == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="must be in"):
        layer_ranges(2, 3)


@pytest.mark.parametrize(
    "name,pp,tp", [("tiny-gpt", 2, 1), ("tiny-llama", 2, 2), ("tiny-gpt", 2, 4)]
)
def test_stages_match_one_device(name, pp, tp):
    cfg = get_config(name, n_layers=3)  # uneven split: stages of 2 and 1 layers
    params = init_params(cfg, seed=11)
    batches = mixed_batches(cfg, np.random.default_rng(pp + tp))
    cache = init_kv_cache(cfg, NUM_PAGES, PAGE)
    want = []
    for b in batches:
        logits, cache = step(params, cache, b, cfg)
        want.append(np.asarray(logits)[: int(b.num_reqs)])

    runner_cfg = RunnerConfig(num_pages=NUM_PAGES, page_size=PAGE, max_model_len=128)
    runner = ModelRunner(cfg, params, runner_cfg, ParallelConfig(tp, pp))
    got = [np.asarray(runner.execute(b))[: int(b.num_reqs)] for b in batches]
    for g, w in zip(got, want, strict=True):
        assert np.abs(g - w).max() / np.abs(w).max() < 1e-5

    # Each stage holds only its layers' weights and pages, on its own devices.
    devices = [
        {d for s in st.kv_cache.k.addressable_shards for d in [s.device]} for st in runner.stages
    ]
    assert [st.kv_cache.k.shape[0] for st in runner.stages] == [2, 1]
    assert [st.params["layers"]["q"]["kernel"].shape[0] for st in runner.stages] == [2, 1]
    assert all(len(d) == tp for d in devices) and not devices[0] & devices[1]
    assert "lm_head" not in runner.stages[0].params and "final_norm" not in runner.stages[0].params
    with pytest.raises(AttributeError, match="one cache per stage"):
        _ = runner.kv_cache


def test_engine_with_batches_in_flight_over_stages():
    """Orca with n_workers=2 over 2 stages: one device's greedy tokens; warm, no compiles."""
    engine = engine_matches_one_device(
        get_config("tiny-gpt"),
        seed=12,
        parallel_kw=dict(pipeline_parallel_size=2, n_workers=2),
        policy="orca",
        max_num_batched_tokens=64,
    )
    assert len(engine.runner.stages) == 2


def test_bad_pipeline_is_a_clear_error():
    with pytest.raises(ValueError, match="pipeline_parallel=3 must be in"):
        EngineConfig(pipeline_parallel_size=3, num_kv_blocks=16).resolve(get_config("tiny-gpt"))
    with pytest.raises(ValueError, match="needs 16 devices"):
        cfg = get_config("tiny-gpt", n_layers=8)
        ModelRunner(
            cfg,
            init_params(cfg),
            RunnerConfig(num_pages=8, max_model_len=128),
            ParallelConfig(4, 4),
        )
    assert len(jax.devices()) == 8
