"""Pure-`jnp` linear layer with its epilogue: what the kernel must equal.

Legend: M rows, K in features, N out features, L stacked layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.add_norm.reference import norm_ref

ACTIVATIONS = (None, "gelu_tanh", "silu")
NORMS = (None, "layernorm", "rmsnorm")


def activate(y: jax.Array, activation: str | None) -> jax.Array:
    """The epilogue's activation on f32 values: none, GELU's tanh form (GPT-2's) or SiLU
    (a gated MLP's gate: Llama's)."""
    if activation is None:
        return y
    if activation == "gelu_tanh":
        return jax.nn.gelu(y, approximate=True)
    if activation == "silu":
        return jax.nn.silu(y)
    raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
    """f32[H/2]: the rotary embedding's angle per position for each pair i, theta ** (-2i /
    H), as 1 / theta ** (2i / H). The decoder, this reference and the kernel all take it
    from here: f32 angles of a few thousand radians are only good to 1e-4, so another
    formula would differ by that."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rope_ref(y: jax.Array, positions: jax.Array, theta: float, head_dim: int) -> jax.Array:
    """Rotary embedding of y [M, N]'s head_dim-wide heads (N a multiple of it), in f32,
    rotate-half convention (GPT-NeoX's, Llama's in transformers): a head's halves (a, b)
    become (a cos - b sin, b cos + a sin) at angle positions[m] * theta ** (-2i / head_dim).
    The decoder's rope (`models.layers.rope`) is this on its [T, heads, H] rows."""
    M, N = y.shape
    heads = y.astype(jnp.float32).reshape(M, N // head_dim, 2, head_dim // 2)
    angle = positions.astype(jnp.float32)[:, None] * rope_inv_freq(head_dim, theta)  # [M, H/2]
    cos, sin = jnp.cos(angle)[:, None], jnp.sin(angle)[:, None]  # [M, 1, H/2]
    a, b = heads[:, :, 0], heads[:, :, 1]
    return jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=2).reshape(M, N)


def _product(x, w, b, norm, norm_scale, norm_bias, eps) -> jax.Array:
    """norm(x) @ w + b in f32 (the norm's output rounded to x's dtype, as the decoder's)."""
    if norm is not None:
        x = norm_ref(x, norm_scale, norm_bias, eps=eps, layernorm=norm == "layernorm")
    y = jnp.dot(
        x,
        w,
        preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None,
    )
    return y if b is None else y + b.astype(jnp.float32)


def linear_ref(
    x: jax.Array,  # [M, K]
    w: jax.Array,  # [K, N]
    b: jax.Array | None,  # [N] or None
    *,
    norm: str | None = None,  # None, "layernorm" or "rmsnorm" of x's rows first
    norm_scale: jax.Array | None = None,  # [K], with norm
    norm_bias: jax.Array | None = None,  # [K] or None
    eps: float = 1e-5,
    residual: jax.Array | None = None,  # [M, N] or None
    activation: str | None = None,
    positions: jax.Array | None = None,  # i32[M]: rotate each head_dim-wide head (rope)
    rope_theta: float = 10000.0,
    head_dim: int | None = None,
) -> jax.Array:  # [M, N] in x's dtype
    """activation(rope(norm(x) @ w + b)) + residual: the norm as the decoder's (`norm_ref`,
    its output rounded to x's dtype), the product accumulated in f32, the bias, rotary
    embedding (with `positions`), activation and residual in f32, one rounding to x's dtype
    at the end."""
    y = _product(x, w, b, norm, norm_scale, norm_bias, eps)
    if positions is not None:
        y = rope_ref(y, positions, rope_theta, head_dim)
    y = activate(y, activation)
    if residual is not None:
        y = y + residual.astype(jnp.float32)
    return y.astype(x.dtype)


def gated_ref(
    x: jax.Array,  # [M, K]
    w_gate: jax.Array,  # [K, N]
    b_gate: jax.Array | None,  # [N] or None
    w_up: jax.Array,  # [K, N]
    b_up: jax.Array | None,  # [N] or None
    *,
    norm: str | None = None,
    norm_scale: jax.Array | None = None,
    norm_bias: jax.Array | None = None,
    eps: float = 1e-5,
    activation: str | None = "silu",
) -> jax.Array:  # [M, N] in x's dtype
    """A gated MLP's hidden layer, activation(norm(x) @ w_gate + b_gate) * (norm(x) @ w_up +
    b_up) (SwiGLU with SiLU), both products and the gating in f32, rounded once."""
    gate = _product(x, w_gate, b_gate, norm, norm_scale, norm_bias, eps)
    up = _product(x, w_up, b_up, norm, norm_scale, norm_bias, eps)
    return (activate(gate, activation) * up).astype(x.dtype)
