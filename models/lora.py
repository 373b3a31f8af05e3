"""LoRA adapters on the device: `max_loras` slots per target layer, picked per token.

Each adapted layer (our names: q, k, v, o, gate, up, down) has, in `params["layers"]["lora"]`,

    a [L, M, D_in, r]   b [L, M, r, D_out]      (M slots, r = max_lora_rank)

with the adapter's scaling folded into b and a lower rank zero-padded to r. A token whose
`RaggedBatch.lora_slots` entry is m gains `x_flat @ a[l, m] @ b[l, m]` on that layer's
output; slot -1 (no adapter) gains nothing. A batch mixing any adapters (and none) costs two
dense matmuls per layer: x against every slot's A at once ([T, M, r]), the other slots'
columns zeroed, then against every slot's B; no per-token gather of weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.layers import Params


def lora_dims(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Our adaptable layers: name -> (D_in, D_out), heads flattened."""
    D, N, K, H, F = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.d_ff
    dims = {"q": (D, N * H), "k": (D, K * H), "v": (D, K * H), "o": (N * H, D)}
    dims |= {"up": (D, F), "down": (F, D)}
    if config.activation == "swiglu":
        dims["gate"] = (D, F)
    return dims


def init_lora_slots(config: ModelConfig, max_loras: int, max_rank: int) -> Params:
    """All slots empty (zeros), in the model's dtype."""
    L, dt = config.n_layers, jnp.dtype(config.dtype)
    return {
        name: {
            "a": jnp.zeros((L, max_loras, d_in, max_rank), dt),
            "b": jnp.zeros((L, max_loras, max_rank, d_out), dt),
        }
        for name, (d_in, d_out) in lora_dims(config).items()
    }


def slot_arrays(
    config: ModelConfig, max_rank: int, targets: dict[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One adapter's (a [L, D_in, r], b [L, r, D_out]) per target, zero-padded to `max_rank`,
    for every adaptable layer (zeros where the adapter does not touch it)."""
    out = {}
    L = config.n_layers
    for name, (d_in, d_out) in lora_dims(config).items():
        a = np.zeros((L, d_in, max_rank), np.float32)
        b = np.zeros((L, max_rank, d_out), np.float32)
        if name in targets:
            ta, tb = targets[name]
            r = ta.shape[-1]
            if r > max_rank:
                raise ValueError(f"LoRA rank {r} exceeds max_lora_rank={max_rank}")
            if ta.shape != (L, d_in, r) or tb.shape != (L, r, d_out):
                raise ValueError(
                    f"LoRA {name}: a {ta.shape}, b {tb.shape}; want ({L}, {d_in}, r), "
                    f"({L}, r, {d_out})"
                )
            a[..., :r], b[:, :r] = ta, tb
        out[name] = (a, b)
    return out


@jax.jit
def _write_slot(lora: Params, slot: jax.Array, new: Params) -> Params:
    return jax.tree.map(lambda cur, x: cur.at[:, slot].set(x.astype(cur.dtype)), lora, new)


def write_slot(lora: Params, slot: int, arrays: dict[str, tuple[np.ndarray, np.ndarray]]):
    """`lora` with slot `slot` holding `arrays` (from `slot_arrays`); one compile for all."""
    new = {name: {"a": a, "b": b} for name, (a, b) in arrays.items()}
    return _write_slot(lora, jnp.int32(slot), new)


def lora_delta(
    p: Params,  # {"a": [M, D_in, r], "b": [M, r, D_out]} of one layer
    x: jax.Array,  # [T, D_in]
    slots: jax.Array,  # i32[T], -1 for no adapter
) -> jax.Array:  # [T, D_out]
    """What each token's adapter adds to the layer's output."""
    M = p["a"].shape[0]
    xa = jnp.einsum("td,mdr->tmr", x, p["a"].astype(x.dtype))  # [T, M, r]
    mine = slots[:, None] == jnp.arange(M, dtype=slots.dtype)  # [T, M]
    xa = jnp.where(mine[:, :, None], xa, 0)
    return jnp.einsum("tmr,mro->to", xa, p["b"].astype(x.dtype))  # [T, D_out]
