"""The fused residual add + norm kernel against its jnp reference (the decoder's own norm)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.add_norm.kernel import add_norm
from pallas_kernels.add_norm.reference import add_norm_ref
from pallas_kernels.sm90 import triton_calls, triton_ir_text

TOL = {jnp.float32: 2e-6, jnp.bfloat16: 1.6e-2, jnp.float16: 2e-3}  # max abs, |h| ~ 1-4


def _inputs(seed, T, D, dtype, layernorm):
    rng = np.random.default_rng(seed)
    x, delta = (jnp.asarray(rng.standard_normal((T, D)) * 3, dtype) for _ in "xd")
    scale = jnp.asarray(1 + 0.1 * rng.standard_normal(D), dtype)
    bias = jnp.asarray(0.1 * rng.standard_normal(D), dtype) if layernorm else None
    return x, delta, scale, bias


@pytest.mark.parametrize("layernorm", [True, False], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=str)
@pytest.mark.parametrize(
    "T,D,block_rows",
    [(128, 768, 4), (13, 768, 4), (1, 576, 1), (37, 64, 16), (128, 960, 8)],
)
def test_matches_reference(T, D, block_rows, dtype, layernorm):
    """GPT-2's width (768: a 1024-column block, masked), SmolLM2's (576), rows that do not
    fill the last program; the sum exactly, the norm to the dtype's rounding."""
    args = _inputs(T * D + block_rows, T, D, dtype, layernorm)
    kw = dict(eps=1e-5, layernorm=layernorm)
    y, h = add_norm(*args, block_rows=block_rows, **kw)
    y_ref, h_ref = add_norm_ref(*args, **kw)
    assert y.dtype == h.dtype == dtype and y.shape == h.shape == (T, D)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    h, h_ref = np.asarray(h, np.float32), np.asarray(h_ref, np.float32)
    assert not np.isnan(h).any()
    np.testing.assert_allclose(h, h_ref, atol=TOL[dtype], rtol=0)
    # the statistics are the rows' own: a row of a constant shift normalises the same
    if layernorm:
        x, delta, scale, bias = args
        _, shifted = add_norm(x + 1, delta, scale, bias, block_rows=block_rows, **kw)
        np.testing.assert_allclose(np.asarray(shifted, np.float32), h, atol=20 * TOL[dtype])


@pytest.mark.parametrize("layernorm", [True, False])
def test_stacked_params_row_by_layer(layernorm):
    """A decoder passes every layer's norm params [L, D] and the layer index (traced, as in
    a scan), not a sliced row."""
    x, delta, _, _ = _inputs(0, 16, 768, jnp.bfloat16, layernorm)
    rng = np.random.default_rng(1)
    scale = jnp.asarray(1 + 0.1 * rng.standard_normal((3, 768)), jnp.bfloat16)
    bias = jnp.asarray(0.1 * rng.standard_normal((3, 768)), jnp.bfloat16) if layernorm else None
    kw = dict(eps=1e-5, layernorm=layernorm)
    f = jax.jit(lambda layer: add_norm(x, delta, scale, bias, layer, **kw))
    for layer in range(3):
        _, h = f(jnp.int32(layer))
        row_bias = None if bias is None else bias[layer]
        _, want = add_norm_ref(x, delta, scale[layer], row_bias, **kw)
        np.testing.assert_allclose(
            np.asarray(h, np.float32), np.asarray(want, np.float32), atol=TOL[jnp.bfloat16]
        )


def test_checks():
    x = jnp.zeros((8, 64))
    f = functools.partial(add_norm, eps=1e-5, layernorm=False)
    with pytest.raises(ValueError, match="alike"):
        f(x, jnp.zeros((8, 32)), jnp.ones(64), None)
    with pytest.raises(ValueError, match=r"scale must be \[64\] or \[L, 64\]"):
        f(x, x, jnp.ones(32), None)
    with pytest.raises(ValueError, match="both alike"):
        f(x, x, jnp.ones((2, 64)), jnp.ones(64))
    with pytest.raises(ValueError, match="power of two"):
        f(x, x, jnp.ones(64), None, block_rows=3)
    with pytest.raises(ValueError, match="dtype"):
        f(x.astype(jnp.int32), x.astype(jnp.int32), jnp.ones(64), None)


@pytest.mark.parametrize("layernorm", [True, False])
def test_lowers_to_triton_for_h100(layernorm):
    """GPT-2's decode bucket lowers, without a GPU, to one verified Triton call for sm_90
    with the planned grid: the programs of 4 rows each that the bucket needs."""
    sds = jax.ShapeDtypeStruct
    args = (sds((128, 768), jnp.bfloat16),) * 2 + (sds((768,), jnp.bfloat16),)
    args += (sds((768,), jnp.bfloat16),) if layernorm else ()
    fn = functools.partial(add_norm, eps=1e-5, layernorm=layernorm, interpret=False)
    calls = triton_calls(lambda *a: fn(*a[:3], a[3] if layernorm else None), args)
    ((_, launch, triton_ir),) = calls
    assert launch == dict(grid_x=32, grid_y=1, grid_z=1, num_warps=4, num_stages=1)
    text = triton_ir_text(triton_ir)  # verified
    assert text.count("tt.store ") == 2 and "tensor<4x1024x" in text, text
