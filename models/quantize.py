"""Weight-only int8 quantization of the decoder's linear layers (`ModelConfig.quantization`).

Each layer kernel becomes int8 with one float32 scale per output channel: the scale is the
channel's largest magnitude over the contracted axes / 127, and `dense` computes
`(x @ q) * scale` in the activation dtype. The weights take half the memory of bf16 (a
quarter of f32); the scales add one value per output channel. Embeddings, the LM head and
norms stay in the model's dtype. Activations are not quantized.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.layers import Params

# Per quantized kernel (paths under "layers", leading L axis first), its contracted axes.
CONTRACTED = {
    ("q",): (1,),  # [L, D, N, H]
    ("k",): (1,),
    ("v",): (1,),
    ("o",): (1, 2),  # [L, N, H, D]
    ("mlp", "up"): (1,),  # [L, D, F]
    ("mlp", "gate"): (1,),
    ("mlp", "down"): (1,),  # [L, F, D]
}


def quantize_kernel(w: jax.Array, contracted: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(int8 kernel, f32 scale over the remaining axes) with w ~= q * scale."""
    w = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=contracted, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return q, jnp.squeeze(scale, contracted)


def quantize_params(params: Params, config: ModelConfig) -> Params:
    """`params` (float) with each layer kernel replaced by int8 `kernel` + `kernel_scale`;
    unchanged unless `config.quantization == "int8"`, and for kernels already quantized.
    Runs under `jax.jit` too."""
    if config.quantization is None:
        return params
    layers = dict(params["layers"])
    for path, contracted in CONTRACTED.items():
        parent = layers if len(path) == 1 else dict(layers[path[0]])
        name = path[-1]
        if name not in parent or "kernel_scale" in parent[name]:  # gate: SwiGLU only
            continue  # (a kernel already quantized stays as it is)
        q, scale = quantize_kernel(parent[name]["kernel"], contracted)
        parent[name] = {**parent[name], "kernel": q, "kernel_scale": scale}
        if len(path) > 1:
            layers[path[0]] = parent
    return {**params, "layers": layers}
