"""Random Hugging Face PEFT LoRA adapters, and the HF state dict with one merged in.

`write_peft_adapter` writes what PEFT's `save_pretrained` writes for a LoRA adapter: keys
`base_model.model.<module>.lora_A.weight` ([r, in]) and `...lora_B.weight` ([out, r]) for each
adapted module, and an `adapter_config.json`. `merge_into_state_dict` is PEFT's
`merge_and_unload` on a torch-layout state dict: W + scaling * B @ A (transposed for GPT-2's
Conv1D, whose weights are [in, out]). Neither needs peft or torch.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
from hf_reference import TINY_LLAMA
from safetensors.numpy import save_file

# The tiny Llama the LoRA tests adapt (untied head).
LLAMA = TINY_LLAMA | dict(tie_word_embeddings=False)
LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# PEFT keys name the wrapped model: `base_model.model.` + the HF module path.
PEFT_PREFIX = "base_model.model."
# GPT-2's Conv1D modules (weights [in, out]); every other adapted module is an nn.Linear.
CONV1D_MODULES = ("c_attn", "c_proj", "c_fc")
_LORA_A = re.compile(r"(?P<module>.+)\.lora_A(?:\.default)?\.weight")


def lora_modules(hf_config) -> dict[str, tuple[int, int]]:
    """HF module path inside one layer -> (in_features, out_features), for Llama or GPT-2."""
    if hf_config.model_type == "llama":
        D, F = hf_config.hidden_size, hf_config.intermediate_size
        N, K = hf_config.num_attention_heads, hf_config.num_key_value_heads
        H = getattr(hf_config, "head_dim", None) or D // N
        return {
            "self_attn.q_proj": (D, N * H),
            "self_attn.k_proj": (D, K * H),
            "self_attn.v_proj": (D, K * H),
            "self_attn.o_proj": (N * H, D),
            "mlp.gate_proj": (D, F),
            "mlp.up_proj": (D, F),
            "mlp.down_proj": (F, D),
        }
    if hf_config.model_type == "gpt2":
        D = hf_config.n_embd
        F = hf_config.n_inner or 4 * D
        return {
            "attn.c_attn": (D, 3 * D),
            "attn.c_proj": (D, D),
            "mlp.c_fc": (D, F),
            "mlp.c_proj": (F, D),
        }
    raise ValueError(f"no LoRA modules for model_type {hf_config.model_type!r}")


def layer_prefix(hf_config, layer: int) -> str:
    """`base_model.model.model.layers.3.` (Llama) or `base_model.model.transformer.h.3.`."""
    inner = "model.layers" if hf_config.model_type == "llama" else "transformer.h"
    return f"{PEFT_PREFIX}{inner}.{layer}."


def write_peft_adapter(
    path,
    hf_config,
    *,
    rank: int,
    alpha: float,
    targets,
    seed: int = 0,
    use_rslora: bool = False,
    scale: float = 0.05,
) -> dict[str, np.ndarray]:
    """Write a random PEFT adapter directory for the transformers config `hf_config`
    (LlamaConfig or GPT2Config) with LoRA on `targets` (HF module names like "q_proj",
    "v_proj", "down_proj"; or "c_attn", "c_fc", ... for GPT-2) in every layer; A and B
    normal * scale (B non-zero, unlike PEFT's init, so the adapter changes the output).
    Returns the tensors written (safetensors key -> array)."""
    modules = lora_modules(hf_config)
    # PEFT matches a target by suffix: "c_proj" adapts both attn.c_proj and mlp.c_proj.
    chosen = [m for m in modules if any(m == t or m.endswith("." + t) for t in targets)]
    unmatched = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
    if unmatched:
        raise ValueError(f"targets {unmatched} match no module of {sorted(modules)}")
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(hf_config.num_hidden_layers):
        for module in chosen:
            n_in, n_out = modules[module]
            key = layer_prefix(hf_config, layer) + module
            tensors[f"{key}.lora_A.weight"] = scale * rng.standard_normal((rank, n_in))
            tensors[f"{key}.lora_B.weight"] = scale * rng.standard_normal((n_out, rank))
    tensors = {k: v.astype(np.float32) for k, v in tensors.items()}
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    adapter_config = {  # the fields of PEFT's LoraConfig that matter here
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(set(targets)),
        "use_rslora": use_rslora,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": hf_config.model_type == "gpt2",
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f, indent=2)
    return tensors


def merge_into_state_dict(
    state_dict, adapter_tensors, *, rank: int, alpha: float, use_rslora: bool = False
) -> dict:
    """The HF torch-layout state dict with the adapter merged: W + scaling * B @ A for each
    adapted Linear (for GPT-2 Conv1D weights [in, out]: W + scaling * (B @ A).T)."""
    scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
    merged = dict(state_dict)
    for key, lora_a in adapter_tensors.items():
        m = _LORA_A.fullmatch(key)
        if m is None:
            continue
        lora_b = adapter_tensors[key.replace(".lora_A", ".lora_B")]
        module = m["module"].removeprefix(PEFT_PREFIX)
        delta = scaling * (
            np.asarray(lora_b, np.float64) @ np.asarray(lora_a, np.float64)
        )  # [out, in]
        if module.rsplit(".", 1)[-1] in CONV1D_MODULES:
            delta = delta.T
        weight = merged[f"{module}.weight"]
        merged[f"{module}.weight"] = (np.asarray(weight, np.float64) + delta).astype(np.float32)
    return merged
