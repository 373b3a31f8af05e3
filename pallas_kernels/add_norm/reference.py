"""Pure-`jnp` norm, and residual add then norm: what the kernel must equal (the decoder's
own norm is `norm_ref`).

Legend: T tokens, D model width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def norm_ref(
    y: jax.Array,  # [..., D]
    scale: jax.Array,  # [D]
    bias: jax.Array | None,  # [D] with LayerNorm's centring, or None
    *,
    eps: float,
    layernorm: bool,
) -> jax.Array:  # [..., D] in y's dtype
    """LayerNorm (centred, then bias) or RMSNorm over the last axis, computed in f32."""
    yf = y.astype(jnp.float32)
    if layernorm:
        yf = yf - yf.mean(-1, keepdims=True)
    h = yf * jax.lax.rsqrt((yf * yf).mean(-1, keepdims=True) + eps) * scale.astype(jnp.float32)
    if bias is not None:
        h = h + bias.astype(jnp.float32)
    return h.astype(y.dtype)


def add_norm_ref(
    x: jax.Array,  # [T, D] the residual stream
    delta: jax.Array,  # [T, D] what the last block adds to it
    scale: jax.Array,
    bias: jax.Array | None,
    *,
    eps: float,
    layernorm: bool,
) -> tuple[jax.Array, jax.Array]:  # (x + delta, norm(x + delta)), both [T, D] in x's dtype
    """The sum in x's dtype, then its norm."""
    y = x + delta
    return y, norm_ref(y, scale, bias, eps=eps, layernorm=layernorm)
