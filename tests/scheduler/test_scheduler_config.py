"""SchedulerConfig validation and the factory."""

import pytest

from orca_jax.scheduler import (
    OrcaScheduler,
    PagedScheduler,
    SchedulerConfig,
    StaticScheduler,
    make_scheduler,
)


@pytest.mark.parametrize(
    ("policy", "cls"),
    [("orca", OrcaScheduler), ("paged", PagedScheduler), ("static", StaticScheduler)],
)
def test_factory_builds_each_policy(policy, cls):
    scheduler = make_scheduler(SchedulerConfig(policy=policy, num_blocks=8))
    assert type(scheduler) is cls
    assert scheduler.kv_cache_manager.num_free_blocks == 7
    assert not scheduler.has_unfinished_requests() and scheduler.num_inflight_batches == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"policy": "vllm"}, "policy must be"),
        ({"max_batch_size": 0}, "max_batch_size must be an int >= 1"),
        ({"num_blocks": 1}, "num_blocks must be an int >= 2"),
        ({"block_size": 0}, "block_size must be an int >= 1"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens must be an int >= 1"),
        ({"n_workers": 0}, "n_workers must be an int >= 1"),
        ({"max_model_len": 0}, "max_model_len must be an int >= 1"),
        ({"policy": "static", "n_workers": 2}, "n_workers must be 1 for policy 'static'"),
        ({"scheduling_order": "lifo"}, "scheduling_order must be"),
        ({"policy": "orca", "scheduling_order": "priority"}, "needs policy 'paged'"),
    ],
)
def test_invalid_configs_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**kwargs)


def test_orca_accepts_several_workers():
    assert SchedulerConfig(policy="orca", n_workers=3).n_workers == 3
