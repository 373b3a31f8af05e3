"""A linear layer and its epilogue in one Pallas kernel (Triton on GPU, interpret on CPU).

At decode sizes each of a layer's GEMMs reads megabytes of weights for a hundred-odd rows,
and XLA runs the bias add (and GPT-2's GELU) after it as kernels of their own, each a few
microseconds of launch and latency for well under one of bytes (RESULTS.md: the H200 gpt2
step profile). This kernel computes activation(x @ w + b) with the bias and activation
applied to the f32 accumulator before the one store.

Its neighbours can come in too: `norm` normalises x's rows (LayerNorm or RMSNorm: the
statistics summed in the product's own loop over x, applied in the epilogue, so x is read
once) and `residual` is added last, so a decoder layer's linear work is four launches:
the norm with q, k and v (`rope`: q and k rotated); o with the residual add; the norm with
up (and GELU), or with a gated MLP's gate and up (`gated`: silu(gate) * up stored, neither
product); down with the residual add. XLA otherwise runs each norm, rotation, add and
gating as a kernel of its own.

It reads the decoder's stacked `[L, K, N]` weights (and `[L, N]` biases) at a layer index,
so a scan over layers slices nothing out of them first (a slice passed to a custom call is
a copy, and the scanned step spent 290 us a step on such copies of XLA's own GEMM inputs).

Programs tile the output in `block_m` x `block_n` blocks and loop over K in `block_k`
chunks; rows past M are masked. K must be a multiple of `block_k` and N of `block_n`
(`plan_blocks` picks blocks that divide them; `supports` says whether any does).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.linear.reference import ACTIVATIONS, NORMS, activate, rope_inv_freq

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Programs a launch should have at least, where the output allows it: the H100 and H200
# have 132 SMs, and a decode GEMM is bound by how fast its programs pull weights.
TARGET_PROGRAMS = 96


def supports(k: int, n: int, dtype) -> bool:
    """Whether the kernel takes [*, k] @ [k, n] in `dtype` (Triton's dot wants every block
    dimension a multiple of 16)."""
    return k % 16 == 0 and n % 16 == 0 and jnp.dtype(dtype) in map(jnp.dtype, _DTYPES)


def supports_rope(head_dim: int) -> bool:
    """Whether the kernel can rotate heads this wide (a 16-column block must fit in half)."""
    return head_dim >= 32 and not head_dim & (head_dim - 1)


def plan_blocks(m: int, k: int, n: int | Sequence[int]) -> tuple[int, int, int, int]:
    """(block_m, block_n, block_k, num_k_splits) for [m, k] @ [k, n] (or several products
    sharing x, of widths `n`): row blocks of up to 64 and K chunks of 64 where they divide K.

    Up to 128 rows, columns 16 at a time: the fastest of the H200 sweep at 128 rows for
    each of gpt2's three shapes (with 5 stages; RESULTS.md). Even so, a long K loop (gpt2's
    down projection, K = 3072: 48 chunks a program) took 11.6 us against XLA's 7.8, so
    from 2048 on K is split 4 ways over 64-column programs (not yet measured: the sweep in
    bench_linear.py times it beside the rest). More rows: the widest column block dividing
    every width that still gives `TARGET_PROGRAMS` programs."""
    ns = (n,) if isinstance(n, int) else tuple(n)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_k = next(b for b in (64, 32, 16) if k % b == 0)
    row_blocks = -(-m // block_m)
    if m <= 128:
        split = k >= 2048 and (k // block_k) % 4 == 0 and not any(w % 64 for w in ns)
        return (block_m, 64, block_k, 4) if split else (block_m, 16, block_k, 1)
    block_n = 16
    for cand in (128, 64, 32):
        if not any(w % cand for w in ns) and row_blocks * (sum(ns) // cand) >= TARGET_PROGRAMS:
            block_n = cand
            break
    return block_m, block_n, block_k, 1


def _kernel(
    layer_ref,
    x_ref,
    *refs,
    widths,
    has_bias,
    norm,
    has_norm_bias,
    eps,
    has_residual,
    block_m,
    block_n,
    block_k,
    splits,
    activation,
    gated,
    roped,
    rope_dim,
    precision,
):
    """Program (i, j, s): rows i, column block j of the concatenated outputs (so of one
    product; gated, of both), K range s; stores activation(norm(x) @ w + b) (+ residual),
    gated activation(norm(x) @ w_gate + b_gate) * (norm(x) @ w_up + b_up), or, split, the
    f32 partial sums. A product in `roped` gets the rotary embedding of each `rope_dim`-wide
    head (rotate-half) after its bias."""
    n = len(widths)
    refs = list(refs)
    w_refs, refs = refs[:n], refs[n:]
    b_refs = [refs.pop(0) if has else None for has in has_bias]
    g_ref = refs.pop(0) if norm else None
    beta_ref = refs.pop(0) if has_norm_bias else None
    r_ref = refs.pop(0) if has_residual else None
    pos_ref, freq_ref = (refs.pop(0), refs.pop(0)) if any(roped) else (None, None)
    y_refs = refs
    M, K = x_ref.shape
    layer = layer_ref[0]
    j, s = pl.program_id(1), pl.program_id(2)
    row = pl.program_id(0) * block_m + lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)
    x_ok = jnp.broadcast_to(row < M, (block_m, block_k))
    x_row = jnp.minimum(row, M - 1)  # [BM, 1]
    kx = lax.broadcasted_iota(jnp.int32, (1, block_k), 1)  # K offsets along x's columns
    kw = lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)  # and along w's rows
    chunks = K // block_k // splits  # per program
    ok = jnp.broadcast_to(row < M, (block_m, block_n))
    out_row = jnp.where(row < M, row, M)  # masked-off rows point past the end (interpret)

    def x_chunk(c):  # [BM, BK]: x's rows (zero past M), K chunk c
        return plgpu.load(x_ref.at[x_row, c * block_k + kx], mask=x_ok, other=0)

    # With a norm the product runs on (x - shift) * g * pre, rounded to x's dtype, the rows'
    # statistics summed in the same loop (no second pass over x), and the epilogue applies
    #   norm(x) @ w = inv * ((x - shift) * g @ w - (mean - shift) * (g @ w)) + beta @ w
    # shift: for LayerNorm chunk 0's row mean, so the subtraction cancels little (rows far
    # from centred lose nothing); RMSNorm has no mean, and there it is inv * (x * g @ w).
    # pre: 1 / chunk 0's spread (never above 1), so the operand stays near the normalised
    # values' range (f16 rows of large values do not overflow before the epilogue).
    layernorm = norm == "layernorm"
    shift, pre = 0.0, 1.0
    if norm:
        x0 = x_chunk(0).astype(jnp.float32)  # [BM, BK]
        shift = jnp.sum(x0, 1, keepdims=True) / block_k if layernorm else 0.0
        spread = jnp.sqrt(jnp.sum((x0 - shift) ** 2, 1, keepdims=True) / block_k)
        pre = 1.0 / jnp.maximum(spread, 1.0)  # [BM, 1]

    def colsum(ref, k0, w):  # [1, BN]: sum over this chunk's k of ref[layer, k] * w[k, :]
        v = plgpu.load(ref.at[layer, k0 + kw]).astype(jnp.float32)  # [BK, 1]
        return jnp.sum(v * w.astype(jnp.float32), 0, keepdims=True)

    def normed(c, ws, st):  # the chunk's operand in x's dtype, and the statistics updated
        k0 = c * block_k
        d = x_chunk(c).astype(jnp.float32) - shift  # [BM, BK]
        st = dict(st, s2=st["s2"] + jnp.sum(d * d, 1, keepdims=True))
        if layernorm:
            st["s1"] = st["s1"] + jnp.sum(d, 1, keepdims=True)
            for i, w in enumerate(ws):  # column sums per product
                st[f"gw{i}"] = st[f"gw{i}"] + colsum(g_ref, k0, w)
                if beta_ref is not None:
                    st[f"bw{i}"] = st[f"bw{i}"] + colsum(beta_ref, k0, w)
        g = plgpu.load(g_ref.at[layer, k0 + kx]).astype(jnp.float32)  # [1, BK]
        return (d * pre * g).astype(x_ref.dtype), st

    def stats0(count):  # the statistics' zeros: row sums [BM, 1], column sums [1, BN]
        rows, cols = jnp.zeros((block_m, 1), jnp.float32), jnp.zeros((1, block_n), jnp.float32)
        st = dict(s2=rows)
        if layernorm:
            st["s1"] = rows
            for i in range(count):
                st[f"gw{i}"] = cols
                if beta_ref is not None:
                    st[f"bw{i}"] = cols
        return st if norm else {}

    def apply_norm(acc, st, i):  # [BM, BN] f32: norm(x) @ w_i from (x - shift) * g * pre @ w_i
        acc = acc / pre
        if layernorm:
            m = st["s1"] / K  # mean - shift, [BM, 1]
            inv = lax.rsqrt(jnp.maximum(st["s2"] / K - m * m, 0.0) + eps)
            acc = inv * (acc - m * st[f"gw{i}"])
            return acc + st[f"bw{i}"] if f"bw{i}" in st else acc
        return lax.rsqrt(st["s2"] / K + eps) * acc

    def products(w_sel, b_sel, y_sel, first, rope=False):
        """The program's column block of each product in `w_sel` (one, or gate and up),
        summed over its K range; stored, or (gated) the gate's activation times up. With
        `rope`, the one product's partner columns (the other half of each head) too."""
        col = (j - first) * block_n + lax.broadcasted_iota(jnp.int32, (1, block_n), 1)
        cols = [col] * len(w_sel)
        if rope:  # a block lies in one half of a head: its partner is the other half
            half = rope_dim // 2
            first_half = col % rope_dim < half  # [1, BN]
            w_sel, b_sel = w_sel * 2, b_sel * 2
            cols = [col, jnp.where(first_half, col + half, col - half)]

        def chunk(c, carry):
            accs, st = carry
            ws = [
                plgpu.load(w_ref.at[layer, c * block_k + kw, cw])
                for w_ref, cw in zip(w_sel, cols, strict=True)
            ]
            x, st = normed(c, ws, st) if norm else (x_chunk(c), st)
            dims = (((1,), (0,)), ((), ()))
            accs = tuple(
                acc
                + lax.dot_general(
                    x, w, dims, precision=precision, preferred_element_type=jnp.float32
                )
                for acc, w in zip(accs, ws, strict=True)
            )
            return accs, st

        zeros = tuple(jnp.zeros((block_m, block_n), jnp.float32) for _ in w_sel)
        if splits > 1:  # the caller sums the partials and applies the epilogue
            accs, _ = lax.fori_loop(s * chunks, (s + 1) * chunks, chunk, (zeros, {}))
            for acc, y_ref in zip(accs, y_sel, strict=True):
                plgpu.store(y_ref.at[s, out_row, col], acc, mask=ok)
            return
        # static bounds, as the H200 measured
        accs, st = lax.fori_loop(0, chunks, chunk, (zeros, stats0(len(w_sel))))
        outs = []
        for i, (acc, b_ref, cb) in enumerate(zip(accs, b_sel, cols, strict=True)):
            if norm:
                acc = apply_norm(acc, st, i)
            if b_ref is not None:
                acc = acc + plgpu.load(b_ref.at[layer, cb]).astype(jnp.float32)  # [1, BN]
            outs.append(acc)
        if rope:  # rotate-half: x1 cos - x2 sin | x2 cos + x1 sin, angle pos * inv_freq
            freq = plgpu.load(freq_ref.at[col % rope_dim % (rope_dim // 2)])  # [1, BN]
            angle = plgpu.load(pos_ref.at[x_row]).astype(jnp.float32) * freq  # [BM, BN]
            sign = jnp.where(first_half, -1.0, 1.0)
            outs = [outs[0] * jnp.cos(angle) + sign * outs[1] * jnp.sin(angle)]
        acc = activate(outs[0], activation)
        if gated:
            acc = acc * outs[1]
        if r_ref is not None:
            acc = acc + plgpu.load(r_ref.at[x_row, col], mask=ok, other=0).astype(jnp.float32)
        (y_ref,) = y_sel
        plgpu.store(y_ref.at[out_row, col], acc.astype(y_ref.dtype), mask=ok)

    if gated:  # every program computes gate and up at its columns
        products(w_refs, b_refs, y_refs, 0)
        return
    first = 0  # this product's first column block
    for w_ref, b_ref, y_ref, width, rope in zip(w_refs, b_refs, y_refs, widths, roped, strict=True):
        last = first + width // block_n
        fn = functools.partial(products, [w_ref], [b_ref], [y_ref], first, rope)
        if n == 1:  # the whole grid is this product's (no branch around its loop)
            fn()
        else:
            pl.when((j >= first) & (j < last))(fn)
        first = last


_STATIC = (
    "norm",
    "eps",
    "activation",
    "gated",
    "rope",
    "rope_theta",
    "head_dim",
    "block_m",
    "block_n",
    "block_k",
    "num_k_splits",
    "num_warps",
    "num_stages",
    "interpret",
)


def _check(x, ws, bs, norm, norm_scale, norm_bias, residual, activation, gated):
    """Shape and dtype checks at trace time, each with what it wants and what it got."""
    if not ws or len(ws) != len(bs):
        raise ValueError(f"want one bias (or None) per weight; got {len(ws)} and {len(bs)}")
    if x.ndim != 2 or any(
        w.ndim not in (2, 3) or w.shape[-2] != x.shape[1] or w.dtype != x.dtype for w in ws
    ):
        raise ValueError(
            f"want x [M, K] and each w [K, N] or [L, K, N] of x's dtype; got x {x.shape} "
            f"{x.dtype}, w {[(w.shape, str(w.dtype)) for w in ws]}"
        )
    lead = {w.shape[:-2] for w in ws}
    if len(lead) != 1:
        raise ValueError(f"weights must be stacked alike; got {[w.shape for w in ws]}")
    (lead,) = lead
    for w, b in zip(ws, bs, strict=True):
        if b is not None and b.shape != (*lead, w.shape[-1]):
            raise ValueError(f"b must be {[*lead, w.shape[-1]]} (as w); got {list(b.shape)}")
    if jnp.dtype(x.dtype) not in map(jnp.dtype, _DTYPES):
        raise ValueError(f"dtype must be f32, bf16 or f16; got {x.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")
    want = (*lead, x.shape[1])  # norm params stacked as the weights
    if (norm_scale is None) != (norm is None) or (norm_bias is not None and norm is None):
        raise ValueError("norm_scale (and norm_bias, if any) go with norm, and only with it")
    for name, a in (("norm_scale", norm_scale), ("norm_bias", norm_bias)):
        if a is not None and a.shape != want:
            raise ValueError(
                f"{name} must be {list(want)} (x's width, stacked as w); got {list(a.shape)}"
            )
    if gated and (len(ws) != 2 or ws[0].shape != ws[1].shape or residual is not None):
        raise ValueError(
            "gated takes two products of one shape (gate, up) and no residual; got "
            f"{[list(w.shape) for w in ws]}, residual {residual is not None}"
        )
    out = [x.shape[0], ws[0].shape[-1]]
    if residual is not None and (len(ws) != 1 or list(residual.shape) != out):
        raise ValueError(
            f"residual goes with one product, shaped as its output {out}; got {len(ws)} "
            f"products, residual {list(residual.shape)}"
        )


def _check_rope(rope, widths, positions, head_dim, M, gated):
    """Trace-time checks of the rope arguments (none when no product is rotated)."""
    if len(rope) != len(widths):
        raise ValueError(f"rope wants a flag per product ({len(widths)}); got {len(rope)}")
    if not any(rope):
        return
    if gated or head_dim is None or not supports_rope(head_dim):
        raise ValueError(
            f"rope wants head_dim a power of two >= 32, and no gating; got {head_dim}, "
            f"gated {gated}"
        )
    bad = [w for w, r in zip(widths, rope, strict=True) if r and w % head_dim]
    if bad:
        raise ValueError(f"roped products' widths must be multiples of {head_dim}; got {bad}")
    if positions is None or positions.shape != (M,):
        got = None if positions is None else positions.shape
        raise ValueError(f"rope wants positions [{M}] (a row's position); got {got}")


def _rope_inputs(positions, head_dim, theta):
    """The kernel's rope operands: positions i32[M], and the inverse frequencies f32[H/2]."""
    return [positions.astype(jnp.int32), rope_inv_freq(head_dim, theta)]


@functools.partial(jax.jit, static_argnames=_STATIC)
def linear_group(
    x: jax.Array,  # [M, K]
    ws: Sequence[jax.Array],  # each [K, N_i], or [L, K, N_i] with `layer`
    bs: Sequence[jax.Array | None],  # each [N_i] or [L, N_i] (as its w), or None
    layer: jax.Array | int = 0,  # i32[]: which of the stacked weights
    *,
    norm: str | None = None,  # normalise x's rows first: None, "layernorm" or "rmsnorm"
    norm_scale: jax.Array | None = None,  # [K] or [L, K] (as w), with norm
    norm_bias: jax.Array | None = None,  # like norm_scale (LayerNorm's), or None
    eps: float = 1e-5,  # the norm's
    residual: jax.Array | None = None,  # [M, N] added last (one product only), or None
    activation: str | None = None,
    gated: bool = False,  # ws = (gate, up): one output, activation(gate) * up
    rope: tuple[bool, ...] | None = None,  # which products get the rotary embedding
    rope_theta: float = 10000.0,
    positions: jax.Array | None = None,  # i32[M]: each row's position, with rope
    head_dim: int | None = None,  # the heads' width the rotation works in, with rope
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_k_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 5,
    interpret: bool | None = None,
) -> tuple[jax.Array, ...]:  # each [M, N_i] in x's dtype
    """`linear_ref(x, ws[i][layer], bs[i][layer], ...)` for every i, in one launch (the
    products share x: a layer's q, k and v). Blocks and splits left None come from
    `plan_blocks`; `block_n` must divide every N_i.

    With `norm`, the product is of x's rows normalised (statistics over all of K in f32;
    the product's operand rounded to x's dtype, as `norm_ref` rounds its output), so the
    norm before a layer needs no kernel of its own; its programs then take all of K (no
    split). `residual` is added to the activated f32 sum before the one rounding (the
    residual stream after o or down).

    `gated` (a gated MLP's gate and up, as ws): one output, activation(norm(x) @ w_gate +
    b_gate) * (norm(x) @ w_up + b_up) (`reference.gated_ref`; SwiGLU with "silu"), each
    program computing both products at its columns, so neither is stored.

    `rope` (a flag per product: q and k) applies the rotary embedding to those products'
    `head_dim`-wide heads after the bias (`reference.rope_ref`: rotate-half, angle
    `positions[row] * rope_theta ** (-2i / head_dim)`), so q and k leave the kernel rotated;
    each of their programs also computes its columns' partners in the other half of the
    head (so each of q's and k's weight tiles is read by two programs).

    `num_k_splits` S > 1 splits each product's K loop over S programs, which store f32
    partial sums; their sum, the bias, the activation (and gating) and the residual then run
    as XLA ops after the call (which XLA fuses into whatever consumes the result)."""
    _check(x, ws, bs, norm, norm_scale, norm_bias, residual, activation, gated)
    M, K = x.shape
    widths = tuple(w.shape[-1] for w in ws)
    rope = tuple(rope or (False,) * len(ws))
    _check_rope(rope, widths, positions, head_dim, M, gated)
    planned = plan_blocks(M, K, widths[:1] if gated else widths)
    block_m = block_m or planned[0]
    if any(rope) and not block_n:  # a block must lie in one half of a head
        block_n = min(planned[1], head_dim // 2)
    block_n = block_n or planned[1]
    block_k = block_k or planned[2]
    for name, blk, dims in (("block_n", block_n, widths), ("block_k", block_k, (K,))):
        if blk < 16 or blk & (blk - 1) or any(d % blk for d in dims):
            raise ValueError(
                f"{name}={blk} must be a power of two >= 16 dividing {' and '.join(map(str, dims))}"
            )
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m} must be a power of two >= 16")
    if any(rope) and (head_dim // 2) % block_n:
        raise ValueError(f"block_n={block_n} must divide half the head dim {head_dim}")
    S = num_k_splits or (1 if norm or any(rope) else planned[3])
    if (norm or any(rope)) and S > 1:
        raise ValueError(f"norm and rope need each program to see all of K; got num_k_splits={S}")
    if S < 1 or (K // block_k) % S:
        raise ValueError(f"num_k_splits={S} must divide the {K // block_k} chunks of K")
    ws = [w.reshape(-1, K, n) for w, n in zip(ws, widths, strict=True)]  # [L, K, N_i]
    bs = [None if b is None else b.reshape(-1, n) for b, n in zip(bs, widths, strict=True)]
    norm_params = [a.reshape(-1, K) for a in (norm_scale, norm_bias) if a is not None]
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    out_dtype, lead = (jnp.float32, (S,)) if S > 1 else (x.dtype, ())
    kernel = functools.partial(
        _kernel,
        widths=widths,
        has_bias=tuple(b is not None for b in bs),
        norm=norm,
        has_norm_bias=norm_bias is not None,
        eps=eps,
        has_residual=residual is not None and S == 1,
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        splits=S,
        activation=activation,
        gated=gated,
        roped=rope,
        rope_dim=head_dim,
        precision=lax.Precision.HIGHEST if x.dtype == jnp.float32 else None,
    )
    name = "linear" + (f"_{norm}" if norm else "") + "_bias" * any(b is not None for b in bs)
    name += f"_{activation}" if activation else ""
    name += "_residual" if residual is not None else ""
    name += "_rope" if any(rope) else ""
    name += "_gated" if gated else f"_x{len(ws)}" if len(ws) > 1 else ""
    name += f"_m{block_m}n{block_n}k{block_k}" + (f"s{S}" if S > 1 else "")
    outputs = widths[:1] if gated and S == 1 else widths  # gated and split: two partials
    ys = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(M, block_m), (widths[0] if gated else sum(widths)) // block_n, S),
        out_shape=[jax.ShapeDtypeStruct((*lead, M, n), out_dtype) for n in outputs],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(
        layer,
        x,
        *ws,
        *(b for b in bs if b is not None),
        *norm_params,
        *([residual] if residual is not None and S == 1 else []),
        *(_rope_inputs(positions, head_dim, rope_theta) if any(rope) else []),
    )
    if S == 1:
        return tuple(ys)
    out = []
    for y, b in zip(ys, bs, strict=True):
        y = y.sum(0)  # [M, N_i] f32
        if b is not None:  # [L, N_i]
            y = y + b[layer[0]].astype(jnp.float32)
        out.append(y)
    if gated:
        return ((activate(out[0], activation) * out[1]).astype(x.dtype),)
    out = [activate(y, activation) for y in out]
    if residual is not None:
        out = [y + residual.astype(jnp.float32) for y in out]
    return tuple(y.astype(x.dtype) for y in out)


def linear(
    x: jax.Array,  # [M, K]
    w: jax.Array,  # [K, N], or [L, K, N] with `layer`
    b: jax.Array | None,  # [N] or [L, N] (as w), or None
    layer: jax.Array | int = 0,  # i32[]: which of the stacked weights
    **kw,
) -> jax.Array:  # [M, N] in x's dtype
    """`reference.linear_ref(x, w[layer], b[layer], activation=...)` in one kernel
    (`linear_group` of one product; the same keywords).

    A decoder scanning stacked layers passes the whole stacked weights and the layer index:
    a layer's weights sliced out beforehand would be copied before the call."""
    return linear_group(x, (w,), (b,), layer, **kw)[0]
