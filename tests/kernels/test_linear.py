"""The fused linear kernel (GEMM + bias + activation) against its jnp reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.linear.kernel import (
    TARGET_PROGRAMS,
    linear,
    linear_group,
    plan_blocks,
    supports,
)
from pallas_kernels.linear.reference import gated_ref, linear_ref
from pallas_kernels.sm90 import triton_calls, triton_ir_text

# max |error| relative to max |y|: both accumulate in f32, so what differs is the last
# rounding (and the order of the sums)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 8e-3, jnp.float16: 1e-3}


def _inputs(seed, M, K, N, L, dtype, bias=True):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    w = jnp.asarray(rng.standard_normal((L, K, N)) / np.sqrt(K), dtype)
    b = jnp.asarray(rng.standard_normal((L, N)), dtype) if bias else None
    return x, w, b


def _check(y, want, dtype):
    y, want = np.asarray(y, np.float32), np.asarray(want, np.float32)
    assert not np.isnan(y).any()
    np.testing.assert_allclose(y, want, atol=TOL[dtype] * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=str)
@pytest.mark.parametrize("activation", [None, "gelu_tanh"], ids=str)
@pytest.mark.parametrize(
    "M,K,N,blocks",
    [
        (128, 768, 768, {}),  # GPT-2's q / k / v / o at the decode bucket, planned blocks
        (13, 96, 48, {}),  # rows that fill no block; N a multiple of 16 only
        (40, 64, 64, dict(block_m=32, block_n=32, block_k=16)),  # a ragged last row block
        (16, 576, 192, {}),  # SmolLM2's k / v
    ],
)
def test_matches_reference(M, K, N, blocks, activation, dtype):
    """Every layer of a stack, fresh inputs each case; rows past M must not be written."""
    x, w, b = _inputs(M * K + N, M, K, N, 2, dtype)
    f = jax.jit(functools.partial(linear, activation=activation, **blocks))
    for layer in range(2):
        y = f(x, w, b, jnp.int32(layer))
        assert y.shape == (M, N) and y.dtype == dtype
        _check(y, linear_ref(x, w[layer], b[layer], activation=activation), dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=str)
def test_group_of_products_sharing_x(dtype):
    """A layer's q, k and v in one launch: widths 64, 32, 32 (GQA), the middle one without
    a bias; each output is its own product's, for every layer of the stack."""
    rng = np.random.default_rng(7)
    M, K, L = 40, 96, 3
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    ws = [jnp.asarray(rng.standard_normal((L, K, n)) / np.sqrt(K), dtype) for n in (64, 32, 32)]
    bs = [jnp.asarray(rng.standard_normal((L, n)), dtype) for n in (64, 32, 32)]
    bs[1] = None
    f = jax.jit(functools.partial(linear_group, block_n=16))
    for layer in range(L):
        ys = f(x, ws, bs, jnp.int32(layer))
        assert [y.shape for y in ys] == [(M, 64), (M, 32), (M, 32)]
        for y, w, b in zip(ys, ws, bs, strict=True):
            want = linear_ref(x, w[layer], None if b is None else b[layer])
            _check(y, want, dtype)


@pytest.mark.parametrize("activation", [None, "gelu_tanh"], ids=str)
@pytest.mark.parametrize("splits", [2, 4])
def test_split_k(splits, activation):
    """K's loop split over programs: their f32 partials summed, then bias and activation;
    rows that fill no block, a group of two products, every layer."""
    rng = np.random.default_rng(splits)
    M, K, L = 21, 256, 2
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.float32)
    ws = [jnp.asarray(rng.standard_normal((L, K, n)) / 16, jnp.float32) for n in (48, 16)]
    bs = [jnp.asarray(rng.standard_normal((L, n)), jnp.float32) for n in (48, 16)]
    kw = dict(activation=activation, num_k_splits=splits, block_k=32)
    f = jax.jit(functools.partial(linear_group, **kw))
    for layer in range(L):
        for y, w, b in zip(f(x, ws, bs, jnp.int32(layer)), ws, bs, strict=True):
            assert y.dtype == jnp.float32
            _check(y, linear_ref(x, w[layer], b[layer], activation=activation), jnp.float32)


