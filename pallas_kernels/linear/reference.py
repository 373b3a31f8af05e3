"""Pure-`jnp` linear layer with its epilogue: what the kernel must equal.

Legend: M rows, K in features, N out features, L stacked layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.add_norm.reference import norm_ref

ACTIVATIONS = (None, "gelu_tanh")
NORMS = (None, "layernorm", "rmsnorm")


def activate(y: jax.Array, activation: str | None) -> jax.Array:
    """The epilogue's activation on f32 values: none, or GELU's tanh form (GPT-2's)."""
    if activation is None:
        return y
    if activation == "gelu_tanh":
        return jax.nn.gelu(y, approximate=True)
    raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")


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
) -> jax.Array:  # [M, N] in x's dtype
    """activation(norm(x) @ w + b) + residual: the norm as the decoder's (`norm_ref`, its
    output rounded to x's dtype), the product accumulated in f32, the bias, activation and
    residual in f32, one rounding to x's dtype at the end."""
    if norm is not None:
        x = norm_ref(x, norm_scale, norm_bias, eps=eps, layernorm=norm == "layernorm")
    y = jnp.dot(
        x,
        w,
        preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None,
    )
    if b is not None:
        y = y + b.astype(jnp.float32)
    y = activate(y, activation)
    if residual is not None:
        y = y + residual.astype(jnp.float32)
    return y.astype(x.dtype)
