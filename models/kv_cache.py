"""The paged KV cache: fixed-size pages of K and V for every layer, owned by the runner.

Layout `[L, K, P, S, H]` (layers, KV heads, pages, page size, head dim): one page of one KV
head is a contiguous `S x H` tile, the unit attention kernels load, and sharding over KV heads
splits axis 1. Page 0 is the reserved null page that padding tokens write into.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from models.config import ModelConfig
from pallas_kernels.ragged_paged_attention.cache_codec import storage_dtype


@struct.dataclass
class KVCache:
    """K and V pages of all layers; passed to and returned from the step (donated)."""

    k: jax.Array  # [L, K, P, S, H]
    v: jax.Array  # [L, K, P, S, H]

    @property
    def num_pages(self) -> int:
        return self.k.shape[2]

    @property
    def page_size(self) -> int:
        return self.k.shape[3]


def init_kv_cache(config: ModelConfig, num_pages: int, page_size: int, *, sharding=None) -> KVCache:
    """Zeroed cache of `num_pages` pages (page 0 included) of `page_size` tokens."""
    if num_pages < 2:
        raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
    shape = (config.n_layers, config.n_kv_heads, num_pages, page_size, config.head_dim)
    zeros = lambda: jnp.zeros(shape, storage_dtype(config.cache_dtype), device=sharding)
    return KVCache(k=zeros(), v=zeros())


def num_pages_for_memory(config: ModelConfig, page_size: int, memory_bytes: int) -> int:
    """How many pages fit in `memory_bytes` of KV cache."""
    return memory_bytes // (page_size * config.kv_bytes_per_token())
