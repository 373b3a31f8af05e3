"""Pure-Python scheduling core: requests, KV block bookkeeping and the three policies.

Imports nothing outside the standard library; only integers leave it.
"""

from orca_jax.scheduler.block_pool import NULL_BLOCK_ID, BlockPool
from orca_jax.scheduler.config import SchedulerConfig
from orca_jax.scheduler.factory import make_scheduler
from orca_jax.scheduler.kv_cache_manager import KVCacheManager
from orca_jax.scheduler.orca_policy import OrcaScheduler
from orca_jax.scheduler.output import (
    ModelRunnerOutput,
    RequestDelta,
    ScheduledRequest,
    SchedulerOutput,
)
from orca_jax.scheduler.paged_policy import PagedScheduler
from orca_jax.scheduler.request import Request, RequestStatus
from orca_jax.scheduler.sampling_params import SamplingParams, StructuredOutputs
from orca_jax.scheduler.scheduler import Scheduler
from orca_jax.scheduler.static_policy import StaticScheduler

__all__ = [
    "NULL_BLOCK_ID",
    "BlockPool",
    "KVCacheManager",
    "ModelRunnerOutput",
    "OrcaScheduler",
    "PagedScheduler",
    "Request",
    "RequestDelta",
    "RequestStatus",
    "SamplingParams",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "StaticScheduler",
    "StructuredOutputs",
    "make_scheduler",
]
