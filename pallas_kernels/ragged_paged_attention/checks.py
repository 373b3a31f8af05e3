"""Trace-time checks of the kernel's arguments: shapes, dtypes and geometry, with messages
that say what to change. Values (lengths, page ids) are checked on the host by
`partition.validate_metadata`."""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention import cache_codec

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# The kernel's tuning keywords (static: each value compiles its own kernel).
TUNING_ARGS = (
    "block_kv",
    "decode_rows",
    "prefill_rows",
    "decode_one_class",
    "num_kv_splits",
    "num_warps",
    "num_stages",
    "one_launch",
    "one_loop",
)


def geometry_problem(head_dim: int, page_size: int, dtype, cache_dtype=None) -> str | None:
    """Why the kernel cannot take this head dim / page size / dtypes, or None."""
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        return f"head dim must be a power of two in [16, 256] for Triton; got {head_dim}"
    if page_size not in (16, 32, 64):
        return f"page size must be 16, 32 or 64; got {page_size}"
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        return f"q dtype must be one of f32, bf16, f16; got {jnp.dtype(dtype)}"
    cache_dtype = jnp.dtype(dtype if cache_dtype is None else cache_dtype)
    if cache_dtype != jnp.dtype(dtype) and cache_dtype not in cache_codec.FP8_DTYPES:
        return (
            f"cache dtype {cache_dtype} must match q dtype {jnp.dtype(dtype)} or be "
            "float8_e4m3fn / float8_e5m2"
        )
    return None


def supports(head_dim: int, page_size: int, dtype, cache_dtype=None) -> bool:
    """Whether the kernel handles this geometry (what `_check_shapes` accepts of it)."""
    return geometry_problem(head_dim, page_size, dtype, cache_dtype) is None


def check_shapes(
    q, k_cache, v_cache, layer, kv_lens, block_tables, cu_q_lens, num_reqs, block_kv, cache_dtype
):
    """Trace-time shape and dtype checks (values are checked by `validate_metadata`);
    returns the cache values' dtype (`cache_codec.value_dtype`)."""
    if q.ndim != 3 or k_cache.ndim != 5:
        raise ValueError(
            f"want q [T, N, H] and caches [L, K, P, S, H]; got {q.shape}, {k_cache.shape}"
        )
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            f"k_cache {k_cache.shape} {k_cache.dtype} and v_cache "
            f"{v_cache.shape} {v_cache.dtype} differ"
        )
    T, N, H = q.shape
    _, K, _, S, Hk = k_cache.shape
    R = kv_lens.shape[0]
    if Hk != H:
        raise ValueError(f"head dim of q ({H}) and of the cache ({Hk}) differ")
    cache_dtype = cache_codec.value_dtype(k_cache.dtype, cache_dtype)
    if (problem := geometry_problem(H, S, q.dtype, cache_dtype)) is not None:
        raise ValueError(problem)
    if N % K:
        raise ValueError(f"query heads ({N}) must be a multiple of kv heads ({K})")
    if block_kv is not None and (block_kv < S or block_kv & (block_kv - 1)):
        raise ValueError(f"block_kv must be a power of two >= page size {S}; got {block_kv}")
    want = {
        "layer": ((), layer),
        "kv_lens": ((R,), kv_lens),
        "cu_q_lens": ((R + 1,), cu_q_lens),
        "num_reqs": ((), num_reqs),
    }
    for name, (shape, x) in want.items():
        if x.shape != shape or x.dtype != jnp.int32:
            raise ValueError(f"{name} must be i32{list(shape)}; got {x.dtype}{list(x.shape)}")
    if block_tables.ndim != 2 or block_tables.shape[0] != R or block_tables.dtype != jnp.int32:
        raise ValueError(
            f"block_tables must be i32[{R}, MB]; got {block_tables.dtype}{list(block_tables.shape)}"
        )
    if T < 1:
        raise ValueError("need at least one token")
    return cache_dtype


def check_new_kv(new_kv, q, k_cache) -> tuple:
    """`new_kv` as a tuple: () or (k, v), each [T, K, H] in q's dtype."""
    new_kv = tuple(new_kv or ())
    if len(new_kv) not in (0, 2):
        raise ValueError(f"new_kv must be (k, v); got {len(new_kv)} arrays")
    T, _, H = q.shape
    want = (T, k_cache.shape[1], H)
    for name, x in zip(("new k", "new v")[: len(new_kv)], new_kv, strict=True):
        if x.shape != want or x.dtype != q.dtype:
            raise ValueError(f"{name} must be {q.dtype}{list(want)}; got {x.dtype}{list(x.shape)}")
    return new_kv
