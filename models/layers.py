"""Position-wise pieces of the decoder, all on a packed token axis.

Legend: T tokens, D model, N heads, K kv heads, H head dim, F ffn, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from pallas_kernels.add_norm.reference import norm_ref
from pallas_kernels.linear.reference import activate, rope_ref

Params = dict
# Each projection's einsum on the packed token axis.
SPECS = {
    "q": "TD,DNH->TNH",
    "k": "TD,DKH->TKH",
    "v": "TD,DKH->TKH",
    "o": "TNH,NHD->TD",
    "gate": "TD,DF->TF",
    "up": "TD,DF->TF",
    "down": "TF,FD->TD",
}


def norm(p: Params, x: jax.Array, config: ModelConfig) -> jax.Array:
    """LayerNorm or RMSNorm over the last axis, computed in f32."""
    return norm_ref(
        x, p["scale"], p.get("bias"), eps=config.norm_eps, layernorm=config.norm == "layernorm"
    )


def dense(p: Params, x: jax.Array, spec: str, activation: str | None = None) -> jax.Array:
    """einsum with the kernel (and bias if present), e.g. spec "TD,DNH->TNH", then the
    activation (None or "gelu_tanh"). An int8 kernel (models/quantize.py) is widened to x's
    dtype and its output scaled per channel."""
    if "kernel_scale" in p:
        y = jnp.einsum(spec, x, p["kernel"].astype(x.dtype))
        y = y * p["kernel_scale"].astype(x.dtype)  # [.., out channels] scales broadcast
    else:
        y = jnp.einsum(spec, x, p["kernel"])
    y = y + p["bias"] if "bias" in p else y
    return activate(y, activation)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half convention (x: [T, N, H], positions: [T]): the fused
    linear kernel's rotation (`rope_ref`), on each of the N heads, rounded to x's dtype."""
    T, N, H = x.shape
    return rope_ref(x.reshape(T, N * H), positions, theta, H).reshape(x.shape).astype(x.dtype)


def mlp(p: Params, x: jax.Array, config: ModelConfig, linear=None) -> jax.Array:
    """GELU (tanh approximation, as GPT-2) or SwiGLU feed-forward: [T, D] -> [T, D].

    `linear(name, p, x, spec, activation=None)`: how each of gate / up / down is applied
    (default `dense`; the decoder passes one that adds LoRA adapters or runs the fused
    kernel)."""
    if linear is None:
        linear = lambda _, q, h, spec, activation=None: dense(q, h, spec, activation)  # noqa: E731
    if config.activation == "swiglu":
        gate = linear("gate", p["gate"], x, SPECS["gate"])
        h = jax.nn.silu(gate) * linear("up", p["up"], x, SPECS["up"])
    else:
        h = linear("up", p["up"], x, SPECS["up"], activation="gelu_tanh")
    return linear("down", p["down"], h, SPECS["down"])
