"""Pure-`jnp` ragged paged attention: the reference every kernel is tested against.

Queries of many requests lie on one packed token axis; request r owns tokens
`cu_q_lens[r]:cu_q_lens[r+1]`, which are the last `q_len` of its `kv_lens[r]` context tokens
(so a prefill chunk and a single decode token are the same case). Each token attends
causally to its own request's pages only, gathered through `block_tables`. The cache holds
q's dtype, or fp8 bits (`kv_cache_dtype`, see `cache_codec`) widened as they are read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention import cache_codec

# Bytes of gathered K+V one chunk of query tokens may hold (bounds host/device memory).
_CHUNK_BYTES = 64 * 2**20


def token_metadata(cu_q_lens: jax.Array, kv_lens: jax.Array, num_reqs: jax.Array, num_tokens: int):
    """Per packed token: its request, its position in that request, and whether it is real.

    Returns (req [T] clamped to a valid row, pos [T], valid [T] bool).
    """
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    num_rows = kv_lens.shape[0]
    req = jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32)
    valid = t < cu_q_lens[num_reqs]
    req = jnp.minimum(req, num_rows - 1)
    q_len = cu_q_lens[req + 1] - cu_q_lens[req]
    pos = kv_lens[req] - q_len + (t - cu_q_lens[req])
    return req, jnp.where(valid, pos, 0), valid


@functools.partial(jax.jit, static_argnames=("sm_scale", "cache_dtype", "sliding_window"))
def ragged_paged_attention_ref(
    q: jax.Array,  # [T, N, H]
    k_cache: jax.Array,  # [L, K, P, S, H]
    v_cache: jax.Array,  # [L, K, P, S, H]
    layer: jax.Array,  # i32[] which layer of the stacked cache
    kv_lens: jax.Array,  # i32[R]
    block_tables: jax.Array,  # i32[R, MB]
    cu_q_lens: jax.Array,  # i32[R+1]
    num_reqs: jax.Array,  # i32[]
    *,
    sm_scale: float,
    cache_dtype=None,
    sliding_window: int | None = None,
) -> jax.Array:  # [T, N, H]; rows of padding tokens are zero
    """Attention of every packed query token over its own request's paged context.

    `cache_dtype`: the values' type when the cache holds fp8 bits as uint8 (`cache_codec`).
    `sliding_window`: a token at position p sees keys p - sliding_window + 1 ... p only.
    """
    cache_dtype = cache_codec.value_dtype(k_cache.dtype, cache_dtype)
    T, N, H = q.shape
    _, K, _, S, _ = k_cache.shape
    MB = block_tables.shape[1]
    G = N // K
    req, pos, valid = token_metadata(cu_q_lens, kv_lens, num_reqs, T)

    def attend(args):
        q_t, req_t, pos_t = args  # [N, H], [], []
        pages = block_tables[req_t]  # [MB]
        k = k_cache[layer][:, pages].reshape(K, MB * S, H)  # [K, C, H]
        v = v_cache[layer][:, pages].reshape(K, MB * S, H)
        k = cache_codec.decode(k, cache_dtype, q.dtype)  # fp8 widens, exactly
        qg = q_t.reshape(K, G, H)
        s = jnp.einsum("kgh,kch->kgc", qg, k, preferred_element_type=jnp.float32) * sm_scale
        key = jnp.arange(MB * S)
        visible = key <= pos_t  # causal within the request
        if sliding_window is not None:
            visible &= key > pos_t - sliding_window
        s = jnp.where(visible, s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("kgc,kch->kgh", p, cache_codec.decode(v, cache_dtype, jnp.float32))
        return o.reshape(N, H).astype(q.dtype)

    per_token_bytes = 2 * K * MB * S * H * k_cache.dtype.itemsize
    chunk = max(1, min(T, _CHUNK_BYTES // per_token_bytes))
    out = jax.lax.map(attend, (q, req, pos), batch_size=chunk)
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)
