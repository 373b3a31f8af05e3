"""Ragged paged attention as a Pallas kernel (Triton backend on GPU, interpret mode on CPU).

Same contract as `reference.py`: packed queries `q [T, N, H]` of many requests (the new
tokens of each being the last `q_len` of its `kv_lens[r]` context) attend causally to their
own request's K/V pages, read straight from layer `layer` of the stacked `[L, K, P, S, H]`
cache (no per-layer slice is copied). Prefill chunks and decodes mix in one call. The cache
holds q's dtype, or fp8 bits as uint8 (`cache_codec`), widened in registers after each load.

Design, point by point against GPU_NOTES.md:
- Work unit: a *tile* = up to `block_q` consecutive tokens of one request times all G query
  heads of one kv head; its matmul rows are `M = block_q * G'` (G' = G rounded up to a power
  of two), so each K/V chunk is loaded once for the G heads sharing it. A tiny jnp pass
  (`partition.build_tiles`) turns `cu_q_lens` into a tile table (request, first token,
  token count, first position). The kernel gathers its q rows straight from `q [T, N, H]`
  and stores its output rows straight into `[T, N, H]` under a mask: no query round trip
  through HBM outside the kernel.
- Two tile classes (`partition.plan_tile_classes`): short queries (decodes) get 16-row
  tiles, long ones (prefill chunks) 64-row tiles, so decodes do not pay for 63 empty matmul
  rows while prefills reuse each K/V chunk across many queries. One `pallas_call` per class;
  the second writes into the first's output buffers (aliased), so nothing is merged. Or,
  with `one_launch`, one call whose tile axis holds both classes' tiles (long-query tiles
  first) and a branch per class in the kernel, so a mixed batch's prefill programs run
  beside its decodes rather than after them.
- Loop step: `block_kv` keys (128 for 16-bit inputs with H <= 64, i.e. 8 pages of 16; see
  `partition.default_block_kv`). The step's page ids are gathered from the block table and
  each key row is loaded through its page: one [block_kv, H] tile per load. Online softmax
  in f32 (exp2, with the scale folded into log2 e). Chunks wholly before the tile's first
  position run a loop with no masks; only the last one or two run the masked loop (causal
  mask, K/V loads masked past the context, so stale page contents, even NaN, never matter).
- Split-K: when the grid would have too few (tile, kv head) programs to fill the GPU (few
  long decodes), grid axis 2 splits each tile's kv range into balanced pieces; each writes
  an f32 partial and its log-sum-exp, merged by one fused jnp pass
  (`partition.combine_splits`, which also zeroes padding rows). With one split the kernel
  stores final rows in the output dtype into a zero-initialised [T, N, H] buffer (aliased),
  so padding rows stay zero and no pass over the output follows.

Grid: (tile slots, K, kv splits); empty tile slots exit at once.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.ragged_paged_attention import cache_codec
from pallas_kernels.ragged_paged_attention import partition as part

_LOG2E = math.log2(math.e)
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _attention_kernel(
    tiles_ref,  # i32[NT, 4] (request, first packed token, token count, first position)
    layer_ref,  # i32[1]
    q_ref,  # [T, N, H]
    k_ref,  # [L, K, P, S, H] in q's dtype, or u8 bits of `cache_dtype` (fp8)
    v_ref,  # [L, K, P, S, H]
    block_tables_ref,  # i32[R, MB]
    *refs,  # the aliased input buffers (unused here), then the outputs:
    #   one split:  o [T, N, H] in q's dtype
    #   NS splits:  o [NS, T, N, H] f32 (normalised per split), lse [NS, T, N] f32 (log2)
    class_spans: tuple[tuple[int, int, int], ...],
    **kw,
):
    """Dispatch each program to its tile class: `class_spans` holds (first tile, tiles,
    block_q) per class, the classes' tiles laid one after another in `tiles_ref`."""
    # Program ids are read here, outside any branch (interpret mode lowers them only here).
    ids = (pl.program_id(0), pl.program_id(1), pl.program_id(2))
    refs = (tiles_ref, layer_ref, q_ref, k_ref, v_ref, block_tables_ref, *refs)
    if len(class_spans) == 1:
        _attend_tile(*refs, ids=ids, block_q=class_spans[0][2], **kw)
        return
    tile = ids[0]
    for first, count, block_q in class_spans:
        pl.when((tile >= first) & (tile < first + count))(
            functools.partial(_attend_tile, *refs, ids=ids, block_q=block_q, **kw)
        )


