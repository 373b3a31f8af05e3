"""The kernel storing the step's K/V itself (`new_kv=`) against scatter-then-reference.

The cache handed to the kernel is NaN everywhere the kernel must not read: outside the
contexts (other layers included) and at every slot this step writes. So the kernel must
take this step's keys from the new K/V rows, never from their slots, and the cache it
returns must equal the old one with exactly those slots written (as the cache stores them:
fp8 caches hold rounded bits).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.ragged_paged_attention import cache_codec
from pallas_kernels.ragged_paged_attention import partition as part
from pallas_kernels.ragged_paged_attention.kernel import ragged_paged_attention
from pallas_kernels.ragged_paged_attention.reference import (
    ragged_paged_attention_ref,
    token_metadata,
)
from tests.kernels.test_ragged_paged_attention import (
    CONFIGS,
    FP8_CONFIGS,
    SCENARIOS,
    TOLERANCES,
    _config_id,
    _fp8_id,
    _make_batch,
    _seed,
)


def _new_kv(batch, seed):
    T, _, H = batch.q.shape
    K = batch.k_cache.shape[1]
    rng = np.random.default_rng(seed)
    k, v = (rng.standard_normal((T, K, H), np.float32).astype(batch.q.dtype) for _ in "kv")
    return jnp.asarray(k), jnp.asarray(v)


def _written(batch, cache, new):
    """`cache` with each real token's `new` row stored at its slot; padding writes nothing."""
    T, S = batch.q.shape[0], cache.shape[3]
    req, pos, valid = token_metadata(
        jnp.asarray(batch.cu_q_lens), jnp.asarray(batch.kv_lens), jnp.asarray(batch.num_reqs), T
    )
    page = jnp.where(valid, jnp.asarray(batch.block_tables)[req, pos // S], cache.shape[2])
    stored = cache_codec.encode(new, batch.cache_dtype or batch.q.dtype)
    return jnp.asarray(cache).at[int(batch.layer), :, page, pos % S].set(stored, mode="drop")


def _check(batch, new_kv, **tuning):
    """Run the fused kernel on a poisoned cache; compare output and caches."""
    H = batch.q.shape[-1]
    poisoned = batch.poisoned()
    nan = jnp.full(new_kv[0].shape, jnp.nan, batch.q.dtype)  # this step's slots: NaN
    before = [_written(batch, c, nan) for c in (poisoned.k_cache, poisoned.v_cache)]
    args = list(poisoned.args())
    args[1:3] = before
    out, k_cache, v_cache = ragged_paged_attention(
        *args, sm_scale=H**-0.5, new_kv=new_kv, cache_dtype=batch.cache_dtype, **tuning
    )
    want_k, want_v = (_written(batch, c, x) for c, x in zip(before, new_kv, strict=True))
    for got, want in ((k_cache, want_k), (v_cache, want_v)):  # f32 view: NaN equals NaN
        wide = np.uint8 if got.dtype == np.uint8 else np.float32
        np.testing.assert_array_equal(np.asarray(got, wide), np.asarray(want, wide))
    ref_args = list(batch.args())
    ref_args[1:3] = [_written(batch, c, x) for c, x in zip(ref_args[1:3], new_kv, strict=True)]
    ref = ragged_paged_attention_ref(
        *ref_args, sm_scale=H**-0.5, cache_dtype=batch.cache_dtype, **tuning_ref(tuning)
    )
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    n = batch.num_real_tokens
    assert not np.isnan(out).any(), "NaN in the output: a poisoned slot was read"
    np.testing.assert_array_equal(out[n:], 0.0, err_msg="padding rows must be exactly 0")
    rel_tol, abs_tol = TOLERANCES[jnp.dtype(batch.q.dtype).type]
    assert np.linalg.norm(out[:n] - ref[:n]) / np.linalg.norm(ref[:n]) < rel_tol
    np.testing.assert_allclose(out[:n], ref[:n], atol=abs_tol, rtol=0)


def tuning_ref(tuning):
    return {k: v for k, v in tuning.items() if k == "sliding_window"}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_fused_write_matches_scatter_then_reference(config, scenario):
    seed = _seed("fused", _config_id(config), scenario)
    batch = _make_batch(seed, config, scenario)
    _check(batch, _new_kv(batch, seed))


@pytest.mark.parametrize("scenario", ["mixed", "prefill"])
@pytest.mark.parametrize("config", FP8_CONFIGS, ids=_fp8_id)
def test_fused_write_into_fp8_cache(config, scenario):
    """The kernel stores saturated fp8 bits and attends to the rounded values it stored."""
    dtype, cache_dtype, *geometry = config
    seed = _seed("fused", _fp8_id(config), scenario)
    batch = _make_batch(seed, (dtype, *geometry), scenario, cache_dtype)
    k, v = _new_kv(batch, seed)
    _check(batch, (k * 300, v))  # some keys past e4m3's 448: saturate, not NaN


# split-K (including splits that get only new keys), one launch for both classes, one
# page per loop step, small tiles, sliding windows that start inside the new keys, one loop
VARIANTS = [
    (CONFIGS[0], dict(num_kv_splits=3)),
    (CONFIGS[9], dict(num_kv_splits=4, block_kv=32)),
    (CONFIGS[4], dict(one_launch=True)),
    (CONFIGS[9], dict(one_launch=True, num_kv_splits=2)),
    (CONFIGS[6], dict(block_kv=16, decode_rows=32, prefill_rows=32)),
    (CONFIGS[9], dict(sliding_window=5)),
    (CONFIGS[3], dict(sliding_window=40, num_kv_splits=3)),
    # one masked loop over the cache chunks (splits with and without new keys; a window)
    (CONFIGS[0], dict(one_loop=True)),
    (CONFIGS[9], dict(one_loop=True, num_kv_splits=3, block_kv=32)),
    (CONFIGS[3], dict(one_loop=True, sliding_window=40)),
]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize(
    "config,tuning", VARIANTS, ids=[f"{_config_id(c)}-{t}" for c, t in VARIANTS]
)
def test_fused_write_tuning_variants(config, tuning, scenario):
    seed = _seed("fused", str(tuning), scenario)
    batch = _make_batch(seed, config, scenario)
    _check(batch, _new_kv(batch, seed), **tuning)


def test_precomputed_tiles_are_what_the_call_would_build():
    """`tile_tables` once per step, passed to the call, gives the call's own result; tables
    planned for another launch layout are refused."""
    config = CONFIGS[9]
    batch = _make_batch(3, config, "mixed")
    T, N, _ = batch.q.shape
    meta = [jnp.asarray(x) for x in (batch.cu_q_lens, batch.kv_lens, batch.num_reqs)]
    plan = functools.partial(part.tile_tables, *meta, num_tokens=T, num_heads=N, num_kv_heads=3)
    f = functools.partial(ragged_paged_attention, *batch.args(), sm_scale=0.125)
    for one_launch in (False, True):
        tiles = plan(one_launch=one_launch)
        assert len(tiles) == (1 if one_launch else 2)
        got = f(tiles=tiles, one_launch=one_launch)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(f(one_launch=one_launch)))
    with pytest.raises(ValueError, match="tile tables for"):
        f(tiles=plan(one_launch=True), one_launch=False)


def test_new_kv_checks():
    batch = _make_batch(0, CONFIGS[0], "decode")
    k, v = _new_kv(batch, 0)
    f = functools.partial(ragged_paged_attention, *batch.args(), sm_scale=1.0)
    with pytest.raises(ValueError, match=r"new k must be float32\[64, 4, 32\]"):
        jax.eval_shape(lambda: f(new_kv=(k[:8], v)))
    with pytest.raises(ValueError, match="new v must be float32"):
        jax.eval_shape(lambda: f(new_kv=(k, v.astype(jnp.bfloat16))))
    with pytest.raises(ValueError, match="new_kv must be"):
        jax.eval_shape(lambda: f(new_kv=(k,)))