def _norm_inputs(rng, M, K, L, dtype, norm):
    """Rows far from centred (offsets up to 50 standard deviations: the statistics must not
    cancel them away), one whose first 32 columns sit 50 above the rest (the shift the
    kernel takes from its first chunk is then far from the mean), one with GPT-2-like
    outlier columns, one of values near f16's limit under a norm scale of 8 (x * scale
    would overflow f16 before the normalising); norm scales and (LayerNorm's) biases per
    layer."""
    offset = rng.uniform(-50, 50, (M, 1)) if norm == "layernorm" else 0.0
    x = offset + rng.standard_normal((M, K))
    x[0, :32] += 50
    x[1, [5, 40, 77]] = [300, -250, 400]
    x[2] = np.clip(2e4 * rng.standard_normal(K), -6e4, 6e4)  # f16's range, times a scale 8
    x[2, 3] = 3e4
    x = jnp.asarray(x, dtype)
    scale = 1 + 0.3 * rng.standard_normal((L, K))
    scale[:, 3] = 8.0
    scale = jnp.asarray(scale, dtype)
    bias = jnp.asarray(rng.standard_normal((L, K)), dtype) if norm == "layernorm" else None
    return x, scale, bias


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=str)
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norm_before_and_residual_after(norm, dtype):
    """activation(norm(x) @ w + b) + residual, the norm's statistics over all of K (several
    chunks, summed beside the product), for every layer of the stack."""
    rng = np.random.default_rng(len(norm))
    M, K, N, L = 37, 128, 48, 2
    x, scale, nbias = _norm_inputs(rng, M, K, L, dtype, norm)
    _, w, b = _inputs(3, M, K, N, L, dtype)
    residual = jnp.asarray(10 * rng.standard_normal((M, N)), dtype)
    kw = dict(norm=norm, eps=1e-5, activation="gelu_tanh")
    f = jax.jit(functools.partial(linear, block_k=32, **kw))
    for layer in range(L):
        y = f(x, w, b, jnp.int32(layer), norm_scale=scale, norm_bias=nbias, residual=residual)
        assert y.shape == (M, N) and y.dtype == dtype
        nb = None if nbias is None else nbias[layer]
        want = linear_ref(
            x, w[layer], b[layer], norm_scale=scale[layer], norm_bias=nb, residual=residual, **kw
        )
        _check(y, want, dtype)
        no_residual = linear_ref(x, w[layer], b[layer], norm_scale=scale[layer], norm_bias=nb, **kw)
        assert np.abs(np.asarray(want, np.float32) - np.asarray(no_residual, np.float32)).max() > 1


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_group_with_norm(norm):
    """A layer's norm and its q, k and v in one launch (GQA widths, k without a bias)."""
    rng = np.random.default_rng(11)
    M, K, L, dtype = 20, 96, 2, jnp.bfloat16
    x, scale, nbias = _norm_inputs(rng, M, K, L, dtype, norm)
    ws = [jnp.asarray(rng.standard_normal((L, K, n)) / np.sqrt(K), dtype) for n in (64, 32, 32)]
    bs = [jnp.asarray(rng.standard_normal((L, n)), dtype) for n in (64, 32, 32)]
    bs[1] = None
    f = jax.jit(functools.partial(linear_group, norm=norm, block_n=16, block_k=32))
    for layer in range(L):
        ys = f(x, ws, bs, jnp.int32(layer), norm_scale=scale, norm_bias=nbias)
        nb = None if nbias is None else nbias[layer]
        for y, w, b in zip(ys, ws, bs, strict=True):
            b = None if b is None else b[layer]
            want = linear_ref(x, w[layer], b, norm=norm, norm_scale=scale[layer], norm_bias=nb)
            _check(y, want, dtype)


