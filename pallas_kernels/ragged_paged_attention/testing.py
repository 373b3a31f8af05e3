"""Random ragged batches for the kernel's tests and benchmark (numpy on the host).

Legend: T tokens, R request rows, N heads, K kv heads, H head dim, L layers, P pages,
S page size, MB pages per request row.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ragged_paged_attention import cache_codec


@dataclasses.dataclass
class Batch:
    """Arguments of `ragged_paged_attention` (numpy), in its order, plus what made them."""

    q: np.ndarray  # [T, N, H]
    k_cache: np.ndarray | jax.Array  # [L, K, P, S, H]
    v_cache: np.ndarray | jax.Array  # [L, K, P, S, H]
    layer: np.ndarray  # i32[]
    kv_lens: np.ndarray  # i32[R]
    block_tables: np.ndarray  # i32[R, MB]
    cu_q_lens: np.ndarray  # i32[R+1]
    num_reqs: np.ndarray  # i32[]
    cache_dtype: np.dtype | None = None  # the values' type when the caches hold fp8 bits

    def args(self) -> tuple[np.ndarray, ...]:
        return (
            self.q,
            self.k_cache,
            self.v_cache,
            self.layer,
            self.kv_lens,
            self.block_tables,
            self.cu_q_lens,
            self.num_reqs,
        )

    @property
    def num_real_tokens(self) -> int:
        return int(self.cu_q_lens[int(self.num_reqs)])

    def kv_bytes(self) -> int:
        """K+V bytes the attention must read: each request's context once, per kv head."""
        _, K, _, _, H = self.k_cache.shape
        ctx = int(self.kv_lens[: int(self.num_reqs)].sum())
        return 2 * ctx * K * H * self.k_cache.dtype.itemsize

    def context_mask(self) -> np.ndarray:
        """bool[L, P, S]: cache slots inside some request's context, at the batch's layer."""
        L, _, P, S, _ = self.k_cache.shape
        mask = np.zeros((L, P, S), bool)
        for r in range(int(self.num_reqs)):
            n = int(self.kv_lens[r])
            pages = self.block_tables[r, : -(-n // S)]
            mask[int(self.layer), pages] = True
            if n % S:
                mask[int(self.layer), pages[-1], n % S :] = False
        return mask

    def poisoned(self) -> Batch:
        """A copy whose cache is NaN everywhere outside the contexts (other layers too)."""
        outside = ~self.context_mask()[:, None, :, :, None]  # [L, 1, P, S, 1]
        dtype = self.cache_dtype or self.k_cache.dtype  # the values' type (fp8 bits decoded)

        def poison(cache):
            values = cache_codec.decode(jnp.asarray(cache), self.cache_dtype, dtype)
            return cache_codec.encode(jnp.where(outside, jnp.nan, values), dtype)

        return dataclasses.replace(self, k_cache=poison(self.k_cache), v_cache=poison(self.v_cache))


def random_batch(
    rng: np.random.Generator,
    *,
    q_lens: list[int],
    kv_lens: list[int],
    num_tokens: int,
    num_rows: int,
    max_blocks: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype,
    num_layers: int = 2,
    num_pages: int | None = None,
    device_cache: bool = False,
    cache_dtype=None,
) -> Batch:
    """A batch of `len(q_lens)` real requests padded to `num_rows` rows and `num_tokens` tokens.

    Pages are distinct, shuffled ids >= 1 (page 0 is the null page) out of `num_pages`
    (default: just enough, plus a few spare); unused block-table entries are 0; padding
    tokens' q rows are NaN (their output must still be exactly 0). Fixing the bucket sizes
    (`num_tokens`, `num_rows`, `max_blocks`, `num_pages`) keeps the shapes, and so the
    compiled kernel, the same across batches. `device_cache` draws the caches with
    `jax.random` on the default device (fast for big benchmark caches). `cache_dtype`: an
    fp8 type for caches of fp8 bits (`cache_codec`), as `kv_cache_dtype="fp8"` keeps them.
    """
    n = len(q_lens)
    assert len(kv_lens) == n <= num_rows and sum(q_lens) <= num_tokens
    assert all(0 < q <= kv for q, kv in zip(q_lens, kv_lens, strict=True))
    S = page_size
    pages_needed = [-(-kv // S) for kv in kv_lens]
    assert max(pages_needed, default=0) <= max_blocks
    num_pages = num_pages or 4 + sum(pages_needed)
    assert num_pages > sum(pages_needed)
    ids = rng.permutation(np.arange(1, num_pages))
    block_tables = np.zeros((num_rows, max_blocks), np.int32)
    at = 0
    for r, m in enumerate(pages_needed):
        block_tables[r, :m] = ids[at : at + m]
        at += m
    cu = np.zeros(num_rows + 1, np.int32)
    cu[1 : n + 1] = np.cumsum(q_lens)
    cu[n + 1 :] = cu[n]
    kv = np.zeros(num_rows, np.int32)
    kv[:n] = kv_lens
    L, K, N, H = num_layers, num_kv_heads, num_heads, head_dim
    q = rng.standard_normal((num_tokens, N, H), np.float32)
    q[cu[n] :] = np.nan
    cache_shape = (L, K, num_pages, S, H)
    stored = dtype if cache_dtype is None else cache_dtype
    if device_cache:
        k_key, v_key = jax.random.split(jax.random.key(int(rng.integers(2**31))))
        k_cache = cache_codec.encode(jax.random.normal(k_key, cache_shape, dtype), stored)
        v_cache = cache_codec.encode(jax.random.normal(v_key, cache_shape, dtype), stored)
    else:
        k_cache = rng.standard_normal(cache_shape, np.float32).astype(dtype)
        v_cache = rng.standard_normal(cache_shape, np.float32).astype(dtype)
        if cache_dtype is not None:
            k_cache = np.asarray(cache_codec.encode(jnp.asarray(k_cache), cache_dtype))
            v_cache = np.asarray(cache_codec.encode(jnp.asarray(v_cache), cache_dtype))
    return Batch(
        q=q.astype(dtype),
        k_cache=k_cache,
        v_cache=v_cache,
        layer=np.int32(rng.integers(L)),
        kv_lens=kv,
        block_tables=block_tables,
        cu_q_lens=cu,
        num_reqs=np.int32(n),
        cache_dtype=None if cache_dtype is None else jnp.dtype(cache_dtype),
    )
