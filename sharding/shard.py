"""Placing params and the KV cache on a mesh by the rules."""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models.config import ModelConfig
from models.kv_cache import KVCache
from models.layers import Params
from sharding.mesh import tensor_parallel_size
from sharding.rules import cache_spec, param_specs


def param_shardings(params, config: ModelConfig, mesh: Mesh):
    """Where each leaf of `params` (arrays or `jax.ShapeDtypeStruct`s) goes on `mesh`."""
    specs = param_specs(params, config, tensor_parallel_size(mesh))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def shard_params(params, config: ModelConfig, mesh: Mesh):
    """`params` laid out on `mesh` by `PARAM_RULES` (each device holds only its slices).

    From host (numpy) arrays each device receives only its slices; arrays already on one
    device are sliced from there."""
    return jax.device_put(params, param_shardings(params, config, mesh))


def init_sharded(make: Callable[[], Params], config: ModelConfig, mesh: Mesh) -> Params:
    """The params `make()` builds (e.g. random init), computed straight into their shards:
    `make` runs under `jax.jit` with the rules' output shardings, so each device computes
    its own slices and no device ever holds the whole tree."""
    shardings = param_shardings(jax.eval_shape(make), config, mesh)
    return jax.jit(make, out_shardings=shardings)()


def kv_cache_sharding(mesh: Mesh) -> NamedSharding:
    """Pages split by KV head; pass to `init_kv_cache(..., sharding=)` to allocate in place."""
    return NamedSharding(mesh, cache_spec())


def shard_kv_cache(cache: KVCache, mesh: Mesh) -> KVCache:
    """An existing cache moved onto the mesh, split by KV head."""
    sharding = kv_cache_sharding(mesh)
    return KVCache(k=jax.device_put(cache.k, sharding), v=jax.device_put(cache.v, sharding))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (the batch metadata, sampling inputs)."""
    return NamedSharding(mesh, P())
