"""How the ragged batch is cut into kernel programs, and how split-K partials are merged.

Everything here is plain `jnp` on a few hundred integers (or one fused elementwise pass over
the split partials), run inside the same jit as the kernel. `validate_metadata` is the host-side
value check (numpy), kept apart from the trace-time shape checks in `kernel.py`.

Legend: T tokens, R requests, N query heads, K kv heads, H head dim, S page size,
MB pages per request row, NT tile slots, NS kv splits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# Columns of the tile table handed to the kernel (one row per tile slot): the request, its
# tile's first packed token, token count and first position, and the position of the
# request's first new token (where its keys stop being in the cache before this step).
REQ, Q_START, Q_COUNT, POS0, NEW0 = range(5)
NUM_TILE_FIELDS = 5

# A grid with fewer (tile, kv head) programs than this gets kv splits (an H100 has 132 SMs,
# and about 5 decode programs fit on one: 90 registers x 128 threads, 39 KB shared memory).
TARGET_PROGRAMS = 512
MAX_KV_SPLITS = 16
# The kernel's tuning keywords that shape its tiles: `tile_tables` must get the same ones as
# the calls that take its tables.
TILE_ARGS = ("decode_rows", "prefill_rows", "one_launch", "decode_one_class")


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a, b):
    return (a + b - 1) // b


@dataclasses.dataclass(frozen=True)
class TileClass:
    """Requests with `min_q < q_len <= max_q` are cut into tiles of `block_q` tokens.

    A `padding` class instead cuts the bucket's padding tokens, [real tokens, max_q), into
    tiles whose programs store zero output rows (so the output needs no zeroing pass)."""

    block_q: int
    min_q: int
    max_q: int
    num_tiles: int  # static grid size: an upper bound on the tiles this class can need
    padding: bool = False


def padding_class(num_tokens: int, block_q: int) -> TileClass:
    """Tiles of `block_q` padding tokens: enough for a bucket of padding only."""
    return TileClass(block_q, 0, num_tokens, cdiv(num_tokens, block_q), padding=True)


def default_block_kv(dtype, head_dim: int, page_size: int) -> int:
    """Keys per loop step: 128 for 16-bit H <= 64; halved for f32 and per doubling of H.

    Several pages per step amortise the loop overhead, but compiled for sm_90 (offline, with
    Triton 3.9 and ptxas) larger steps spill registers: with H = 128 the K/V tiles double,
    and f32 dots run on FMA units that keep whole operand tiles in registers.
    """
    keys = 128 * 64 // max(64, head_dim) // (jnp.dtype(dtype).itemsize // 2)
    return max(page_size, keys)


def plan_tile_classes(
    *, num_tokens: int, num_rows: int, group_pow2: int, decode_rows: int, prefill_rows: int
) -> tuple[TileClass, ...]:
    """Short requests (decodes) get small query tiles, long ones (prefill chunks) big tiles.

    A tile holds `block_q` tokens times `group_pow2` query heads as matmul rows, so decode
    tiles waste few rows of the tensor-core matmuls while prefill tiles amortise each K/V
    chunk over many queries. Two classes cost one extra (possibly empty) launch; one suffices
    when no request can be longer than a small tile.
    """
    T, R = num_tokens, num_rows
    small = max(1, decode_rows // group_pow2)
    large = max(1, prefill_rows // group_pow2)
    if large <= small or small >= T:
        bounds = [(small, 0, T)]
    else:
        bounds = [(small, 0, small), (large, small, T)]
    classes = []
    for bq, lo, hi in bounds:
        # At most n requests have q_len > lo; they hold at most `tokens` tokens, and each
        # needs ceil(q_len / bq) tiles, which sums to at most (tokens + n * (bq - 1)) // bq.
        n = min(R, T // (lo + 1))
        tokens = min(T, n * hi)
        bound = min(n * cdiv(hi, bq), (tokens + n * (bq - 1)) // bq)
        classes.append(TileClass(bq, lo, hi, max(1, bound)))
    return tuple(classes)


def plan_num_splits(
    *, num_tokens: int, num_rows: int, num_kv_heads: int, max_context: int, block_kv: int
) -> int:
    """How many programs share one tile's kv range (split-K), chosen from static shapes.

    Decode-like buckets (T <= 2R) with too few (request, kv head) programs to fill the GPU
    get splits, as long as each split keeps >= 2 loop steps of the longest context (shorter
    pieces pay a program's fixed latency chain, tile row -> block table -> K/V, for little
    streaming). Prefill-heavy buckets have many tiles already, and splitting them would only
    add partial-output traffic.
    """
    if num_tokens > 2 * num_rows:
        return 1
    programs = min(num_rows, num_tokens) * num_kv_heads
    splits = min(cdiv(TARGET_PROGRAMS, programs), MAX_KV_SPLITS, max_context // (2 * block_kv))
    return int(max(1, splits))


def plan_launches(
    *,
    num_tokens: int,
    num_rows: int,
    num_heads: int,
    num_kv_heads: int,
    decode_rows: int = 16,
    prefill_rows: int = 64,
    one_launch: bool = False,
    decode_one_class: bool = False,
) -> tuple[tuple[TileClass, ...], ...]:
    """The tile classes (`plan_tile_classes`) of each kernel launch: one launch per class, or
    all in one with the long-query class first (its programs are the longest, so they should
    start first). The first launch also zeroes the padding rows (a padding class after its
    own), so it can create the output buffer rather than fill one that a zeroing kernel
    made.

    `decode_one_class`: a decode-like bucket (T <= 2R) gets the short-query class only, so
    one launch where two would run, the second empty on an all-decode batch; a prefill chunk
    in such a bucket then takes small tiles (at most T tokens of them, each reading its
    request's K/V again), while prefill-heavy buckets keep both classes."""
    if decode_one_class and num_tokens <= 2 * num_rows:
        prefill_rows = decode_rows
    classes = plan_tile_classes(
        num_tokens=num_tokens,
        num_rows=num_rows,
        group_pow2=next_pow2(num_heads // num_kv_heads),
        decode_rows=decode_rows,
        prefill_rows=prefill_rows,
    )
    pad = padding_class(num_tokens, classes[0].block_q)
    if one_launch:
        return ((*classes[::-1], pad),)
    return ((classes[0], pad), *((c,) for c in classes[1:]))


def launch_tiles(
    cu_q_lens: jax.Array,  # i32[R+1]
    kv_lens: jax.Array,  # i32[R]
    num_reqs: jax.Array,  # i32[]
    classes: tuple[TileClass, ...],
) -> jax.Array:  # i32[sum of NT, 5]
    """The tile table of one launch: its classes' tables one after another."""
    tables = [build_tiles(cu_q_lens, kv_lens, num_reqs, c) for c in classes]
    return tables[0] if len(tables) == 1 else jnp.concatenate(tables)


def build_tiles(
    cu_q_lens: jax.Array,  # i32[R+1]
    kv_lens: jax.Array,  # i32[R]
    num_reqs: jax.Array,  # i32[]
    tile_class: TileClass,
) -> jax.Array:  # i32[NT, 5]: request, first packed token, token count, first position, NEW0
    """The tile table of one class: tile i covers tokens [start, start + count) of `req`.

    Tiles never straddle two requests; unused slots have count 0 (their programs exit).
    A padding class's tile i holds padding tokens [start, start + n) as count -n.
    """
    c = tile_class
    if c.padding:
        i = jnp.arange(c.num_tiles, dtype=jnp.int32)  # [NT]
        start = cu_q_lens[num_reqs] + i * c.block_q
        count = -jnp.clip(c.max_q - start, 0, c.block_q)
        zero = jnp.zeros_like(i)
        return jnp.stack((zero, start, count, zero, zero), axis=1).astype(jnp.int32)
    R = kv_lens.shape[0]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]  # [R]
    live = (jnp.arange(R) < num_reqs) & (q_lens > c.min_q) & (q_lens <= c.max_q)
    per_req = jnp.where(live, cdiv(q_lens, c.block_q), 0)  # [R]
    ends = jnp.cumsum(per_req)  # [R] inclusive prefix sums
    i = jnp.arange(c.num_tiles, dtype=jnp.int32)  # [NT]
    req = jnp.minimum(jnp.sum(ends[None, :] <= i[:, None], axis=1), R - 1)  # [NT]
    j = i - (ends[req] - per_req[req])  # tile index within its request
    count = jnp.minimum(c.block_q, q_lens[req] - j * c.block_q)
    tiles = (
        req,
        cu_q_lens[req] + j * c.block_q,
        jnp.where(i < ends[-1], count, 0),
        kv_lens[req] - q_lens[req] + j * c.block_q,
        kv_lens[req] - q_lens[req],
    )
    return jnp.stack(tiles, axis=1).astype(jnp.int32)


def tile_tables(
    cu_q_lens: jax.Array,  # i32[R+1]
    kv_lens: jax.Array,  # i32[R]
    num_reqs: jax.Array,  # i32[]
    *,
    num_tokens: int,
    num_heads: int,
    num_kv_heads: int,
    decode_rows: int = 16,
    prefill_rows: int = 64,
    one_launch: bool = False,
    decode_one_class: bool = False,
) -> tuple[jax.Array, ...]:  # one i32[NT, 5] table per launch
    """The kernel's work list for one batch, independent of layer and of the K/V values.

    A decoder computes this once per step and passes it (`tiles=`) to every layer's call,
    so the small integer passes that cut the batch into tiles (a cumsum and a few
    compares, each its own GPU kernel) run once rather than once per layer. The tuning
    arguments must be those of the calls that take it.
    """
    launches = plan_launches(
        num_tokens=num_tokens,
        num_rows=kv_lens.shape[0],
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        decode_rows=decode_rows,
        prefill_rows=prefill_rows,
        one_launch=one_launch,
        decode_one_class=decode_one_class,
    )
    return tuple(launch_tiles(cu_q_lens, kv_lens, num_reqs, launch) for launch in launches)


def combine_splits(
    o_parts: jax.Array,  # f32[NS, T, N, H], each split's output normalised by its own sum
    lse: jax.Array,  # f32[NS, T, N], log2-sum-exp2 of each split's scores (-inf if empty)
    cu_q_lens: jax.Array,  # i32[R+1]
    num_reqs: jax.Array,  # i32[]
    dtype: jnp.dtype,
) -> jax.Array:  # [T, N, H]; padding rows zero
    """Merge split-K partials: weight each split by its share of the softmax denominator."""
    T = o_parts.shape[1]
    m = jnp.max(lse, axis=0)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp2(lse - m)  # [NS, T, N]; rows of padding tokens were never written
    den = jnp.sum(w, axis=0)
    out = jnp.sum(w[..., None] * o_parts, axis=0) / jnp.where(den > 0, den, 1.0)[..., None]
    valid = jnp.arange(T) < cu_q_lens[num_reqs]
    return jnp.where(valid[:, None, None], out, 0.0).astype(dtype)


def validate_metadata(
    kv_lens,
    block_tables,
    cu_q_lens,
    num_reqs,
    *,
    num_tokens: int,
    page_size: int,
    num_pages: int,
) -> None:
    """Host-side value checks of one batch's metadata (numpy); raises ValueError.

    The kernel trusts these values (it clamps indices so a bad batch cannot read outside the
    cache, but the result would be wrong): call this in tests and when debugging a runner.
    """
    kv_lens, cu, bt = np.asarray(kv_lens), np.asarray(cu_q_lens), np.asarray(block_tables)
    n = int(num_reqs)
    if not 0 <= n <= kv_lens.shape[0]:
        raise ValueError(f"num_reqs={n} outside [0, {kv_lens.shape[0]}]")
    if cu[0] != 0 or np.any(np.diff(cu) < 0):
        raise ValueError(f"cu_q_lens must start at 0 and not decrease: {cu}")
    if cu[n] > num_tokens:
        raise ValueError(f"{cu[n]} real tokens exceed the token bucket {num_tokens}")
    q_lens = np.diff(cu)[:n]
    if np.any(q_lens > kv_lens[:n]):
        raise ValueError("a request has more new tokens than context (q_len > kv_len)")
    pages_needed = -(-kv_lens[:n] // page_size)
    if np.any(pages_needed > bt.shape[1]):
        raise ValueError("a context needs more pages than block_tables has columns")
    for r in range(n):
        used = bt[r, : pages_needed[r]]
        if np.any((used < 1) | (used >= num_pages)):
            raise ValueError(f"request {r} uses page ids outside [1, {num_pages}): {used}")
