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
  token count, first position, the request's first new position); a decoder builds it once
  per step for all layers (`partition.tile_tables`, passed as `tiles=`). The kernel gathers
  its q rows straight from `q [T, N, H]` and stores its output rows straight into
  `[T, N, H]` under a mask: no query round trip through HBM outside the kernel.
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
  `one_loop` instead masks every chunk in one loop (a decode program's 4 chunks then
  pipeline without a drain before the last; compiled offline for sm_90 it keeps the 88
  registers of two loops, where loading the first new-key chunk before the loop, tried
  beside it, took 128 and cut the programs an SM holds from 5 to 4).
- Split-K: when the grid would have too few (tile, kv head) programs to fill the GPU (few
  long decodes), grid axis 2 splits each tile's kv range into balanced pieces; each writes
  an f32 partial and its log-sum-exp, merged by one fused jnp pass
  (`partition.combine_splits`, which also zeroes padding rows). With one split the kernel
  stores final rows in the output dtype straight into [T, N, H], and the first launch's
  padding tiles (`partition.padding_class`) store zeros in the padding tokens' rows, so no
  kernel zeroes the output first and no pass over it follows.
- The step's K/V write (`new_kv=`): the kernel also takes the step's new K/V rows
  `[T, K, H]`, reads keys before each request's first new position from the cache and its
  new keys straight from those rows (a third loop, in chunks of at most the tile's token
  count), and split 0 of each tile stores the tile's own tokens' rows into their pages
  (the caches are aliased outputs). No program reads a slot any program writes, so no
  ordering is needed, and the two scatter kernels a layer otherwise runs before attention
  go away. fp8 caches get saturated fp8 bits, and attention uses the rounded values.

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
from pallas_kernels.ragged_paged_attention.checks import TUNING_ARGS, check_new_kv, check_shapes

_LOG2E = math.log2(math.e)


def _attention_kernel(
    tiles_ref,  # i32[NT, 5] (request, first packed token, token count, first position, NEW0)
    layer_ref,  # i32[1]
    q_ref,  # [T, N, H]
    k_ref,  # [L, K, P, S, H] in q's dtype, or u8 bits of `cache_dtype` (fp8)
    v_ref,  # [L, K, P, S, H]
    block_tables_ref,  # i32[R, MB]
    *refs,  # with `write_new`: the new K and V [T, K, H]; then the aliased input buffers
    #   (unused here); then the outputs:
    #   one split:  o [T, N, H] in q's dtype
    #   NS splits:  o [NS, T, N, H] f32 (normalised per split), lse [NS, T, N] f32 (log2)
    #   with `write_new`, then the caches (k_ref and v_ref's buffers, aliased)
    class_spans: tuple[tuple[int, int, int, int, bool], ...],
    **kw,
):
    """Dispatch each program to its tile class: `class_spans` holds (first tile, tiles,
    block_q, block_new, padding) per class, the classes' tiles laid one after another in
    `tiles_ref`. Tile slots in no span (padding tiles under split-K) exit at once."""
    # Program ids are read here, outside any branch (interpret mode lowers them only here).
    ids = (pl.program_id(0), pl.program_id(1), pl.program_id(2))
    refs = (tiles_ref, layer_ref, q_ref, k_ref, v_ref, block_tables_ref, *refs)
    tile = ids[0]
    for first, count, block_q, block_new, padding in class_spans:
        fn = functools.partial(
            _zero_tile if padding else _attend_tile,
            *refs,
            ids=ids,
            block_q=block_q,
            block_new=block_new,
            **kw,
        )
        if len(class_spans) == 1:
            fn()
        else:
            pl.when((tile >= first) & (tile < first + count))(fn)


