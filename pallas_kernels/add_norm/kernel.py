"""Residual add and the norm after it in one Pallas kernel (Triton on GPU, interpret on CPU).

A decoder layer adds each block's output to the residual stream and normalises the sum for
the next block. As separate ops that is two kernels a block (an add, and a norm with its
reductions) of a few microseconds each at decode sizes, where the bytes take well under one
(GPT-2 at 128 rows: 196 KB a row block). This kernel reads x and delta once and writes both
the sum and its norm (vLLM's `fused_add_rms_norm` does the same in CUDA).

Programs take `block_rows` rows each; a row is loaded whole as a power-of-two block with the
columns past D masked (D = 768 loads as 1024), and the statistics use only real columns.
Same numbers as `reference.add_norm_ref`: the sum is rounded to x's dtype before the norm,
which runs in f32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _kernel(layer_ref, x_ref, delta_ref, scale_ref, *refs, block_rows, width, eps, layernorm):
    bias_ref = refs[0] if len(refs) == 3 else None
    y_ref, h_ref = refs[-2:]
    T, D = x_ref.shape
    row = pl.program_id(0) * block_rows + lax.broadcasted_iota(jnp.int32, (block_rows, 1), 0)
    col = lax.broadcasted_iota(jnp.int32, (1, width), 1)
    ok = (row < T) & (col < D)  # [BR, W]
    idx = (jnp.minimum(row, T - 1), jnp.minimum(col, D - 1))
    x = plgpu.load(x_ref.at[idx], mask=ok, other=0)
    delta = plgpu.load(delta_ref.at[idx], mask=ok, other=0)
    y = (x.astype(jnp.float32) + delta.astype(jnp.float32)).astype(x_ref.dtype)  # as x + delta
    yf = jnp.where(ok, y.astype(jnp.float32), 0.0)
    if layernorm:
        yf = jnp.where(ok, yf - jnp.sum(yf, axis=1, keepdims=True) / D, 0.0)
    inv = lax.rsqrt(jnp.sum(yf * yf, axis=1, keepdims=True) / D + eps)  # [BR, 1]
    at = (layer_ref[0], jnp.minimum(col, D - 1))  # row `layer` of the stacked [L, D] params
    h = yf * inv * plgpu.load(scale_ref.at[at]).astype(jnp.float32)
    if bias_ref is not None:
        h = h + plgpu.load(bias_ref.at[at]).astype(jnp.float32)
    # masked-off rows and columns point past the end, so even interpret mode drops them
    out = (jnp.where(row < T, row, T), jnp.where(col < D, col, D))
    plgpu.store(y_ref.at[out], y, mask=ok)
    plgpu.store(h_ref.at[out], h.astype(h_ref.dtype), mask=ok)


@functools.partial(
    jax.jit, static_argnames=("eps", "layernorm", "block_rows", "num_warps", "interpret")
)
def add_norm(
    x: jax.Array,  # [T, D]
    delta: jax.Array,  # [T, D]
    scale: jax.Array,  # [D], or [L, D] with `layer`
    bias: jax.Array | None,  # like scale, or None
    layer: jax.Array | int = 0,  # i32[]: which row of stacked [L, D] params
    *,
    eps: float,
    layernorm: bool,
    block_rows: int = 4,
    num_warps: int = 4,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:  # (x + delta, norm(x + delta)), [T, D] in x's dtype
    """`reference.add_norm_ref` in one kernel: LayerNorm (`layernorm`, with `bias`) or
    RMSNorm of the residual sum. `block_rows` rows per program (a power of two).

    A decoder scanning stacked layers passes the whole `[L, D]` norm params and the layer
    index: a row sliced out beforehand would be copied into its own buffer (a kernel of its
    own) before the call, as any custom call's operand is."""
    if x.ndim != 2 or delta.shape != x.shape or delta.dtype != x.dtype:
        raise ValueError(
            f"want x and delta [T, D] alike; got {x.shape} {x.dtype}, {delta.shape} {delta.dtype}"
        )
    T, D = x.shape
    if jnp.dtype(x.dtype) not in _DTYPES:
        raise ValueError(f"dtype must be f32, bf16 or f16; got {x.dtype}")
    for name, p in (("scale", scale), ("bias", bias)):
        if p is not None and (p.ndim not in (1, 2) or p.shape[-1] != D or p.shape != scale.shape):
            raise ValueError(f"{name} must be [{D}] or [L, {D}], both alike; got {list(p.shape)}")
    scale = scale.reshape(-1, D)  # [L, D]
    bias = None if bias is None else bias.reshape(-1, D)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    if block_rows < 1 or block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a power of two; got {block_rows}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    width = 1 << max(0, (D - 1).bit_length())  # D rounded up to a power of two
    inputs = (layer, x, delta, scale) if bias is None else (layer, x, delta, scale, bias)
    return pl.pallas_call(
        functools.partial(
            _kernel, block_rows=block_rows, width=width, eps=eps, layernorm=layernorm
        ),
        grid=(pl.cdiv(T, block_rows),),
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)] * 2,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name=f"add_{'layer' if layernorm else 'rms'}norm_r{block_rows}",
    )(*inputs)
