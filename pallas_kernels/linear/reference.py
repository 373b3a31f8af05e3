"""Pure-`jnp` linear layer with its epilogue: what the kernel must equal.

Legend: M rows, K in features, N out features, L stacked layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ACTIVATIONS = (None, "gelu_tanh")


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
    activation: str | None = None,
) -> jax.Array:  # [M, N] in x's dtype
    """activation(x @ w + b): the product accumulated in f32, the bias and activation in
    f32, one rounding to x's dtype at the end."""
    y = jnp.dot(
        x,
        w,
        preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None,
    )
    if b is not None:
        y = y + b.astype(jnp.float32)
    return activate(y, activation).astype(x.dtype)