def _attend_tile(
    tiles_ref,
    layer_ref,
    q_ref,
    k_ref,
    v_ref,
    block_tables_ref,
    *refs,
    ids: tuple[jax.Array, jax.Array, jax.Array],  # (tile, kv head, kv split) program ids
    block_q: int,
    group: int,
    block_kv: int,
    num_splits: int,
    scale_log2: float,
    precision: lax.Precision | None,
    num_aliased: int,
    cache_dtype,
    sliding_window: int | None,
):
    out_refs = refs[num_aliased:]
    tile, kv_head, split = ids
    T, N, H = q_ref.shape
    P, S = k_ref.shape[2], k_ref.shape[3]
    MB = block_tables_ref.shape[1]
    gp = part.next_pow2(group)
    M = block_q * gp

    req = tiles_ref[tile, part.REQ]
    count = tiles_ref[tile, part.Q_COUNT]

    @pl.when(count > 0)
    def _():
        q_start = tiles_ref[tile, part.Q_START]
        pos0 = tiles_ref[tile, part.POS0]
        layer = layer_ref[0]

        rows = lax.broadcasted_iota(jnp.int32, (M, 1), 0)
        tok_in_tile, g = lax.div(rows, gp), lax.rem(rows, gp)
        row_ok = (tok_in_tile < count) & (g < group)  # [M, 1]
        tok = q_start + tok_in_tile  # [M, 1]
        head = kv_head * group + g  # [M, 1]
        pos = pos0 + tok_in_tile  # [M, 1] position of each row's token in its sequence
        hd = lax.broadcasted_iota(jnp.int32, (1, H), 1)

        # Clamped indices keep the unmasked load in bounds; rows that are not ours are
        # computed and dropped (rows of a softmax do not mix).
        q = q_ref[jnp.minimum(tok, T - 1), jnp.minimum(head, N - 1), hd]  # [M, H]

        kv_end = pos0 + count  # keys [0, kv_end) are visible to the tile's last token
        n_chunks = lax.div(kv_end + block_kv - 1, block_kv)
        first = 0  # chunks before it are outside every row's sliding window
        if sliding_window is not None:
            first = lax.div(jnp.maximum(pos0 - (sliding_window - 1), 0), block_kv)
        span = n_chunks - first
        lo = first + lax.div(split * span, num_splits)
        hi = first + lax.div((split + 1) * span, num_splits)
        full = lax.div(pos0 + 1, block_kv)  # chunks before this one precede every row
        key = lax.broadcasted_iota(jnp.int32, (block_kv, 1), 0)
        pages_per_step = block_kv // S

        def kv_index(c):
            col = jnp.minimum(c * pages_per_step + lax.div(key, S), MB - 1)  # [BK, 1]
            page = jnp.clip(block_tables_ref[req, col], 0, P - 1)  # [BK, 1]
            return layer, kv_head, page, lax.rem(key, S), hd  # -> [BK, H]

        def step(c, carry, masked: bool):
            m, l, acc = carry  # [M], [M], [M, H] f32
            idx = kv_index(c)
            if masked:
                key_ok = c * block_kv + key < kv_end  # [BK, 1]
                k = plgpu.load(k_ref.at[idx], mask=key_ok, other=0)  # [BK, H]
            else:
                k = k_ref[idx]
            k = cache_codec.decode(k, cache_dtype, q.dtype)  # fp8 bits widen in registers
            s = lax.dot_general(
                q,
                k,
                (((1,), (1,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )  # [M, BK]
            s = s * scale_log2
            key_pos = c * block_kv + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
            if masked:
                s = jnp.where(key_pos <= pos, s, -jnp.inf)
            if sliding_window is not None:  # in both loops: the window's start cuts any chunk
                s = jnp.where(key_pos > pos - sliding_window, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing seen yet
            alpha = jnp.exp2(m - m_safe)
            p = jnp.exp2(s - m_safe[:, None])  # [M, BK]
            l = l * alpha + jnp.sum(p, axis=1)
            v = plgpu.load(v_ref.at[idx], mask=key_ok, other=0) if masked else v_ref[idx]
            v = cache_codec.decode(v, cache_dtype, q.dtype)
            pv = lax.dot_general(
                p.astype(v.dtype),
                v,
                (((1,), (0,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )  # [M, H]
            return m_new, l, acc * alpha[:, None] + pv

        carry = (
            jnp.full((M,), -jnp.inf, jnp.float32),
            jnp.zeros((M,), jnp.float32),
            jnp.zeros((M, H), jnp.float32),
        )
        mid = jnp.clip(full, lo, hi)
        carry = lax.fori_loop(lo, mid, functools.partial(step, masked=False), carry)
        m, l, acc = lax.fori_loop(mid, hi, functools.partial(step, masked=True), carry)

        o = acc / jnp.where(l == 0.0, 1.0, l)[:, None]  # [M, H]
        # Rows that are not ours point past the end, so even interpret mode drops them.
        out_tok = jnp.where(row_ok, tok, T)
        if num_splits == 1:
            (o_ref,) = out_refs
            plgpu.store(o_ref.at[out_tok, head, hd], o.astype(o_ref.dtype), mask=row_ok)
        else:
            o_ref, lse_ref = out_refs
            plgpu.store(o_ref.at[split, out_tok, head, hd], o, mask=row_ok)
            lse = jnp.where(l == 0.0, -jnp.inf, m + jnp.log2(jnp.where(l == 0.0, 1.0, l)))
            plgpu.store(lse_ref.at[split, out_tok[:, 0], head[:, 0]], lse, mask=row_ok[:, 0])


def _attention_call(
    tiles,
    layer,
    q,
    k_cache,
    v_cache,
    block_tables,
    aliased,
    *,
    tile_classes,
    num_splits,
    block_kv,
    scale_log2,
    num_warps,
    num_stages,
    interpret,
    cache_dtype,
    sliding_window,
):
    """One `pallas_call` over the tiles of `tile_classes`, their tables one after another
    in `tiles`; writes into `aliased` if given."""
    T, N, H = q.shape
    K = k_cache.shape[1]
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((T, N, H), q.dtype)]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((num_splits, T, N, H), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, T, N), jnp.float32),
        ]
    inputs = (tiles, layer, q, k_cache, v_cache, block_tables, *aliased)
    spans, first = [], 0
    for c in tile_classes:
        spans.append((first, c.num_tiles, c.block_q))
        first += c.num_tiles
    kernel = functools.partial(
        _attention_kernel,
        class_spans=tuple(spans),
        group=N // K,
        block_kv=block_kv,
        num_splits=num_splits,
        scale_log2=scale_log2,
        precision=lax.Precision.HIGHEST if q.dtype == jnp.float32 else None,
        num_aliased=len(aliased),
        cache_dtype=cache_dtype,
        sliding_window=sliding_window,
    )
    return pl.pallas_call(
        kernel,
        grid=(first, K, num_splits),
        out_shape=out_shape,
        input_output_aliases={6 + i: i for i in range(len(aliased))},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=(
            f"ragged_paged_attention_bq{'_'.join(str(c.block_q) for c in tile_classes)}"
            f"_kv{block_kv}_ns{num_splits}"
        ),
    )(*inputs)


def _geometry_problem(head_dim: int, page_size: int, dtype, cache_dtype=None) -> str | None:
    """Why the kernel cannot take this head dim / page size / dtypes, or None."""
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        return f"head dim must be a power of two in [16, 256] for Triton; got {head_dim}"
    if page_size not in (16, 32, 64):
        return f"page size must be 16, 32 or 64; got {page_size}"
    if jnp.dtype(dtype) not in _SUPPORTED_DTYPES:
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
    return _geometry_problem(head_dim, page_size, dtype, cache_dtype) is None


def _check_shapes(
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
    if (problem := _geometry_problem(H, S, q.dtype, cache_dtype)) is not None:
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


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "block_kv",
        "decode_rows",
        "prefill_rows",
        "num_kv_splits",
        "num_warps",
        "num_stages",
        "one_launch",
        "interpret",
        "cache_dtype",
        "sliding_window",
    ),
)
def ragged_paged_attention(
    q: jax.Array,  # [T, N, H]
    k_cache: jax.Array,  # [L, K, P, S, H]
    v_cache: jax.Array,  # [L, K, P, S, H]
    layer: jax.Array,  # i32[]
    kv_lens: jax.Array,  # i32[R]
    block_tables: jax.Array,  # i32[R, MB]
    cu_q_lens: jax.Array,  # i32[R+1]
    num_reqs: jax.Array,  # i32[]
    *,
    sm_scale: float,
    block_kv: int | None = None,
    decode_rows: int = 16,
    prefill_rows: int = 64,
    num_kv_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    one_launch: bool = False,
    interpret: bool | None = None,
    cache_dtype=None,
    sliding_window: int | None = None,
) -> jax.Array:  # [T, N, H]; rows of padding tokens are zero
    """Attention of every packed query token over its own request's paged context.

    Args mirror `ragged_paged_attention_ref`. Tuning (all static; None picks from the
    shapes): `block_kv` keys per loop step, a power-of-two multiple of the page size
    (`partition.default_block_kv`); `decode_rows` / `prefill_rows` matmul rows of the
    short-query and long-query tiles; `num_kv_splits` split-K factor
    (`partition.plan_num_splits`); Triton's `num_warps` and `num_stages`; `one_launch`:
    both tile classes in one `pallas_call` (long-query tiles first, so a mixed batch's
    prefill programs run beside its decodes instead of after them). `interpret`
    defaults to True when the default backend is the CPU. `cache_dtype`: the values' type
    when the caches hold fp8 bits as uint8 (`cache_codec`). `sliding_window`: a token at
    position p sees keys p - sliding_window + 1 ... p only (chunks before every row's window
    are skipped).
    """
    return _forward(
        q,
        k_cache,
        v_cache,
        layer,
        kv_lens,
        block_tables,
        cu_q_lens,
        num_reqs,
        None,
        sm_scale=sm_scale,
        block_kv=block_kv,
        decode_rows=decode_rows,
        prefill_rows=prefill_rows,
        num_kv_splits=num_kv_splits,
        num_warps=num_warps,
        num_stages=num_stages,
        one_launch=one_launch,
        interpret=interpret,
        cache_dtype=cache_dtype,
        sliding_window=sliding_window,
    )


def _forward(
    q,
    k_cache,
    v_cache,
    layer,
    kv_lens,
    block_tables,
    cu_q_lens,
    num_reqs,
    out_init,
    *,
    sm_scale,
    block_kv,
    decode_rows,
    prefill_rows,
    num_kv_splits,
    num_warps,
    num_stages,
    one_launch,
    interpret,
    cache_dtype=None,
    sliding_window=None,
):
    """`ragged_paged_attention`, writing real tokens' rows into `out_init` when given.

    With one kv split the kernels store the final rows in place into `out_init` [T, N, H]
    (default zeros), leaving padding rows as they were: tests pass a NaN buffer to prove
    that every real row, and no padding row, is written.
    """
    cache_dtype = _check_shapes(
        q,
        k_cache,
        v_cache,
        layer,
        kv_lens,
        block_tables,
        cu_q_lens,
        num_reqs,
        block_kv,
        cache_dtype,
    )
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None; got {sliding_window}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    T, N, H = q.shape
    _, K, _, S, _ = k_cache.shape
    R, MB = block_tables.shape
    block_kv = block_kv or part.default_block_kv(q.dtype, H, S)
    splits = num_kv_splits or part.plan_num_splits(
        num_tokens=T, num_rows=R, num_kv_heads=K, max_context=MB * S, block_kv=block_kv
    )
    if out_init is not None and splits != 1:
        raise ValueError("out_init needs a single kv split")
    classes = part.plan_tile_classes(
        num_tokens=T,
        num_rows=R,
        group_pow2=part.next_pow2(N // K),
        decode_rows=decode_rows,
        prefill_rows=prefill_rows,
    )
    call = functools.partial(
        _attention_call,
        layer=layer.reshape(1),
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        num_splits=splits,
        block_kv=block_kv,
        scale_log2=sm_scale * _LOG2E,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        cache_dtype=cache_dtype,
        sliding_window=sliding_window,
    )
    outs = ()  # with splits, fresh partial buffers (the combine zeroes the padding rows)
    if splits == 1:
        outs = (jnp.zeros_like(q) if out_init is None else out_init,)
    if one_launch:  # long-query tiles first: the longest programs start first
        classes = classes[::-1]
        tiles = jnp.concatenate(
            [part.build_tiles(cu_q_lens, kv_lens, num_reqs, c) for c in classes]
        )
        outs = call(tiles, aliased=outs, tile_classes=classes)
    else:
        for tile_class in classes:
            tiles = part.build_tiles(cu_q_lens, kv_lens, num_reqs, tile_class)
            outs = call(tiles, aliased=outs, tile_classes=(tile_class,))
    if splits == 1:
        return outs[0]
    return part.combine_splits(*outs, cu_q_lens, num_reqs, q.dtype)