def _zero_tile(
    tiles_ref, layer_ref, q_ref, *refs, ids, block_q, group, num_aliased, write_new, **_
):
    """A padding tile's program: zero its padding tokens' output rows for its kv head's
    query heads (only with one kv split, where the output holds final rows)."""
    # refs: k and v caches, block tables, (new k and v), aliased inputs, then the output
    o_ref = refs[3 + 2 * write_new + num_aliased]
    tile, kv_head, _ = ids
    T, N, H = q_ref.shape
    gp = part.next_pow2(group)
    n = -tiles_ref[tile, part.Q_COUNT]

    @pl.when(n > 0)
    def _():
        rows = lax.broadcasted_iota(jnp.int32, (block_q * gp, 1), 0)
        t, g = lax.div(rows, gp), lax.rem(rows, gp)
        ok = (t < n) & (g < group)  # [M, 1]
        tok = jnp.where(ok, tiles_ref[tile, part.Q_START] + t, T)  # past the end: dropped
        head = jnp.minimum(kv_head * group + g, N - 1)
        hd = lax.broadcasted_iota(jnp.int32, (1, H), 1)
        zeros = jnp.zeros((block_q * gp, H), o_ref.dtype)
        plgpu.store(o_ref.at[tok, head, hd], zeros, mask=ok)


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
    block_new: int,
    group: int,
    block_kv: int,
    num_splits: int,
    scale_log2: float,
    precision: lax.Precision | None,
    num_aliased: int,
    cache_dtype,
    sliding_window: int | None,
    write_new: bool,
    one_loop: bool,
):
    """One (tile, kv head, kv split) program.

    Keys come from two places. Cache keys: positions [0, cache_end) through the block
    table, in `block_kv` chunks. With `write_new`, cache_end is the request's first new
    position (NEW0) and the step's new keys, [NEW0, kv_end), are read from the new K/V
    rows `[T, K, H]` in `block_new` chunks, as the cache will hold them (fp8 rounded); the
    tile also stores its own tokens' K/V into their pages. No program reads a slot that any
    program writes, so the order of programs does not matter. Without `write_new` the
    caller has written the new K/V already and every key comes from the cache.
    """
    if write_new:
        k_new_ref, v_new_ref, *refs = refs
    out_refs = refs[num_aliased:]
    if write_new:
        *out_refs, k_out_ref, v_out_ref = out_refs
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
        new0 = tiles_ref[tile, part.NEW0]
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
        cache_end = new0 if write_new else kv_end  # keys [0, cache_end) are in the cache
        first = 0  # cache chunks before it are outside every row's sliding window
        if sliding_window is not None:
            first = lax.div(jnp.maximum(pos0 - (sliding_window - 1), 0), block_kv)
        # The chunks to visit, cache chunks first, then new-key chunks; splits divide them.
        n_cache = jnp.maximum(lax.div(cache_end + block_kv - 1, block_kv) - first, 0)
        n_new = lax.div(kv_end - new0 + block_new - 1, block_new) if write_new else 0
        span = n_cache + n_new
        lo = lax.div(split * span, num_splits)
        hi = lax.div((split + 1) * span, num_splits)
        c_lo = first + jnp.minimum(lo, n_cache)
        c_hi = first + jnp.minimum(hi, n_cache)
        # cache chunks before this one are whole and precede every row: no masks
        full = jnp.minimum(lax.div(pos0 + 1, block_kv), lax.div(cache_end, block_kv))
        key = lax.broadcasted_iota(jnp.int32, (block_kv, 1), 0)
        pages_per_step = block_kv // S

        def kv_index(c):
            col = jnp.minimum(c * pages_per_step + lax.div(key, S), MB - 1)  # [BK, 1]
            page = jnp.clip(block_tables_ref[req, col], 0, P - 1)  # [BK, 1]
            return layer, kv_head, page, lax.rem(key, S), hd  # -> [BK, H]

        def attend(carry, k, v, key_pos, masked: bool):
            """Online-softmax update with keys k, values v [BK, H] at positions key_pos."""
            m, l, acc = carry  # [M], [M], [M, H] f32
            s = lax.dot_general(
                q,
                k,
                (((1,), (1,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )  # [M, BK]
            s = s * scale_log2
            if masked:
                s = jnp.where(key_pos <= pos, s, -jnp.inf)
            if sliding_window is not None:  # in every loop: the window's start cuts any chunk
                s = jnp.where(key_pos > pos - sliding_window, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing seen yet
            alpha = jnp.exp2(m - m_safe)
            p = jnp.exp2(s - m_safe[:, None])  # [M, BK]
            l = l * alpha + jnp.sum(p, axis=1)
            pv = lax.dot_general(
                p.astype(v.dtype),
                v,
                (((1,), (0,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )  # [M, H]
            return m_new, l, acc * alpha[:, None] + pv

        def cache_step(c, carry, masked: bool):
            idx = kv_index(c)
            if masked:
                key_ok = c * block_kv + key < cache_end  # [BK, 1]
                k = plgpu.load(k_ref.at[idx], mask=key_ok, other=0)  # [BK, H]
                v = plgpu.load(v_ref.at[idx], mask=key_ok, other=0)
            else:
                k, v = k_ref[idx], v_ref[idx]
            k = cache_codec.decode(k, cache_dtype, q.dtype)  # fp8 bits widen in registers
            v = cache_codec.decode(v, cache_dtype, q.dtype)
            key_pos = c * block_kv + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
            if masked and write_new:  # slots from NEW0 on are not read: hide them as future
                key_pos = jnp.where(key_pos < cache_end, key_pos, jnp.iinfo(jnp.int32).max)
            return attend(carry, k, v, key_pos, masked)

        carry = (
            jnp.full((M,), -jnp.inf, jnp.float32),
            jnp.zeros((M,), jnp.float32),
            jnp.zeros((M, H), jnp.float32),
        )
        mid = c_lo  # one_loop: masks on every chunk, so all of them pipeline as one loop
        if not one_loop:
            mid = jnp.clip(full, c_lo, c_hi)
            carry = lax.fori_loop(c_lo, mid, functools.partial(cache_step, masked=False), carry)
        carry = lax.fori_loop(mid, c_hi, functools.partial(cache_step, masked=True), carry)
        if write_new:
            new_key = lax.broadcasted_iota(jnp.int32, (block_new, 1), 0)

            def new_step(j, carry):
                key_col = new0 + j * block_new + new_key  # [BN, 1] positions
                key_ok = key_col < kv_end
                src = (jnp.clip(q_start + key_col - pos0, 0, T - 1), kv_head, hd)  # packed rows
                k = plgpu.load(k_new_ref.at[src], mask=key_ok, other=0)  # [BN, H]
                v = plgpu.load(v_new_ref.at[src], mask=key_ok, other=0)
                k = cache_codec.round_trip(k, cache_dtype)  # what the cache will hold
                v = cache_codec.round_trip(v, cache_dtype)
                key_pos = new0 + j * block_new + lax.broadcasted_iota(jnp.int32, (1, block_new), 1)
                return attend(carry, k, v, key_pos, masked=True)

            n_lo, n_hi = jnp.maximum(lo - n_cache, 0), jnp.maximum(hi - n_cache, 0)
            carry = lax.fori_loop(n_lo, n_hi, new_step, carry)
        m, l, acc = carry

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

        if write_new:

            @pl.when(split == 0)
            def _():
                # The tile's own tokens' K/V into their slots (page P, past the end, drops).
                t = lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
                ok = t < count
                col = jnp.minimum(lax.div(pos0 + t, S), MB - 1)
                page = jnp.where(ok, jnp.clip(block_tables_ref[req, col], 0, P - 1), P)
                dst = (layer, kv_head, page, lax.rem(pos0 + t, S), hd)  # -> [BQ, H]
                src = (jnp.minimum(q_start + t, T - 1), kv_head, hd)
                for new_ref, out_ref in ((k_new_ref, k_out_ref), (v_new_ref, v_out_ref)):
                    rows = cache_codec.encode(new_ref[src], cache_dtype)
                    plgpu.store(out_ref.at[dst], rows, mask=ok)


def _attention_call(
    tiles,
    layer,
    q,
    k_cache,
    v_cache,
    block_tables,
    new_kv,
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
    one_loop,
):
    """One `pallas_call` over the tiles of `tile_classes`, their tables one after another
    in `tiles`; writes into `aliased` if given. With `new_kv` (k, v [T, K, H]) it also
    stores them into the caches and returns those after the output(s)."""
    T, N, H = q.shape
    K = k_cache.shape[1]
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((T, N, H), q.dtype)]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((num_splits, T, N, H), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, T, N), jnp.float32),
        ]
    inputs = (tiles, layer, q, k_cache, v_cache, block_tables, *new_kv, *aliased)
    aliases = {6 + len(new_kv) + i: i for i in range(len(aliased))}
    if new_kv:  # the caches are written in place
        aliases |= {3: len(out_shape), 4: len(out_shape) + 1}
        out_shape += [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in (k_cache, v_cache)]
    spans, first = [], 0
    for c in tile_classes:
        # A request has at most q_len new keys, so short-query tiles read them in small
        # chunks. The decode class (min_q 0) reads chunks of at most its tile's tokens, so
        # a decode-like bucket planned as that class alone (`decode_one_class`) runs the
        # two-class plan's decode kernel, not one loading a decode's new key in 128 rows.
        new_keys = c.max_q if c.min_q > 0 else min(c.max_q, c.block_q)
        block_new = min(block_kv, max(16, part.next_pow2(new_keys)))
        if not (c.padding and num_splits > 1):  # split partials: the combine zeroes padding
            spans.append((first, c.num_tiles, c.block_q, block_new, c.padding))
        first += c.num_tiles
    if tiles.shape != (first, part.NUM_TILE_FIELDS):
        raise ValueError(f"tile table {tiles.shape}; this launch plans {first} tile slots")
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
        write_new=bool(new_kv),
        one_loop=one_loop,
    )
    return pl.pallas_call(
        kernel,
        grid=(first, K, num_splits),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=(
            f"ragged_paged_attention_bq{'_'.join(str(c.block_q) for c in tile_classes)}"
            f"_kv{block_kv}_ns{num_splits}{'_write' * bool(new_kv)}{'_1loop' * one_loop}"
        ),
    )(*inputs)


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", *TUNING_ARGS, "interpret", "cache_dtype", "sliding_window"),
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
    new_kv: tuple[jax.Array, jax.Array] | None = None,  # this step's K, V [T, K, H]
    tiles: tuple[jax.Array, ...] | None = None,  # `partition.tile_tables` of this batch
    block_kv: int | None = None,
    decode_rows: int = 16,
    prefill_rows: int = 64,
    decode_one_class: bool = False,
    num_kv_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    one_launch: bool = False,
    one_loop: bool = False,
    interpret: bool | None = None,
    cache_dtype=None,
    sliding_window: int | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
    """Attention of every packed query token over its own request's paged context.

    Args mirror `ragged_paged_attention_ref`. `new_kv`: the step's new K and V rows (q's
    dtype), not yet in the cache: the kernel stores each real token's rows into its slot
    (page `block_tables[r, pos // S]`, slot `pos % S`; padding tokens write nothing) and
    attends to them, and returns `(out, k_cache, v_cache)`; inside a jit that donates the
    cache the write is in place, with no scatter kernels. Without it the cache must hold
    them already and only `out` is returned. `tiles`: the batch's `tile_tables`, computed
    once for all layers (`partition.tile_tables`; None: computed here).

    Tuning (all static; None picks from the shapes): `block_kv` keys per loop step, a
    power-of-two multiple of the page size (`partition.default_block_kv`); `decode_rows` /
    `prefill_rows` matmul rows of the short-query and long-query tiles; `decode_one_class`:
    decode-like buckets (T <= 2R) take short-query tiles only, one launch (see
    `partition.plan_launches`); `num_kv_splits`
    split-K factor (`partition.plan_num_splits`); Triton's `num_warps` and `num_stages`;
    `one_launch`: both tile classes in one `pallas_call` (long-query tiles first, so a
    mixed batch's prefill programs run beside its decodes instead of after them);
    `one_loop`: a program's cache chunks in one loop with the masks on every chunk (not
    the unmasked chunks, then the last ones masked: two loops, a pipeline drained between
    them).
    `interpret` defaults to True when the default backend is the CPU. `cache_dtype`: the
    values' type when the caches hold fp8 bits as uint8 (`cache_codec`). `sliding_window`:
    a token at position p sees keys p - sliding_window + 1 ... p only (chunks before every
    row's window are skipped).
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
        new_kv=new_kv,
        tiles=tiles,
        block_kv=block_kv,
        decode_rows=decode_rows,
        prefill_rows=prefill_rows,
        decode_one_class=decode_one_class,
        num_kv_splits=num_kv_splits,
        num_warps=num_warps,
        num_stages=num_stages,
        one_launch=one_launch,
        one_loop=one_loop,
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
    one_loop=False,
    decode_one_class=False,
    new_kv=None,
    tiles=None,
    cache_dtype=None,
    sliding_window=None,
):
    """`ragged_paged_attention`, writing real tokens' rows into `out_init` when given.

    With one kv split the kernels store the final rows, and zeros in padding rows, in place
    into `out_init` [T, N, H] (default: a buffer the first launch creates): tests pass a
    NaN buffer to prove that every row is written.
    """
    cache_dtype = check_shapes(
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
    new_kv = check_new_kv(new_kv, q, k_cache)
    block_kv = block_kv or part.default_block_kv(q.dtype, H, S)
    splits = num_kv_splits or part.plan_num_splits(
        num_tokens=T, num_rows=R, num_kv_heads=K, max_context=MB * S, block_kv=block_kv
    )
    if out_init is not None and splits != 1:
        raise ValueError("out_init needs a single kv split")
    launches = part.plan_launches(
        num_tokens=T,
        num_rows=R,
        num_heads=N,
        num_kv_heads=K,
        decode_rows=decode_rows,
        prefill_rows=prefill_rows,
        one_launch=one_launch,
        decode_one_class=decode_one_class,
    )
    if tiles is None:
        tiles = tuple(part.launch_tiles(cu_q_lens, kv_lens, num_reqs, c) for c in launches)
    if len(tiles) != len(launches):
        raise ValueError(
            f"{len(tiles)} tile tables for {len(launches)} launches: make them with "
            f"partition.tile_tables() and this call's {', '.join(part.TILE_ARGS)}"
        )
    call = functools.partial(
        _attention_call,
        layer=layer.reshape(1),
        q=q,
        block_tables=block_tables,
        new_kv=new_kv,
        num_splits=splits,
        block_kv=block_kv,
        scale_log2=sm_scale * _LOG2E,
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        cache_dtype=cache_dtype,
        sliding_window=sliding_window,
        one_loop=one_loop,
    )
    # The first launch makes the output (its padding tiles zero the padding rows); with
    # splits, fresh partial buffers whose padding rows the combine zeroes.
    outs = () if out_init is None else (out_init,)
    for launch, table in zip(launches, tiles, strict=True):
        outs = call(table, k_cache=k_cache, v_cache=v_cache, aliased=outs, tile_classes=launch)
        if new_kv:  # the next launch reads (and writes) the caches this one wrote into
            *outs, k_cache, v_cache = outs
        outs = tuple(outs)
    out = outs[0] if splits == 1 else part.combine_splits(*outs, cu_q_lens, num_reqs, q.dtype)
    return (out, k_cache, v_cache) if new_kv else out
