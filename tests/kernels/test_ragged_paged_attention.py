"""The ragged paged attention kernel against its jnp reference.

On CPU the kernel runs in interpret mode (its default there); on a GPU the same tests run the
Triton kernel. Each config keeps one shape bucket (one compile) while the batch contents vary:
decode-only, prefill-only, mixed, and a full bucket with no padding. Every batch has contexts
ending mid-page, and the kernel sees a cache that is NaN outside the contexts (other layers
included) and NaN query rows for padding tokens, so it must read exactly the right slots.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention import partition as part
from pallas_kernels.ragged_paged_attention.kernel import _forward, ragged_paged_attention
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_ref
from pallas_kernels.ragged_paged_attention.testing import random_batch
from pallas_kernels.sm90 import attention_args, triton_calls, triton_ir_text

# Bucket shared by all configs: T tokens, R request rows, contexts up to CTX tokens.
T, R, CTX = 64, 8, 320

# (dtype, page size, N, K, H): every dtype meets every page size; GQA ratios 1, 2, 4 and 3.
CONFIGS = [
    (jnp.float32, 16, 4, 4, 32),
    (jnp.float32, 32, 8, 4, 32),
    (jnp.float32, 64, 8, 2, 16),
    (jnp.bfloat16, 16, 8, 2, 64),
    (jnp.bfloat16, 32, 4, 4, 64),
    (jnp.bfloat16, 64, 4, 2, 64),
    (jnp.float16, 16, 4, 2, 32),
    (jnp.float16, 32, 8, 2, 32),
    (jnp.float16, 64, 2, 2, 128),
    (jnp.bfloat16, 16, 9, 3, 64),  # SmolLM2-135M: 9 heads over 3 kv heads
]

# (q_lens, kv_lens) of the real requests; rows past them are padding requests.
SCENARIOS = {
    "decode": ([1] * 7, [1, 16, 17, 31, 200, 257, 320]),
    "prefill": ([24, 17, 3, 19], [300, 17, 3, 19]),  # a late chunk, then fresh prompts
    "mixed": ([37, 9, 13, 1, 1, 1, 1], [250, 9, 13, 129, 64, 7, 318]),
    "full": ([16, 1, 9, 1, 20, 1, 15, 1], [16, 111, 90, 33, 20, 2, 299, 128]),  # no padding
}

TOLERANCES = {  # dtype -> (relative L2 error, max abs error)
    jnp.float32: (1e-5, 1e-4),
    jnp.bfloat16: (1e-2, 5e-2),
    jnp.float16: (1e-3, 4e-3),
}


def _config_id(config):
    dtype, S, N, K, H = config
    return f"{jnp.dtype(dtype).name}-S{S}-N{N}K{K}-H{H}"


def _seed(*parts: str) -> int:
    return zlib.crc32("/".join(parts).encode())


# fp8 caches (kv_cache_dtype) under each compute dtype: (q dtype, cache dtype, S, N, K, H).
FP8_CONFIGS = [
    (jnp.bfloat16, jnp.float8_e4m3fn, 16, 9, 3, 64),
    (jnp.float16, jnp.float8_e4m3fn, 32, 8, 2, 32),
    (jnp.float32, jnp.float8_e5m2, 16, 4, 4, 32),
    (jnp.bfloat16, jnp.float8_e5m2, 64, 4, 2, 64),
]


def _fp8_id(config):
    dtype, cache_dtype, *geometry = config
    return _config_id((dtype, *geometry)) + "-" + jnp.dtype(cache_dtype).name


def _make_batch(seed, config, scenario, cache_dtype=None):
    dtype, S, N, K, H = config
    q_lens, kv_lens = SCENARIOS[scenario]
    MB = -(-CTX // S)
    return random_batch(
        np.random.default_rng(seed),
        q_lens=q_lens,
        kv_lens=kv_lens,
        num_tokens=T,
        num_rows=R,
        max_blocks=MB,
        num_heads=N,
        num_kv_heads=K,
        head_dim=H,
        page_size=S,
        dtype=dtype,
        num_pages=R * MB + 4,
        cache_dtype=cache_dtype,
    )


def _assert_matches_reference(batch, out):
    dtype = batch.q.dtype
    H = batch.q.shape[-1]
    ref = ragged_paged_attention_ref(*batch.args(), sm_scale=H**-0.5, cache_dtype=batch.cache_dtype)
    ref = np.asarray(ref, np.float32)
    out = np.asarray(out, np.float32)
    assert out.shape == ref.shape
    assert not np.isnan(out).any(), "NaN in the output"
    n = batch.num_real_tokens
    np.testing.assert_array_equal(out[n:], 0.0, err_msg="padding rows must be exactly 0")
    rel_tol, abs_tol = TOLERANCES[jnp.dtype(dtype).type]
    rel = np.linalg.norm(out[:n] - ref[:n]) / np.linalg.norm(ref[:n])
    assert rel < rel_tol, f"relative L2 error {rel:.2e}"
    np.testing.assert_allclose(out[:n], ref[:n], atol=abs_tol, rtol=0)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_matches_reference(config, scenario):
    batch = _make_batch(_seed(_config_id(config), scenario), config, scenario)
    H = config[-1]
    out = ragged_paged_attention(*batch.poisoned().args(), sm_scale=H**-0.5)
    _assert_matches_reference(batch, out)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("config", FP8_CONFIGS, ids=_fp8_id)
def test_fp8_cache_matches_reference(config, scenario):
    """fp8 bits (as uint8), widened in the kernel, against the reference over the same cache."""
    dtype, cache_dtype, *geometry = config
    batch = _make_batch(_seed(_fp8_id(config), scenario), (dtype, *geometry), scenario, cache_dtype)
    assert batch.k_cache.dtype == np.uint8
    out = ragged_paged_attention(
        *batch.poisoned().args(), sm_scale=geometry[-1] ** -0.5, cache_dtype=cache_dtype
    )
    _assert_matches_reference(batch, out)


@pytest.mark.parametrize("config", FP8_CONFIGS, ids=_fp8_id)
def test_reference_reads_fp8_as_its_widened_values(config):
    """fp8 -> q's dtype is exact, so the reference over fp8 bits equals the reference over
    those values widened beforehand by numpy's ml_dtypes (the plain same-dtype path): to the
    bit on the CPU; on a GPU, where XLA fuses the widening differently, to rounding (a wrong
    reading of the bits would be off by far more)."""
    dtype, cache_dtype, *geometry = config
    batch = _make_batch(5, (dtype, *geometry), "mixed", cache_dtype)
    wide = dataclasses.replace(
        batch,
        k_cache=np.asarray(batch.k_cache).view(cache_dtype).astype(dtype),
        v_cache=np.asarray(batch.v_cache).view(cache_dtype).astype(dtype),
        cache_dtype=None,
    )
    sm_scale = geometry[-1] ** -0.5
    out = ragged_paged_attention_ref(*batch.args(), sm_scale=sm_scale, cache_dtype=cache_dtype)
    want = ragged_paged_attention_ref(*wide.args(), sm_scale=sm_scale)
    out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(out, want)
    else:
        np.testing.assert_allclose(out, want, rtol=2e-2, atol=1e-6)
    with pytest.raises(ValueError, match="fp8 bits"):
        ragged_paged_attention_ref(*batch.args(), sm_scale=sm_scale)


@pytest.mark.parametrize("scenario", ["mixed", "decode", "prefill"])
@pytest.mark.parametrize(
    "window,tuning",
    [(1, {}), (5, dict(num_kv_splits=3)), (40, dict(block_kv=16)), (129, {}), (1000, {})],
)
def test_sliding_window_matches_reference(window, tuning, scenario):
    """Keys before each row's window are masked, and chunks before every row's window are
    skipped, also when split-K divides what is left (and a window longer than any context
    changes nothing)."""
    config = CONFIGS[9]  # SmolLM2's GQA, bf16
    batch = _make_batch(_seed(str(window), scenario), config, scenario)
    sm_scale = config[-1] ** -0.5
    args = batch.poisoned().args()
    out = ragged_paged_attention(*args, sm_scale=sm_scale, sliding_window=window, **tuning)
    ref = ragged_paged_attention_ref(*batch.args(), sm_scale=sm_scale, sliding_window=window)
    full = ragged_paged_attention_ref(*batch.args(), sm_scale=sm_scale)
    n = batch.num_real_tokens
    out, ref, full = (np.asarray(x, np.float32)[:n] for x in (out, ref, full))
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, ref, atol=TOLERANCES[jnp.bfloat16][1], rtol=0)
    assert (np.abs(ref - full).max() > 1e-2) == (window < max(SCENARIOS[scenario][1]))


# Tuning variants: split-K (with empty splits on short contexts), one page per loop step,
# small decode tiles for GQA, both tile classes in one launch (with and without splits),
# and one loop over the cache chunks.
VARIANTS = [
    (CONFIGS[0], dict(num_kv_splits=3)),
    (CONFIGS[9], dict(num_kv_splits=2, block_kv=64)),
    (CONFIGS[6], dict(block_kv=16, decode_rows=32, prefill_rows=32)),
    (CONFIGS[4], dict(one_launch=True)),
    (CONFIGS[9], dict(one_launch=True, num_kv_splits=2)),
    (CONFIGS[4], dict(one_loop=True, num_kv_splits=2)),  # masks on every cache chunk
]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize(
    "config,tuning", VARIANTS, ids=[f"{_config_id(c)}-{t}" for c, t in VARIANTS]
)
def test_tuning_variants_match_reference(config, tuning, scenario):
    batch = _make_batch(_seed(str(tuning), scenario), config, scenario)
    out = ragged_paged_attention(*batch.poisoned().args(), sm_scale=config[-1] ** -0.5, **tuning)
    _assert_matches_reference(batch, out)


@pytest.mark.parametrize("one_launch", [False, True])
@pytest.mark.parametrize("scenario", ["decode", "mixed", "full"])
def test_writes_every_row_once(scenario, one_launch):
    """Into a NaN-poisoned output buffer: real rows get their attention, padding rows zeros
    (from the padding tiles: no kernel zeroes the output first)."""
    config = CONFIGS[3]
    batch = _make_batch(7, config, scenario)
    forward = jax.jit(
        functools.partial(
            _forward,
            sm_scale=0.125,
            block_kv=None,
            decode_rows=16,
            prefill_rows=64,
            num_kv_splits=1,
            num_warps=4,
            num_stages=3,
            one_launch=one_launch,
            interpret=None,
        )
    )
    poison = jnp.full(batch.q.shape, jnp.nan, batch.q.dtype)
    out = np.asarray(forward(*batch.args(), poison), np.float32)
    n = batch.num_real_tokens
    assert not np.isnan(out[:n]).any(), "a real token's row was not written"
    np.testing.assert_array_equal(out[n:], 0.0, err_msg="a padding row was not zeroed")
    _assert_matches_reference(batch, out)


def test_inside_scan_over_layers():
    """As the decoder uses it: `layer` is a scan carry and the cache the full stacked array."""
    dtype, S, N, K, H = CONFIGS[5]
    batch = _make_batch(11, CONFIGS[5], "mixed")
    args = [jnp.asarray(a) for a in batch.args()]

    @jax.jit
    def all_layers(q, k, v, kv_lens, bt, cu, n):
        def body(layer, _):
            out = ragged_paged_attention(q, k, v, layer, kv_lens, bt, cu, n, sm_scale=0.125)
            return layer + 1, out

        return jax.lax.scan(body, jnp.int32(0), None, length=k.shape[0])[1]

    q, k, v, _, kv_lens, bt, cu, n = args
    outs = all_layers(q, k, v, kv_lens, bt, cu, n)
    for layer in range(k.shape[0]):
        ref = ragged_paged_attention_ref(
            q, k, v, jnp.int32(layer), kv_lens, bt, cu, n, sm_scale=0.125
        )
        np.testing.assert_allclose(
            np.asarray(outs[layer], np.float32), np.asarray(ref, np.float32), atol=6e-2
        )


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(H=48), "power of two"),
        (dict(H=8), "power of two"),
        (dict(S=8), "page size"),
        (dict(S=128), "page size"),
        (dict(N=10, K=4), "multiple of kv heads"),
        (dict(dtype=jnp.int8), "dtype"),
        (dict(cache_dtype=jnp.int8), "cache dtype"),
        (dict(dtype=jnp.float16, cache_dtype=jnp.bfloat16), "cache dtype"),
    ],
)
def test_shape_checks(change, match):
    shape = dict(T=8, N=4, K=2, H=32, L=2, P=8, S=16, R=2, MB=4, dtype=jnp.float32) | change
    args = attention_args(**shape)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(functools.partial(ragged_paged_attention, sm_scale=1.0), *args)


def test_dtype_and_index_checks():
    args = list(attention_args(8, 4, 2, 32, 2, 8, 16, 2, 4, jnp.float32))
    f = functools.partial(ragged_paged_attention, sm_scale=1.0)
    bad_cache = [args[0], *(jax.ShapeDtypeStruct(a.shape, jnp.bfloat16) for a in args[1:3])]
    with pytest.raises(ValueError, match="must match q dtype"):
        jax.eval_shape(f, *bad_cache, *args[3:])
    with pytest.raises(ValueError, match="cu_q_lens must be i32"):
        jax.eval_shape(f, *args[:6], jax.ShapeDtypeStruct((2,), jnp.int32), args[7])
    with pytest.raises(ValueError, match="block_kv"):
        jax.eval_shape(functools.partial(f, block_kv=8), *args)


def test_validate_metadata():
    batch = _make_batch(0, CONFIGS[0], "mixed")
    kw = dict(num_tokens=T, page_size=16, num_pages=batch.k_cache.shape[2])
    meta = (batch.kv_lens, batch.block_tables, batch.cu_q_lens, batch.num_reqs)
    part.validate_metadata(*meta, **kw)
    bad_kv = batch.kv_lens.copy()
    bad_kv[0] = 3  # fewer context tokens than new tokens
    with pytest.raises(ValueError, match="q_len > kv_len"):
        part.validate_metadata(bad_kv, *meta[1:], **kw)
    bad_bt = batch.block_tables.copy()
    bad_bt[1, 0] = 0  # the null page inside a context
    with pytest.raises(ValueError, match="page ids"):
        part.validate_metadata(meta[0], bad_bt, *meta[2:], **kw)
    with pytest.raises(ValueError, match="token bucket"):
        part.validate_metadata(*meta, **(kw | dict(num_tokens=8)))


def test_decode_one_class_plans_one_launch_for_decode_like_buckets_only():
    """decode_one_class: a bucket of T <= 2R tokens gets one launch (short-query tiles and
    the padding class), whose tile slots hold any batch of T tokens in 16-row tiles; a
    prefill-heavy bucket keeps its two launches."""
    kw = dict(num_heads=12, num_kv_heads=12, decode_one_class=True)
    (launch,) = part.plan_launches(num_tokens=128, num_rows=128, **kw)
    attend = [c for c in launch if not c.padding]
    # slots for 128 one-token tiles, or any mix of 128 tokens over up to 128 requests
    assert [(c.block_q, c.num_tiles) for c in attend] == [(16, 128)]
    assert len(part.plan_launches(num_tokens=256, num_rows=128, **kw)) == 1
    assert len(part.plan_launches(num_tokens=576, num_rows=128, **kw)) == 2
    assert len(part.plan_launches(num_tokens=128, num_rows=128, num_heads=12, num_kv_heads=12)) == 2


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("heads", [(12, 12), (9, 3)])  # gpt2, SmolLM2 (GQA)
def test_decode_one_class_launches_the_two_class_decode_kernel(heads, fused):
    """On a decode bucket, decode_one_class's one launch is the two-class plan's decode
    launch (the kernel the H200 timed): the same Triton IR and grid for an H100, only the
    empty prefill-class launch gone (its new keys in 16-key chunks, not 128)."""
    N, K = heads
    shape = dict(T=128, N=N, K=K, H=64, L=2, P=600, S=16, R=128, MB=32)
    args = attention_args(**shape, dtype=jnp.bfloat16, cache_dtype=jnp.bfloat16)
    new = jax.ShapeDtypeStruct((128, K, 64), jnp.bfloat16)

    def launches(**options):
        call = functools.partial(ragged_paged_attention, sm_scale=0.125, interpret=False)
        if fused:
            fn = lambda *a: call(*a[:8], new_kv=a[8:], **options)  # noqa: E731
            return triton_calls(fn, (*args, new, new))
        return triton_calls(functools.partial(call, **options), args)

    two, (one,) = launches(), launches(decode_one_class=True)
    assert len(two) == 2
    assert one[1] == two[0][1]  # grid, warps, stages
    assert triton_ir_text(one[2]) == triton_ir_text(two[0][2])


@pytest.mark.parametrize("prefill_rows", [64, 16])  # 16: one class (decode_one_class)
@pytest.mark.parametrize("group_pow2", [1, 4, 16])
def test_tiles_cover_every_real_token_once(group_pow2, prefill_rows):
    """The static tile-slot bounds hold on adversarial batches; tiles carry right positions;
    the padding class covers the rest of the bucket."""
    rng = np.random.default_rng(group_pow2)
    num_tokens, num_rows = 96, 24
    classes = part.plan_tile_classes(
        num_tokens=num_tokens,
        num_rows=num_rows,
        group_pow2=group_pow2,
        decode_rows=16,
        prefill_rows=prefill_rows,
    )
    small = classes[0].block_q
    shapes = [[1] * 24, [small + 1] * (96 // (small + 1)), [96], [small] * (96 // small)]
    shapes += [list(rng.integers(1, 20, size=rng.integers(1, 10))) for _ in range(12)]
    for q_lens in shapes:
        q_lens = [int(q) for q in q_lens if q][:num_rows]
        while sum(q_lens) > num_tokens:
            q_lens.pop()
        cu = np.zeros(num_rows + 1, np.int32)
        cu[1 : len(q_lens) + 1] = np.cumsum(q_lens)
        cu[len(q_lens) + 1 :] = cu[len(q_lens)]
        kv = np.zeros(num_rows, np.int32)
        kv[: len(q_lens)] = np.asarray(q_lens) + rng.integers(0, 50, size=len(q_lens))
        seen = np.zeros(num_tokens, int)
        for c in classes:
            tiles = np.asarray(
                part.build_tiles(jnp.asarray(cu), jnp.asarray(kv), jnp.int32(len(q_lens)), c)
            )
            assert tiles.shape == (c.num_tiles, part.NUM_TILE_FIELDS)
            for req, start, count, pos0, new0 in tiles[tiles[:, part.Q_COUNT] > 0]:
                assert cu[req] <= start and start + count <= cu[req + 1] and count <= c.block_q
                assert new0 == kv[req] - (cu[req + 1] - cu[req])
                assert pos0 == new0 + (start - cu[req])
                seen[start : start + count] += 1
        np.testing.assert_array_equal(seen, np.arange(num_tokens) < cu[-1], err_msg=q_lens)
        # the padding class: every padding token once, as negative counts
        pad = part.padding_class(num_tokens, classes[0].block_q)
        tiles = np.asarray(
            part.build_tiles(jnp.asarray(cu), jnp.asarray(kv), jnp.int32(len(q_lens)), pad)
        )
        assert tiles.shape == (pad.num_tiles, part.NUM_TILE_FIELDS)
        assert (tiles[:, part.Q_COUNT] <= 0).all()
        for _, start, count, _, _ in tiles[tiles[:, part.Q_COUNT] < 0]:
            seen[start : start - count] += 1
        np.testing.assert_array_equal(seen, 1, err_msg=q_lens)


def test_plan_num_splits():
    plan = functools.partial(part.plan_num_splits, num_kv_heads=12, block_kv=128)
    assert plan(num_tokens=8, num_rows=8, max_context=4096) > 1  # few long decodes: split
    assert plan(num_tokens=128, num_rows=128, max_context=512) == 1  # enough programs
    assert plan(num_tokens=8, num_rows=8, max_context=256) == 1  # too short to split
    assert plan(num_tokens=4096, num_rows=8, max_context=4096) == 1  # prefill bucket


@pytest.mark.parametrize(
    "name,shape,tuning",
    [  # a GQA decode bucket (planned split-K), a GQA prefill bucket, a cache over 4 GiB
        ("decode", dict(T=128, N=9, K=3, H=64, L=30, P=4200, S=16, R=128, MB=32), {}),
        ("smollm2", dict(T=1024, N=9, K=3, H=64, L=30, P=4096, S=16, R=64, MB=64), {}),
        (
            "huge",
            dict(T=256, N=32, K=8, H=128, L=40, P=40000, S=32, R=128, MB=128),
            dict(num_kv_splits=4),
        ),
        (  # a sliding window (Mistral): chunks before it skipped, the rest masked
            "sliding_window",
            dict(T=128, N=9, K=3, H=64, L=30, P=4200, S=16, R=128, MB=32),
            dict(sliding_window=100),
        ),
        (  # gpt2's decode bucket over an fp8 cache (kv_cache_dtype="fp8")
            "fp8",
            dict(T=128, N=12, K=12, H=64, L=12, P=4200, S=16, R=128, MB=32),
            dict(cache_dtype=jnp.float8_e4m3fn),
        ),
        (  # gpt2's mixed bucket, both tile classes in one launch
            "one_launch",
            dict(T=576, N=12, K=12, H=64, L=12, P=4200, S=16, R=128, MB=32),
            dict(one_launch=True),
        ),
        (  # gpt2's decode bucket, the kernel storing the step's K/V itself
            "fused_kv_write",
            dict(T=128, N=12, K=12, H=64, L=12, P=4200, S=16, R=128, MB=32),
            dict(fused=True),
        ),
        (  # gpt2's decode bucket, one masked loop over the cache chunks
            "one_loop",
            dict(T=128, N=12, K=12, H=64, L=12, P=4200, S=16, R=128, MB=32),
            dict(fused=True, one_loop=True),
        ),
        (  # and into an fp8 cache, both classes in one launch, split-K
            "fused_kv_write_fp8",
            dict(T=576, N=12, K=12, H=64, L=12, P=4200, S=16, R=128, MB=32),
            dict(fused=True, one_launch=True, num_kv_splits=2, cache_dtype=jnp.float8_e4m3fn),
        ),
    ],
)
def test_lowers_to_triton_for_h100(name, shape, tuning):
    """The kernel lowers, without a GPU, to verified Triton IR for an H100 (sm_90).

    Proves: every kernel op has a Triton lowering (a `jnp` op Triton cannot express, a
    non-power-of-two block, a bad dot shape or a mixed-type dot fails here), the pallas_call
    becomes XLA's Triton custom call with the grid, warps and stages we planned, and the
    Triton module passes MLIR verification with the loops kept as `scf.for` and four dots
    (QK and PV in the unmasked and the masked loop). Cannot prove: Triton's own passes down
    to PTX (layouts, shared-memory budget, software pipelining), nor results or speed: those
    need the GPU run (`experiments/gpu_check.sh`).
    """
    dtype = jnp.bfloat16
    tuning = dict(tuning)
    fused = tuning.pop("fused", False)  # new K/V [T, K, H] in, stored by the kernel
    fp8 = "cache_dtype" in tuning  # the caches hold fp8 bits as uint8
    args = attention_args(**shape, dtype=dtype, cache_dtype=jnp.uint8 if fp8 else dtype)
    call = functools.partial(ragged_paged_attention, sm_scale=0.125, interpret=False, **tuning)
    if fused:
        new = jax.ShapeDtypeStruct((shape["T"], shape["K"], shape["H"]), dtype)
        args = (*args, new, new)
        fn = lambda *a: call(*a[:8], new_kv=a[8:])  # noqa: E731
    else:
        fn = call
    calls = triton_calls(fn, args)
    planned = part.plan_launches(
        num_tokens=shape["T"],
        num_rows=shape["R"],
        num_heads=shape["N"],
        num_kv_heads=shape["K"],
        one_launch=tuning.get("one_launch", False),
    )
    splits = tuning.get("num_kv_splits") or part.plan_num_splits(
        num_tokens=shape["T"],
        num_rows=shape["R"],
        num_kv_heads=shape["K"],
        max_context=shape["MB"] * shape["S"],
        block_kv=part.default_block_kv(dtype, shape["H"], shape["S"]),
    )
    # (programs along the grid's tile axis, attending tile classes, zeroing padding) per launch
    launches = [
        (
            sum(c.num_tiles for c in launch),
            sum(not c.padding for c in launch),
            splits == 1 and any(c.padding for c in launch),
        )
        for launch in planned
    ]
    assert len(calls) == len(launches)
    for (op_text, launch, triton_ir), (num_tiles, num_classes, zeroes) in zip(
        calls, launches, strict=True
    ):
        # fused: the caches (operands 3 and 4) are the call's last two outputs, in place
        aliased = re.findall(r"output_tuple_indices = \[(\d+)\], operand_index = (\d+)", op_text)
        n_out = (1 if splits == 1 else 2) + 2 * fused
        if fused:
            assert {(str(n_out - 2), "3"), (str(n_out - 1), "4")} <= set(aliased), aliased
        assert launch == dict(
            grid_x=num_tiles, grid_y=shape["K"], grid_z=splits, num_warps=4, num_stages=3
        )
        text = triton_ir_text(triton_ir)  # verified
        # per class: QK and PV dots in the unmasked and the masked loop (and the new keys');
        # one_loop: the masked loop only
        loops = (1 if tuning.get("one_loop") else 2) + fused
        assert text.count("tt.dot ") == 2 * loops * num_classes, text
        assert text.count("scf.for ") == loops * num_classes, text
        # per class: the output (and, fused, K and V rows into the cache; with splits, lse)
        # (the padding tiles' zeros: one store more)
        stores = (1 + (splits > 1) + 2 * fused) * num_classes + zeroes
        assert text.count("tt.store ") == stores, text
        item = 1 if fp8 else 2
        cache_bytes = item * shape["L"] * shape["K"] * shape["P"] * shape["S"] * shape["H"]
        wide = re.findall(r"tt\.addptr .*!tt\.ptr<(?:bf16|i8)>>, tensor<[0-9x]+xi64>", text)
        assert bool(wide) == (cache_bytes > 2**32), "64-bit K/V offsets iff the cache > 4 GiB"
        if fp8:  # byte loads (K and V, unmasked and masked), bitcast to fp8, then widened;
            # fused: the new K/V rounded to fp8 and back, and their bits stored (a store
            # into a ref lowers as a swap: a load, dead, then the store)
            per_class = 4 + 2 * fused
            assert len(re.findall(r"tt\.load .*!tt\.ptr<i8>>", text)) == per_class * num_classes
            widen = re.findall(r"tt\.fp_to_fp .*f8E4M3FN.* -> .*bf16", text)
            assert len(widen) == per_class * num_classes, text
            narrow = re.findall(r"tt\.fp_to_fp .* -> tensor<[0-9x]+xf8E4M3FN>", text)
            assert len(narrow) == 4 * fused * num_classes, text  # round trip and store, K and V
            i8_stores = re.findall(r"tt\.store .*!tt\.ptr<i8>>", text)
            assert len(i8_stores) == 2 * fused * num_classes, text
