"""Ragged paged attention behind one signature, implementation chosen by the config."""

from __future__ import annotations

import jax

from models.batch import RaggedBatch
from models.config import ModelConfig
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_ref


def paged_attention(
    q: jax.Array,  # [T, N, H]
    k_cache: jax.Array,  # [L, K, P, S, H], this step's K already written
    v_cache: jax.Array,  # [L, K, P, S, H]
    layer: jax.Array,  # i32[]
    batch: RaggedBatch,
    config: ModelConfig,
    sm_scale: float,
) -> jax.Array:  # [T, N, H]
    """Each packed query token attends causally to its own request's pages."""
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
    if config.attention_impl == "reference":
        return ragged_paged_attention_ref(*args, sm_scale=sm_scale)
    if config.attention_impl == "pallas":
        from pallas_kernels.ragged_paged_attention import kernel

        return kernel.ragged_paged_attention(*args, sm_scale=sm_scale)
    raise ValueError(f"unknown attention_impl {config.attention_impl!r}")
