"""Partition rules as data: parameter path -> PartitionSpec (Megatron-style column/row split).

Stacked layer weights carry a leading L axis, never split. Over the `model` axis:
- q, k, v are column-parallel (split on heads), o is row-parallel (split on its input heads),
  so attention needs no communication and o's output is one all-reduce;
- the MLP's up/gate are column-parallel and down row-parallel on the hidden F axis: one more
  all-reduce per layer;
- the token embedding and LM head split the vocabulary when it divides evenly (GPT-2's 50257
  does not: those stay replicated);
- norms, biases of row-parallel layers, learned positions: replicated;
- int8 kernels' per-output-channel scales split as their layer's outputs (q, k, v, up,
  gate) or are replicated (o, down: their outputs are whole on every device);
- LoRA slots: B of column-parallel layers split on outputs, A of row-parallel ones on
  inputs, the rest replicated (the adapter's delta then needs no extra communication).
The KV cache `[L, K, P, S, H]` splits on K, matching k/v, so each device owns the pages of
its own KV heads.
"""

from __future__ import annotations

import re

import jax
from jax.sharding import PartitionSpec as P

from models.config import ModelConfig
from sharding.mesh import MODEL_AXIS

M = MODEL_AXIS
# (regex over the "/"-joined parameter path, spec); first match wins, no match: replicated.
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"^layers/(q|k|v)/kernel$", P(None, None, M, None)),  # [L, D, N|K, H]
    (r"^layers/(q|k|v)/(bias|kernel_scale)$", P(None, M, None)),  # [L, N|K, H]
    (r"^layers/o/kernel$", P(None, M, None, None)),  # [L, N, H, D]
    (r"^layers/mlp/(up|gate)/kernel$", P(None, None, M)),  # [L, D, F]
    (r"^layers/mlp/(up|gate)/(bias|kernel_scale)$", P(None, M)),  # [L, F]
    (r"^layers/mlp/down/kernel$", P(None, M, None)),  # [L, F, D]
    # LoRA slots (models/lora.py): B split as its layer's outputs (column-parallel layers),
    # A as its layer's inputs (row-parallel ones); heads flatten head-major, so the splits
    # fall on whole heads.
    (r"^layers/lora/(q|k|v|up|gate)/b$", P(None, None, None, M)),  # [L, M, r, D_out]
    (r"^layers/lora/(o|down)/a$", P(None, None, M, None)),  # [L, M, D_in, r]
    (r"^embed/tokens$", P(M, None)),  # [V, D]  (vocab, when it divides)
    (r"^lm_head/kernel$", P(None, M)),  # [D, V]  (vocab, when it divides)
)
_VOCAB_RULES = (r"^embed/tokens$", r"^lm_head/kernel$")


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """Raise a clear error when the model cannot be split `tp` ways."""
    if tp < 1:
        raise ValueError(f"tensor_parallel must be >= 1, got {tp}")
    for what, n in (
        ("n_heads", config.n_heads),
        ("n_kv_heads", config.n_kv_heads),
        ("d_ff", config.d_ff),
    ):
        if n % tp:
            raise ValueError(f"{config.name}: {what}={n} is not divisible by tensor_parallel={tp}")


def _path(key_path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)


def param_specs(params, config: ModelConfig, tp: int):
    """The PartitionSpec of every leaf of `params` (arrays or ShapeDtypeStructs)."""
    check_tensor_parallel(config, tp)

    def spec(key_path, leaf) -> P:
        path = _path(key_path)
        for pattern, s in PARAM_RULES:
            if re.match(pattern, path):
                if any(re.match(v, path) for v in _VOCAB_RULES) and config.vocab_size % tp:
                    return P()
                if len(s) != len(leaf.shape):
                    raise ValueError(f"rule {pattern} has rank {len(s)}, {path} is {leaf.shape}")
                return s
        return P()

    return jax.tree_util.tree_map_with_path(spec, params)


def cache_spec() -> P:
    """KV pages `[L, K, P, S, H]` split by KV head."""
    return P(None, M, None, None, None)