@pytest.mark.parametrize(
    "norm,dtype,splits",
    [
        ("rmsnorm", jnp.bfloat16, 1),  # Llama's: RMSNorm, gate and up without biases
        ("layernorm", jnp.float32, 1),  # column sums per product, biases on both
        (None, jnp.float16, 1),
        (None, jnp.float32, 4),  # split K: both partials stored, gated after the sum
    ],
    ids=str,
)
def test_gated_products(norm, dtype, splits):
    """A gated MLP's hidden layer in one launch: silu(norm(x) @ w_gate + b_gate) *
    (norm(x) @ w_up + b_up), one output, every layer of the stack (37 rows: a row block
    part-filled)."""
    rng = np.random.default_rng(5 + splits)
    M, K, N, L = 37, 128, 48, 2
    if norm is None:
        x = jnp.asarray(rng.standard_normal((M, K)), dtype)
        scale = nbias = None
    else:
        x, scale, nbias = _norm_inputs(rng, M, K, L, dtype, norm)
    ws = [jnp.asarray(rng.standard_normal((L, K, N)) / np.sqrt(K), dtype) for _ in range(2)]
    bs = [jnp.asarray(rng.standard_normal((L, N)), dtype) for _ in range(2)]
    if norm == "rmsnorm":
        bs = [None, None]
    kw = dict(norm=norm, activation="silu", gated=True, block_k=32, num_k_splits=splits)
    f = jax.jit(functools.partial(linear_group, **kw))
    for layer in range(L):
        (y,) = f(x, ws, bs, jnp.int32(layer), norm_scale=scale, norm_bias=nbias)
        assert y.shape == (M, N) and y.dtype == dtype
        b_gate, b_up = (None if b is None else b[layer] for b in bs)
        want = gated_ref(
            x,
            ws[0][layer],
            b_gate,
            ws[1][layer],
            b_up,
            norm=norm,
            norm_scale=None if scale is None else scale[layer],
            norm_bias=None if nbias is None else nbias[layer],
        )
        _check(y, want, dtype)
        # the gate's activation matters: silu of gate times up, not gate times up
        plain = gated_ref(x, ws[0][layer], b_gate, ws[1][layer], b_up, activation=None)
        if norm is None:
            assert np.abs(np.asarray(want, np.float32) - np.asarray(plain, np.float32)).max() > 0.1


@pytest.mark.parametrize(
    "norm,dtype,head_dim",
    [("rmsnorm", jnp.bfloat16, 64), (None, jnp.float32, 32), ("layernorm", jnp.float32, 64)],
    ids=str,
)
def test_rope_on_q_and_k(norm, dtype, head_dim):
    """q, k (GQA: half q's heads) and v in one launch, q and k leaving it rotated (rope
    after the bias, positions up to 4000 so the angles wrap), v plain; every layer."""
    rng = np.random.default_rng(head_dim)
    M, K, L = 21, 96, 2
    if norm is None:
        x, scale, nbias = jnp.asarray(rng.standard_normal((M, K)), dtype), None, None
    else:
        x, scale, nbias = _norm_inputs(rng, M, K, L, dtype, norm)
    widths = (4 * head_dim, 2 * head_dim, 2 * head_dim)
    ws = [jnp.asarray(rng.standard_normal((L, K, n)) / np.sqrt(K), dtype) for n in widths]
    bs = [jnp.asarray(rng.standard_normal((L, n)), dtype) for n in widths]
    positions = jnp.asarray(rng.integers(0, 4000, M), jnp.int32)
    kw = dict(norm=norm, rope=(True, True, False), rope_theta=10000.0, head_dim=head_dim)
    f = jax.jit(functools.partial(linear_group, block_k=32, **kw))
    for layer in range(L):
        ys = f(x, ws, bs, jnp.int32(layer), norm_scale=scale, norm_bias=nbias, positions=positions)
        norm_kw = dict(
            norm=norm,
            norm_scale=None if scale is None else scale[layer],
            norm_bias=None if nbias is None else nbias[layer],
        )
        for y, w, b, roped in zip(ys, ws, bs, kw["rope"], strict=True):
            rope_kw = dict(positions=positions, head_dim=head_dim) if roped else {}
            want = linear_ref(x, w[layer], b[layer], **norm_kw, **rope_kw)
            if dtype == jnp.float32 and roped:  # f32 sin / cos of angles in the thousands
                # differ by ~1e-4 between implementations (XLA's CPU ones included)
                y, want = np.asarray(y), np.asarray(want)
                np.testing.assert_allclose(y, want, atol=3e-4 * np.abs(want).max(), rtol=0)
            else:
                _check(y, want, dtype)
            if roped:  # the rotation counts
                plain = np.asarray(linear_ref(x, w[layer], b[layer], **norm_kw), np.float32)
                assert np.abs(plain - np.asarray(want, np.float32)).max() > 0.1


def test_no_bias_and_unstacked_weights():
    x, w, _ = _inputs(0, 24, 64, 32, 1, jnp.float32, bias=False)
    _check(linear(x, w[0], None), linear_ref(x, w[0], None), jnp.float32)


