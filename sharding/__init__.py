"""Device meshes, partition rules and pipeline stages (see docs/ARCHITECTURE.md)."""

from sharding.mesh import MODEL_AXIS, ParallelConfig, make_mesh, tensor_parallel_size
from sharding.pipeline import StagePlan, layer_ranges, plan_stages, stage_params
from sharding.rules import PARAM_RULES, cache_spec, check_tensor_parallel, param_specs
from sharding.shard import (
    init_sharded,
    kv_cache_sharding,
    param_shardings,
    replicated,
    shard_kv_cache,
    shard_params,
)

__all__ = [
    "MODEL_AXIS",
    "PARAM_RULES",
    "ParallelConfig",
    "StagePlan",
    "cache_spec",
    "init_sharded",
    "check_tensor_parallel",
    "kv_cache_sharding",
    "layer_ranges",
    "make_mesh",
    "param_shardings",
    "param_specs",
    "plan_stages",
    "replicated",
    "shard_kv_cache",
    "shard_params",
    "stage_params",
    "tensor_parallel_size",
]
