"""Pipeline parallelism over the 8 fake CPU devices: stages give one device's logits/tokens."""

import functools

import jax
import numpy as np
import pytest
from parallel_utils import NUM_PAGES, PAGE, engine_matches_one_device, mixed_batches

from models import RandomWeights, get_config, init_kv_cache, init_params, step
from orca_jax import EngineConfig
from orca_jax.runner import ModelRunner, RunnerConfig
from sharding import (
    ParallelConfig,
    layer_ranges,
    make_mesh,
    param_shardings,
    param_specs,
    plan_stages,
    stage_params,
)


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


def test_random_weights_are_drawn_where_they_live():
    """`RandomWeights`: each stage's params are `init_params`' values (to the last bit of
    rounding), drawn straight into the devices' slices; no device computes the whole tree."""
    cfg = get_config("tiny-gpt", n_layers=3)
    full = init_params(cfg, seed=7)
    runner_cfg = RunnerConfig(num_pages=NUM_PAGES, page_size=PAGE, max_model_len=128)
    runner = ModelRunner(cfg, RandomWeights(7), runner_cfg, ParallelConfig(4, 2))
    for plan, st in zip(plan_stages(cfg, 2, 4), runner.stages, strict=True):
        want = stage_params(full, plan, cfg)
        specs = param_specs(want, cfg, 4)
        assert jax.tree.structure(st.params) == jax.tree.structure(want)
        for got, w, spec in zip(
            jax.tree.leaves(st.params), jax.tree.leaves(want), jax.tree.leaves(specs), strict=True
        ):
            # Same draws; jit fuses the scaling differently from eager ops: 1-ulp changes.
            np.testing.assert_allclose(np.asarray(got), np.asarray(w), rtol=3e-7, atol=0)
            assert got.sharding.spec == spec and got.sharding.mesh.devices.size == 4
    # Per device, drawing the split tree takes under half the memory of drawing it whole.
    make = functools.partial(init_params, cfg, 7)
    shardings = param_shardings(jax.eval_shape(make), cfg, make_mesh(4))

    def peak(**kw):
        m = jax.jit(make, **kw).lower().compile().memory_analysis()
        return m.output_size_in_bytes + m.temp_size_in_bytes

    assert peak(out_shardings=shardings) < 0.5 * peak()


def test_pipeline_across_processes_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    cfg = get_config("tiny-gpt")
    runner_cfg = RunnerConfig(num_pages=NUM_PAGES, page_size=PAGE, max_model_len=128)
    with pytest.raises(ValueError, match="pipeline parallelism over several processes"):
        ModelRunner(cfg, RandomWeights(0), runner_cfg, ParallelConfig(1, 2))
