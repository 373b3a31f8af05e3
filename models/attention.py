"""A layer's attention step: write the new K/V into the pages and attend over them, with the
implementation chosen by the config (the jnp reference or the Pallas kernel)."""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from models.batch import RaggedBatch
from models.config import ModelConfig
from pallas_kernels.ragged_paged_attention import cache_codec, ragged_paged_attention_ref
from pallas_kernels.ragged_paged_attention import partition as kernel_plan
from pallas_kernels.ragged_paged_attention.checks import supports
from pallas_kernels.ragged_paged_attention.sharded import shard_over_heads

# What attention_impl="auto" runs on each backend: the faster one in
# experiments/bench_attention.py there (RESULTS.md). CPU: the reference (3.2 ms against 5.3 ms
# for the kernel in interpret mode, tiny-gpt decode step). GPU: the kernel (NVIDIA H200,
# 2026-11-29: gpt2 bf16 decode step 128 x 512 in 1.72 ms against 5.16 ms for the reference;
# attention alone 80 us against 794 us). "auto" falls back to the reference for geometries
# the kernel does not take (page size, head dim).
AUTO_ATTENTION = {"cpu": "reference", "gpu": "pallas"}

# The Pallas kernel's options on each backend (names in config.ATTENTION_OPTIONS), under
# `ModelConfig.attention_options`. GPU (NVIDIA H200, 2026-12-04, gpu_check.sh; RESULTS.md):
# the kernel writes the step's K/V (no scatters): gpt2 bf16 step 128 x 512 queued 1.280 ms
# against 1.327, waited for 1.929 against 2.111. Left off there: `one_launch` (1.433 ms;
# decode 74.4 us against 64.9) and extra kv splits (the planner's 1 split was the fastest).
KERNEL_OPTIONS: dict[str, dict[str, int | bool]] = {"gpu": {"fuse_kv_write": True}}


def resolve_attention_impl(config: ModelConfig, page_size: int) -> str:
    """The implementation a step runs: `config.attention_impl`, "auto" resolved."""
    if config.attention_impl != "auto":
        return config.attention_impl
    impl = AUTO_ATTENTION.get(jax.default_backend(), "reference")
    if impl == "pallas" and not supports(
        config.head_dim, page_size, config.dtype, config.cache_dtype
    ):
        return "reference"
    return impl


def kernel_options(config: ModelConfig) -> dict[str, int | bool]:
    """The Pallas kernel's options for this config: the backend's, then the config's."""
    return KERNEL_OPTIONS.get(jax.default_backend(), {}) | dict(config.attention_options)


def plan_attention(
    batch: RaggedBatch, config: ModelConfig, page_size: int
) -> tuple[jax.Array, ...] | None:
    """What every layer's attention call of one step shares, computed once before the layers:
    the kernel's tile tables (`partition.tile_tables`), or None for the reference."""
    if resolve_attention_impl(config, page_size) != "pallas":
        return None
    opts = kernel_options(config)
    return kernel_plan.tile_tables(
        batch.cu_q_lens,
        batch.kv_lens,
        batch.num_reqs,
        num_tokens=batch.input_ids.shape[0],
        num_heads=config.n_heads,
        num_kv_heads=config.n_kv_heads,
        # the tile-shaping options the calls get, else the kernel's own defaults
        **{k: opts[k] for k in kernel_plan.TILE_ARGS if k in opts},
    )


def write_kv(
    cache: jax.Array, layer: jax.Array, slots: jax.Array, new: jax.Array, cache_dtype: str
) -> jax.Array:
    """Scatter new K or V rows [T, K, H] into layer `layer` of cache [L, K, P, S, H]."""
    S = cache.shape[3]
    return cache.at[layer, :, slots // S, slots % S].set(cache_codec.encode(new, cache_dtype))


def write_and_attend(
    q: jax.Array,  # [T, N, H]
    k: jax.Array,  # [T, K, H] this step's keys
    v: jax.Array,  # [T, K, H]
    k_cache: jax.Array,  # [L, K, P, S, H] (fp8: u8 bits)
    v_cache: jax.Array,  # [L, K, P, S, H]
    layer: jax.Array,  # i32[]
    batch: RaggedBatch,
    config: ModelConfig,
    sm_scale: float,
    mesh: Mesh | None = None,
    plan: tuple[jax.Array, ...] | None = None,  # `plan_attention` of this step
) -> tuple[jax.Array, jax.Array, jax.Array]:  # out [T, N, H], k_cache, v_cache
    """Store the step's K/V at `batch.slot_mapping`, then each packed query token attends
    causally to its own request's pages.

    With the kernel's `fuse_kv_write` option the kernel does the store itself (no scatter
    kernels); otherwise two scatters precede the attention. With a mesh (its `model` axis
    splitting the heads), each device attends over its own heads and pages under `shard_map`
    (no communication; a Pallas call is never replicated).
    """
    impl = resolve_attention_impl(config, k_cache.shape[3])
    kw = dict(sm_scale=sm_scale)
    if config.kv_cache_dtype != "auto":  # the cache holds fp8 bits
        kw["cache_dtype"] = config.cache_dtype
    if config.sliding_window is not None:
        kw["sliding_window"] = config.sliding_window
    fuse = False
    if impl == "reference":
        fn = ragged_paged_attention_ref
    elif impl == "pallas":
        from pallas_kernels.ragged_paged_attention import kernel

        opts = kernel_options(config)
        fuse = opts.pop("fuse_kv_write", False)
        fn = kernel.ragged_paged_attention
        kw |= opts | dict(tiles=plan, new_kv=(k, v) if fuse else None)
    else:
        raise ValueError(f"unknown attention_impl {impl!r}")
    if not fuse:
        k_cache = write_kv(k_cache, layer, batch.slot_mapping, k, config.cache_dtype)
        v_cache = write_kv(v_cache, layer, batch.slot_mapping, v, config.cache_dtype)
    if mesh is not None:
        fn = shard_over_heads(fn, mesh)
    meta = (batch.kv_lens, batch.block_tables, batch.cu_q_lens, batch.num_reqs)
    out = fn(q, k_cache, v_cache, layer, *meta, **kw)
    return out if fuse else (out, k_cache, v_cache)
