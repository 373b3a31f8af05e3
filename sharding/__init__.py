"""Device meshes and partition rules for tensor parallelism (see docs/ARCHITECTURE.md)."""

from sharding.mesh import MODEL_AXIS, make_mesh, tensor_parallel_size
from sharding.rules import PARAM_RULES, cache_spec, check_tensor_parallel, param_specs
from sharding.shard import kv_cache_sharding, replicated, shard_kv_cache, shard_params

__all__ = [
    "MODEL_AXIS",
    "PARAM_RULES",
    "cache_spec",
    "check_tensor_parallel",
    "kv_cache_sharding",
    "make_mesh",
    "param_specs",
    "replicated",
    "shard_kv_cache",
    "shard_params",
    "tensor_parallel_size",
]
