"""Ragged paged attention behind one signature, implementation chosen by the config."""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh

from models.batch import RaggedBatch
from models.config import ModelConfig
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_ref
from pallas_kernels.ragged_paged_attention.sharded import shard_over_heads

# What attention_impl="auto" runs on each backend: the faster one in
# experiments/bench_attention.py there (RESULTS.md). CPU: the reference (3.2 ms against 5.3 ms
# for the kernel in interpret mode, tiny-gpt decode step). GPU: the kernel (NVIDIA H200,
# 2026-11-29: gpt2 bf16 decode step 128 x 512 in 1.72 ms against 5.16 ms for the reference;
# attention alone 80 us against 794 us). "auto" falls back to the reference for geometries
# the kernel does not take (page size, head dim).
AUTO_ATTENTION = {"cpu": "reference", "gpu": "pallas"}


def resolve_attention_impl(config: ModelConfig, page_size: int) -> str:
    """The implementation a step runs: `config.attention_impl`, "auto" resolved."""
    if config.attention_impl != "auto":
        return config.attention_impl
    impl = AUTO_ATTENTION.get(jax.default_backend(), "reference")
    if impl == "pallas":
        from pallas_kernels.ragged_paged_attention import kernel

        if not kernel.supports(config.head_dim, page_size, config.dtype, config.cache_dtype):
            return "reference"
    return impl


def paged_attention(
    q: jax.Array,  # [T, N, H]
    k_cache: jax.Array,  # [L, K, P, S, H], this step's K already written (fp8: u8 bits)
    v_cache: jax.Array,  # [L, K, P, S, H]
    layer: jax.Array,  # i32[]
    batch: RaggedBatch,
    config: ModelConfig,
    sm_scale: float,
    mesh: Mesh | None = None,
) -> jax.Array:  # [T, N, H]
    """Each packed query token attends causally to its own request's pages.

    With a mesh (its `model` axis splitting the heads), each device attends over its own
    heads and pages under `shard_map` (no communication; a Pallas call is never replicated).
    """
    args = (
        q,
        k_cache,
        v_cache,
        layer,
        batch.kv_lens,
        batch.block_tables,
        batch.cu_q_lens,
        batch.num_reqs,
    )
    impl = resolve_attention_impl(config, k_cache.shape[3])
    if impl == "reference":
        fn = ragged_paged_attention_ref
    elif impl == "pallas":
        from pallas_kernels.ragged_paged_attention import kernel

        fn = kernel.ragged_paged_attention
    else:
        raise ValueError(f"unknown attention_impl {impl!r}")
    if config.kv_cache_dtype != "auto":  # the cache holds fp8 bits
        fn = functools.partial(fn, cache_dtype=config.cache_dtype)
    if config.sliding_window is not None:
        fn = functools.partial(fn, sliding_window=config.sliding_window)
    if mesh is not None:
        fn = shard_over_heads(fn, mesh)
    return fn(*args, sm_scale=sm_scale)
