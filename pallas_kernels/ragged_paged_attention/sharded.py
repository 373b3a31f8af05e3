"""Ragged paged attention with heads split over a mesh axis (tensor parallelism).

Attention is independent per KV head, so with query heads and KV heads split the same way
over one mesh axis each device runs the unsharded kernel on its own heads: `q [T, N, H]`
split on N, the caches `[L, K, P, S, H]` split on K, the batch metadata replicated. No
communication happens inside attention; the output stays split on N, as the following
row-parallel output projection wants it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P


def shard_over_heads(attention_fn: Callable, mesh: Mesh, axis: str = "model") -> Callable:
    """Wrap an attention function of the kernel's signature to run per head shard.

    The number of KV heads must be divisible by the size of `axis` (so each shard keeps
    whole GQA groups: its query heads are exactly those that read its KV heads).
    """
    heads = P(None, axis, None)  # q / out [T, N, H]
    cache = P(None, axis, None, None, None)  # [L, K, P, S, H]
    rep = P()

    def wrapped(q, k_cache, v_cache, layer, kv_lens, block_tables, cu_q_lens, num_reqs, **kw):
        shards = mesh.shape[axis]
        if k_cache.shape[1] % shards:
            raise ValueError(
                f"{k_cache.shape[1]} KV heads cannot be split over {shards} '{axis}' shards"
            )
        fn = jax.shard_map(
            functools.partial(attention_fn, **kw),
            mesh=mesh,
            in_specs=(heads, cache, cache, rep, rep, rep, rep, rep),
            out_specs=heads,
            check_vma=False,
        )
        return fn(q, k_cache, v_cache, layer, kv_lens, block_tables, cu_q_lens, num_reqs)

    return wrapped
