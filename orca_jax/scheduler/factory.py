"""Build the scheduler a config asks for."""

from __future__ import annotations

from orca_jax.scheduler.config import SchedulerConfig
from orca_jax.scheduler.orca_policy import OrcaScheduler
from orca_jax.scheduler.paged_policy import PagedScheduler
from orca_jax.scheduler.scheduler import Scheduler
from orca_jax.scheduler.static_policy import StaticScheduler

_POLICIES: dict[str, type[Scheduler]] = {
    "orca": OrcaScheduler,
    "paged": PagedScheduler,
    "static": StaticScheduler,
}


def make_scheduler(config: SchedulerConfig) -> Scheduler:
    """The scheduler of `config.policy`."""
    return _POLICIES[config.policy](config)
