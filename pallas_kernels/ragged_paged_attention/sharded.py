"""Ragged paged attention with heads split over a mesh axis (tensor parallelism).

Attention is independent per KV head, so with query heads and KV heads split the same way
over one mesh axis each device runs the unsharded kernel on its own heads: `q [T, N, H]`
split on N, the caches `[L, K, P, S, H]` and any new K/V `[T, K, H]` split on K, the batch
metadata (and the kernel's tile tables) replicated. No communication happens inside
attention; the output stays split on N, as the following row-parallel output projection
wants it, and the caches stay split on K.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P


def shard_over_heads(attention_fn: Callable, mesh: Mesh, axis: str = "model") -> Callable:
    """Wrap an attention function of the kernel's signature to run per head shard.

    The number of KV heads must be divisible by the size of `axis` (so each shard keeps
    whole GQA groups: its query heads are exactly those that read its KV heads). Array
    keywords `new_kv` (k, v) and `tiles` are passed through when not None; with `new_kv` the
    result is (out, k_cache, v_cache), as the kernel returns it.
    """
    heads = P(None, axis, None)  # q / out [T, N, H], new k / v [T, K, H]
    cache = P(None, axis, None, None, None)  # [L, K, P, S, H]
    rep = P()

    def wrapped(q, k_cache, v_cache, layer, kv_lens, block_tables, cu_q_lens, num_reqs, **kw):
        shards = mesh.shape[axis]
        if k_cache.shape[1] % shards:
            raise ValueError(
                f"{k_cache.shape[1]} KV heads cannot be split over {shards} '{axis}' shards"
            )
        new_kv, tiles = kw.pop("new_kv", None), kw.pop("tiles", None)
        arrays = {}  # array keywords travel as shard_map arguments, not closed over
        specs = {}
        if new_kv is not None:
            arrays["new_kv"], specs["new_kv"] = tuple(new_kv), (heads, heads)
        if tiles is not None:
            arrays["tiles"], specs["tiles"] = tuple(tiles), tuple(rep for _ in tiles)

        def local(args, arrays):
            return attention_fn(*args, **arrays, **kw)

        args = (q, k_cache, v_cache, layer, kv_lens, block_tables, cu_q_lens, num_reqs)
        fn = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=((heads, cache, cache, rep, rep, rep, rep, rep), specs),
            out_specs=(heads, cache, cache) if new_kv is not None else heads,
            check_vma=False,
        )
        return fn(args, arrays)

    return wrapped
