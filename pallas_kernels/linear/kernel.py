"""A linear layer and its epilogue in one Pallas kernel (Triton on GPU, interpret on CPU).

At decode sizes each of a layer's GEMMs reads megabytes of weights for a hundred-odd rows,
and XLA runs the bias add (and GPT-2's GELU) after it as kernels of their own, each a few
microseconds of launch and latency for well under one of bytes (RESULTS.md: the H200 gpt2
step profile). This kernel computes activation(x @ w + b) with the bias and activation
applied to the f32 accumulator before the one store.

It reads the decoder's stacked `[L, K, N]` weights (and `[L, N]` biases) at a layer index,
so a scan over layers slices nothing out of them first (a slice passed to a custom call is
a copy, and the scanned step spent 290 us a step on such copies of XLA's own GEMM inputs).

Programs tile the output in `block_m` x `block_n` blocks and loop over K in `block_k`
chunks; rows past M are masked. K must be a multiple of `block_k` and N of `block_n`
(`plan_blocks` picks blocks that divide them; `supports` says whether any does).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.linear.reference import ACTIVATIONS, activate

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Programs a launch should have at least, where the output allows it: the H100 and H200
# have 132 SMs, and a decode GEMM is bound by how fast its programs pull weights.
TARGET_PROGRAMS = 96


def supports(k: int, n: int, dtype) -> bool:
    """Whether the kernel takes [*, k] @ [k, n] in `dtype` (Triton's dot wants every block
    dimension a multiple of 16)."""
    return k % 16 == 0 and n % 16 == 0 and jnp.dtype(dtype) in map(jnp.dtype, _DTYPES)


def plan_blocks(m: int, k: int, n: int) -> tuple[int, int, int]:
    """(block_m, block_n, block_k) for an [m, k] @ [k, n] product: row blocks of up to 64,
    K chunks of 64 where they divide K, and columns 16 at a time up to 128 rows (the
    fastest of the H200 sweep at 128 rows for each of gpt2's three shapes, with 5 stages:
    RESULTS.md), else the widest column block that still gives `TARGET_PROGRAMS` programs."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_k = next(b for b in (64, 32, 16) if k % b == 0)
    row_blocks = -(-m // block_m)
    block_n = 16
    for cand in (128, 64, 32) if m > 128 else ():
        if n % cand == 0 and row_blocks * (n // cand) >= TARGET_PROGRAMS:
            block_n = cand
            break
    return block_m, block_n, block_k


def _kernel(layer_ref, x_ref, w_ref, *refs, block_m, block_n, block_k, activation, precision):
    b_ref = refs[0] if len(refs) == 2 else None
    y_ref = refs[-1]
    M, K = x_ref.shape
    layer = layer_ref[0]
    row = pl.program_id(0) * block_m + lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)
    col = pl.program_id(1) * block_n + lax.broadcasted_iota(jnp.int32, (1, block_n), 1)
    x_ok = jnp.broadcast_to(row < M, (block_m, block_k))
    x_row = jnp.minimum(row, M - 1)  # [BM, 1]
    kx = lax.broadcasted_iota(jnp.int32, (1, block_k), 1)  # K offsets along x's columns
    kw = lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)  # and along w's rows

    def chunk(c, acc):
        k0 = c * block_k
        x = plgpu.load(x_ref.at[x_row, k0 + kx], mask=x_ok, other=0)  # [BM, BK]
        w = plgpu.load(w_ref.at[layer, k0 + kw, col])  # [BK, BN]
        return acc + lax.dot_general(
            x, w, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )

    acc = lax.fori_loop(0, K // block_k, chunk, jnp.zeros((block_m, block_n), jnp.float32))
    if b_ref is not None:
        acc = acc + plgpu.load(b_ref.at[layer, col]).astype(jnp.float32)  # [1, BN]
    y = activate(acc, activation).astype(y_ref.dtype)
    ok = jnp.broadcast_to(row < M, (block_m, block_n))
    # masked-off rows point past the end, so even interpret mode drops them
    plgpu.store(y_ref.at[jnp.where(row < M, row, M), col], y, mask=ok)


@functools.partial(
    jax.jit,
    static_argnames=(
        "activation",
        "block_m",
        "block_n",
        "block_k",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def linear(
    x: jax.Array,  # [M, K]
    w: jax.Array,  # [K, N], or [L, K, N] with `layer`
    b: jax.Array | None,  # [N] or [L, N] (as w), or None
    layer: jax.Array | int = 0,  # i32[]: which of the stacked weights
    *,
    activation: str | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 5,
    interpret: bool | None = None,
) -> jax.Array:  # [M, N] in x's dtype
    """`reference.linear_ref(x, w[layer], b[layer], activation=...)` in one kernel. Blocks
    left None come from `plan_blocks`.

    A decoder scanning stacked layers passes the whole stacked weights and the layer index:
    a layer's weights sliced out beforehand would be copied before the call."""
    if x.ndim != 2 or w.ndim not in (2, 3) or w.shape[-2] != x.shape[1] or w.dtype != x.dtype:
        raise ValueError(
            f"want x [M, K] and w [K, N] or [L, K, N] of x's dtype; got x {x.shape} {x.dtype}, "
            f"w {w.shape} {w.dtype}"
        )
    M, K = x.shape
    N = w.shape[-1]
    if b is not None and (b.shape != (*w.shape[:-2], N)):
        raise ValueError(f"b must be {[*w.shape[:-2], N]} (as w); got {list(b.shape)}")
    if jnp.dtype(x.dtype) not in map(jnp.dtype, _DTYPES):
        raise ValueError(f"dtype must be f32, bf16 or f16; got {x.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")
    planned = plan_blocks(M, K, N)
    block_m = block_m or planned[0]
    block_n = block_n or planned[1]
    block_k = block_k or planned[2]
    for name, blk, dim in (("block_n", block_n, N), ("block_k", block_k, K)):
        if blk < 16 or blk & (blk - 1) or dim % blk:
            raise ValueError(f"{name}={blk} must be a power of two >= 16 dividing {dim}")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m} must be a power of two >= 16")
    w = w.reshape(-1, K, N)  # [L, K, N]
    b = None if b is None else b.reshape(-1, N)  # [L, N]
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    inputs = (layer, x, w) if b is None else (layer, x, w, b)
    kernel = functools.partial(
        _kernel,
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        activation=activation,
        precision=lax.Precision.HIGHEST if x.dtype == jnp.float32 else None,
    )
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(M, block_m), N // block_n),
        out_shape=jax.ShapeDtypeStruct((M, N), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"linear{'_bias' * (b is not None)}{'_' + activation if activation else ''}"
        f"_m{block_m}n{block_n}k{block_k}",
    )(*inputs)