def test_activation_is_applied_to_the_biased_f32_sum():
    """GELU of (x @ w + b): a bias that moves values across zero changes the result."""
    x, w, b = _inputs(3, 16, 32, 16, 1, jnp.float32)
    y = linear(x, w, b + 3.0, activation="gelu_tanh")
    want = jax.nn.gelu(x @ w[0] + b[0] + 3.0, approximate=True)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_plan_blocks():
    # up to 128 rows: 16 columns a program (the H200 sweep's fastest at 128 rows)
    assert plan_blocks(128, 768, 3072) == (64, 16, 64, 1)  # 2 x 192 programs
    assert plan_blocks(16, 768, 768) == (16, 16, 64, 1)
    assert plan_blocks(128, 576, 192) == (64, 16, 64, 1)
    assert plan_blocks(128, 768, [768, 768, 768]) == (64, 16, 64, 1)  # q, k, v at once
    assert plan_blocks(128, 48, 16)[2] == 16
    # a long K loop is split 4 ways over 64-column programs (2 x 12 x 4 for gpt2's down)
    assert plan_blocks(128, 3072, 768) == (64, 64, 64, 4)
    assert plan_blocks(128, 3072, 96) == (64, 16, 64, 1)  # unless 64 columns do not divide N
    # more rows: column blocks narrow until the launch has TARGET_PROGRAMS programs
    assert plan_blocks(512, 768, 3072)[1] == 128  # 8 x 24 programs of 128 columns
    assert plan_blocks(256, 768, 768) == (64, 32, 64, 1)  # 4 x 24
    assert plan_blocks(256, 768, [768, 256, 256])[1] == 32  # 4 x 40 (64 columns: 4 x 20)
    for m, k, n in [(128, 768, 3072), (512, 768, 3072), (1024, 768, 768)]:
        bm, bn, bk, splits = plan_blocks(m, k, n)
        assert n % bn == 0 and k % bk == 0 and splits == 1
        if bn > 16:
            assert -(-m // bm) * (n // bn) >= TARGET_PROGRAMS


def test_supports_and_checks():
    assert supports(768, 2304, jnp.bfloat16) and not supports(768, 50257, jnp.bfloat16)
    assert not supports(768, 768, jnp.int8)
    x = jnp.zeros((8, 64))
    with pytest.raises(ValueError, match="want x"):
        linear(x, jnp.zeros((32, 16)), None)
    with pytest.raises(ValueError, match="of x's dtype"):
        linear(x, jnp.zeros((64, 16), jnp.bfloat16), None)
    with pytest.raises(ValueError, match=r"b must be \[2, 16\]"):
        linear(x, jnp.zeros((2, 64, 16)), jnp.zeros(16))
    with pytest.raises(ValueError, match="activation"):
        linear(x, jnp.zeros((64, 16)), None, activation="relu")
    with pytest.raises(ValueError, match="block_n=32 must be a power of two >= 16 dividing 16"):
        linear(x, jnp.zeros((64, 16)), None, block_n=32)
    with pytest.raises(ValueError, match="block_k=24"):
        linear(x, jnp.zeros((64, 16)), None, block_k=24)
    with pytest.raises(ValueError, match="block_m=8"):
        linear(x, jnp.zeros((64, 16)), None, block_m=8)
    with pytest.raises(ValueError, match="num_k_splits=3 must divide the 4 chunks"):
        linear(x, jnp.zeros((64, 16)), None, num_k_splits=3, block_k=16)
    with pytest.raises(ValueError, match="one bias"):
        linear_group(x, (jnp.zeros((64, 16)),), ())
    with pytest.raises(ValueError, match="stacked alike"):
        linear_group(x, (jnp.zeros((64, 16)), jnp.zeros((2, 64, 16))), (None, None))
    with pytest.raises(ValueError, match="dividing 32 and 16"):
        linear_group(x, (jnp.zeros((64, 32)), jnp.zeros((64, 16))), (None, None), block_n=32)
    w, w2 = jnp.zeros((2, 64, 16)), (jnp.zeros((64, 16)),) * 2
    with pytest.raises(ValueError, match="norm must be one of"):
        linear(x, w, None, norm="batchnorm", norm_scale=jnp.ones((2, 64)))
    with pytest.raises(ValueError, match="norm_scale .* go with norm"):
        linear(x, w, None, norm="rmsnorm")
    with pytest.raises(ValueError, match="norm_scale .* go with norm"):
        linear(x, w, None, norm_scale=jnp.ones((2, 64)))
    with pytest.raises(ValueError, match=r"norm_bias must be \[2, 64\]"):
        linear(x, w, None, norm="layernorm", norm_scale=jnp.ones((2, 64)), norm_bias=jnp.ones(64))
    with pytest.raises(
        ValueError, match=r"residual goes with one product, shaped as its output \[8, 16\]"
    ):
        linear(x, w, None, residual=jnp.zeros((8, 32)))
    with pytest.raises(ValueError, match="got 2 products"):
        linear_group(x, w2, (None, None), residual=jnp.zeros((8, 16)))
    with pytest.raises(ValueError, match="norm and rope need each program to see all of K"):
        linear(x, w, None, norm="rmsnorm", norm_scale=jnp.ones((2, 64)), num_k_splits=2)
    with pytest.raises(ValueError, match="gated takes two products of one shape"):
        linear_group(x, (jnp.zeros((64, 32)), jnp.zeros((64, 16))), (None, None), gated=True)
    with pytest.raises(ValueError, match="gated takes two products of one shape"):
        linear_group(x, w2, (None, None), gated=True, residual=jnp.zeros((8, 16)))
    pos = jnp.zeros(8, jnp.int32)
    w64 = (jnp.zeros((64, 64)),)
    with pytest.raises(ValueError, match="a flag per product"):
        linear_group(x, w64, (None,), rope=(True, False), head_dim=32, positions=pos)
    with pytest.raises(ValueError, match="head_dim a power of two >= 32"):
        linear_group(x, w64, (None,), rope=(True,), head_dim=24, positions=pos)
    with pytest.raises(ValueError, match="multiples of 64"):
        linear_group(x, (jnp.zeros((64, 96)),), (None,), rope=(True,), head_dim=64, positions=pos)
    with pytest.raises(ValueError, match=r"positions \[8\]"):
        linear_group(x, w64, (None,), rope=(True,), head_dim=32, positions=jnp.zeros(4))
    with pytest.raises(ValueError, match="block_n=32 must divide half the head dim 32"):
        linear_group(x, w64, (None,), rope=(True,), head_dim=32, positions=pos, block_n=32)
    with pytest.raises(ValueError, match="norm and rope need each program"):
        linear_group(x, w64, (None,), rope=(True,), head_dim=32, positions=pos, num_k_splits=2)


@pytest.mark.parametrize("activation", [None, "gelu_tanh"])
def test_lowers_to_triton_for_h100(activation):
    """GPT-2's up projection at the decode bucket lowers, without a GPU, to one verified
    Triton call for sm_90 with the planned grid, reading the stacked weights at the layer
    (no slice of them before the call) and storing once."""
    sds = jax.ShapeDtypeStruct
    args = (
        sds((128, 768), jnp.bfloat16),
        sds((12, 768, 3072), jnp.bfloat16),
        sds((12, 3072), jnp.bfloat16),
        sds((), jnp.int32),
    )
    fn = functools.partial(linear, activation=activation, interpret=False)
    ((op, launch, triton_ir),) = triton_calls(fn, args)
    assert launch == dict(grid_x=2, grid_y=192, grid_z=1, num_warps=4, num_stages=5)
    assert "tensor<12x768x3072xbf16>" in op  # the whole stack is the operand
    text = triton_ir_text(triton_ir)
    assert text.count("tt.dot ") == 1 and text.count("tt.store ") == 1, text
    assert ("tanh" in text) == (activation == "gelu_tanh")


def test_group_and_split_k_lower_to_triton_for_h100():
    """gpt2's q, k, v as one launch (3 x 48 column blocks of 16, one dot per product behind
    its branch) and its down projection split 4 ways (f32 partials, a [4, M, N] output)."""
    sds = jax.ShapeDtypeStruct
    x, w, b = (
        sds((128, 768), jnp.bfloat16),
        sds((12, 768, 768), jnp.bfloat16),
        sds((12, 768), jnp.bfloat16),
    )
    layer = sds((), jnp.int32)
    fn = functools.partial(linear_group, interpret=False)
    ((_, launch, triton_ir),) = triton_calls(
        lambda *a: fn(a[0], a[1:4], a[4:7], a[7]), (x, w, w, w, b, b, b, layer)
    )
    assert launch == dict(grid_x=2, grid_y=144, grid_z=1, num_warps=4, num_stages=5)
    assert triton_ir_text(triton_ir).count("tt.dot ") == 3
    down = sds((12, 3072, 768), jnp.bfloat16)
    fn = functools.partial(linear, num_k_splits=4, block_n=64, interpret=False)
    ((op, launch, _),) = triton_calls(fn, (sds((128, 3072), jnp.bfloat16), down, b, layer))
    assert launch == dict(grid_x=2, grid_y=12, grid_z=4, num_warps=4, num_stages=5)
    assert "tensor<4x128x768xf32>" in op


def test_norm_and_residual_lower_to_triton_for_h100():
    """gpt2's layer as the decoder launches it: the LayerNorm with q, k and v (the
    statistics loop, then three dots behind their branches), o with the residual add, the
    LayerNorm with up and GELU; each one verified Triton call for sm_90."""
    sds = jax.ShapeDtypeStruct
    x, w, b, g = (
        sds((128, 768), jnp.bfloat16),
        sds((12, 768, 768), jnp.bfloat16),
        sds((12, 768), jnp.bfloat16),
        sds((12, 768), jnp.bfloat16),
    )
    layer = sds((), jnp.int32)
    qkv = functools.partial(linear_group, norm="layernorm", interpret=False)
    o = functools.partial(linear, interpret=False)
    up = functools.partial(linear, norm="layernorm", activation="gelu_tanh", interpret=False)
    cases = [
        (
            lambda *a: qkv(a[0], a[1:4], a[4:7], a[7], norm_scale=a[8], norm_bias=a[9]),
            (x, w, w, w, b, b, b, layer, g, g),
            3,
            dict(grid_x=2, grid_y=144),
        ),
        (lambda *a: o(*a[:4], residual=a[4]), (x, w, b, layer, x), 1, dict(grid_x=2, grid_y=48)),
        (
            lambda *a: up(*a[:4], norm_scale=a[4], norm_bias=a[5]),
            (x, sds((12, 768, 3072), jnp.bfloat16), sds((12, 3072), jnp.bfloat16), layer, g, g),
            1,
            dict(grid_x=2, grid_y=192),
        ),
    ]
    for fn, args, dots, grid in cases:
        ((_, launch, triton_ir),) = triton_calls(fn, args)
        assert launch == dict(**grid, grid_z=1, num_warps=4, num_stages=5)
        text = triton_ir_text(triton_ir)
        assert text.count("tt.dot ") == dots and text.count("tt.store ") == dots, text


def test_gated_lowers_to_triton_for_h100():
    """SmolLM2's RMSNorm, gate and up at the decode bucket: one verified Triton call for
    sm_90, two dots a program (gate and up at its columns), one store, no product stored."""
    sds = jax.ShapeDtypeStruct
    x, w, g = (
        sds((128, 576), jnp.bfloat16),
        sds((30, 576, 1536), jnp.bfloat16),
        sds((30, 576), jnp.bfloat16),
    )
    fn = functools.partial(
        linear_group, norm="rmsnorm", activation="silu", gated=True, interpret=False
    )
    ((op, launch, triton_ir),) = triton_calls(
        lambda x, wg, wu, layer, g: fn(x, (wg, wu), (None, None), layer, norm_scale=g),
        (x, w, w, sds((), jnp.int32), g),
    )
    assert launch == dict(grid_x=2, grid_y=96, grid_z=1, num_warps=4, num_stages=5)
    assert "linear_rmsnorm_silu_gated" in op
    text = triton_ir_text(triton_ir)
    assert text.count("tt.dot ") == 2 and text.count("tt.store ") == 1, text


def test_rope_lowers_to_triton_for_h100():
    """SmolLM2's RMSNorm, q, k and v at the decode bucket with q and k rotated: one
    verified Triton call for sm_90; the roped products' branches take two dots (their
    columns and the partners in the other half of each head), v's one."""
    sds = jax.ShapeDtypeStruct
    x, g, pos = (
        sds((128, 576), jnp.bfloat16),
        sds((30, 576), jnp.bfloat16),
        sds((128,), jnp.int32),
    )
    wq, wkv = sds((30, 576, 576), jnp.bfloat16), sds((30, 576, 192), jnp.bfloat16)
    fn = functools.partial(
        linear_group,
        norm="rmsnorm",
        rope=(True, True, False),
        rope_theta=100000.0,
        head_dim=64,
        interpret=False,
    )
    ((op, launch, triton_ir),) = triton_calls(
        lambda x, q, k, v, layer, g, pos: fn(
            x, (q, k, v), (None,) * 3, layer, norm_scale=g, positions=pos
        ),
        (x, wq, wkv, wkv, sds((), jnp.int32), g, pos),
    )
    assert launch == dict(grid_x=2, grid_y=60, grid_z=1, num_warps=4, num_stages=5)
    assert "linear_rmsnorm_rope_x3" in op
    text = triton_ir_text(triton_ir)
    assert text.count("tt.dot ") == 5 and text.count("tt.store ") == 3, text.count("tt.dot ")
