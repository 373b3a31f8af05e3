"""Hugging Face PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`).

Legend: D model, N heads, K kv heads, H head dim, F ffn, L layers, r rank.
PEFT's `lora_A.weight` is [r, in] and `lora_B.weight` is [out, r] (plain `nn.Linear`s, also on
GPT-2's Conv1D modules, whose own weights are [in, out]); the adapted layer adds
`scaling * B @ A @ x`. Ours: `a = A^T` [D_in, r] and `b = scaling * B^T` [r, D_out], so the layer
gains `x_flat @ a @ b`. D_out is flattened as our HF loader flattens the torch weights' rows
(`W.T.reshape(in..., out...)`, C order): q [N*H] is head-major, o's input [N*H] likewise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np

from models.config import ModelConfig
from models.loaders.hf import read_safetensors
from models.lora import lora_dims

_CONFIG_NAME = "adapter_config.json"
_WEIGHTS_NAME = "adapter_model.safetensors"

# Our targets, in this order, with the kernel they adapt (models/decoder.py: param_shapes).
_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

# HF module path inside one layer -> the targets it feeds (c_attn's output rows are q, k, v).
_LLAMA_MODULES: dict[str, tuple[str, ...]] = {
    "self_attn.q_proj": ("q",),
    "self_attn.k_proj": ("k",),
    "self_attn.v_proj": ("v",),
    "self_attn.o_proj": ("o",),
    "mlp.gate_proj": ("gate",),
    "mlp.up_proj": ("up",),
    "mlp.down_proj": ("down",),
}
_GPT2_MODULES: dict[str, tuple[str, ...]] = {
    "attn.c_attn": ("q", "k", "v"),
    "attn.c_proj": ("o",),
    "mlp.c_fc": ("up",),
    "mlp.c_proj": ("down",),
}
# Layer prefixes after PEFT's `base_model.model.` (ForCausalLM: `model.` / `transformer.`).
_LLAMA_LAYER = re.compile(r"(?:model\.)?layers\.(\d+)\.(.+)")
_GPT2_LAYER = re.compile(r"(?:transformer\.)?h\.(\d+)\.(.+)")
# `<module>.lora_A.weight`, optionally with the adapter name PEFT strips on save.
_LORA_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight")


@dataclasses.dataclass(frozen=True)
class LoRAWeights:
    """One LoRA adapter in our layout, host numpy float32."""

    rank: int
    # our target name -> (a [L, D_in, r], b [L, r, D_out]); b already multiplied by the
    # adapter's scaling (lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora), so the
    # layer's output gains  x_flat @ a[l] @ b[l]  (x_flat: the layer input flattened to D_in).
    targets: dict[str, tuple[np.ndarray, np.ndarray]]


def _family(config: ModelConfig) -> tuple[dict[str, tuple[str, ...]], re.Pattern]:
    if config.position == "rope" and config.activation == "swiglu":
        return _LLAMA_MODULES, _LLAMA_LAYER
    if config.position == "learned" and config.activation == "gelu":
        return _GPT2_MODULES, _GPT2_LAYER
    raise ValueError(
        f"no LoRA mapping for position={config.position}, activation={config.activation} "
        "(Llama or GPT-2 style)"
    )


def _check_adapter_config(ac: dict, path: str, modules: dict[str, tuple[str, ...]]) -> None:
    """Reject the PEFT options that change more than `scaling * B @ A` on the modules we know."""
    if ac.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {ac['peft_type']!r} is not LORA")
    if ac.get("use_dora"):
        raise ValueError(f"{path}: use_dora: true (DoRA) adapters are not supported")
    if ac.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias {ac['bias']!r} is not supported (only 'none')")
    if ac.get("lora_bias"):
        raise ValueError(f"{path}: lora_bias: true is not supported")
    if ac.get("modules_to_save"):
        raise ValueError(
            f"{path}: modules_to_save {ac['modules_to_save']!r} is not supported (the adapter "
            "replaces whole modules)"
        )
    for field in ("rank_pattern", "alpha_pattern"):
        if ac.get(field):
            raise ValueError(f"{path}: {field} {ac[field]!r} is not supported (one r and alpha)")
    r = ac.get("r")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"{path}: r must be a positive integer, got {r!r}")
    # A list names modules by suffix (a string is a regex or "all-linear": the tensors decide).
    wanted = ac.get("target_modules")
    if isinstance(wanted, list):
        known = {m.rsplit(".", 1)[-1] for m in modules}
        bad = sorted({t for t in wanted if t.rsplit(".", 1)[-1] not in known})
        if bad:
            raise ValueError(
                f"{path}: LoRA on modules we cannot apply: {bad} (supported: {sorted(known)})"
            )


def _read(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    config_file = os.path.join(path, _CONFIG_NAME)
    weights_file = os.path.join(path, _WEIGHTS_NAME)
    if not os.path.isfile(config_file):
        raise ValueError(f"{path}: no {_CONFIG_NAME} (not a PEFT adapter directory)")
    if not os.path.isfile(weights_file):
        found = [f for f in sorted(os.listdir(path)) if f.endswith(".bin")]
        raise ValueError(
            f"{path}: no {_WEIGHTS_NAME}" + (f" (found {found})" if found else "") + "; .bin "
            "(torch pickle) adapters are not supported, re-save with safe_serialization=True"
        )
    with open(config_file) as f:
        return json.load(f), read_safetensors(weights_file)


def load_peft_lora(path: str, config: ModelConfig) -> LoRAWeights:
    """The PEFT LoRA adapter directory `path`, for a base model of shape `config`."""
    modules, layer_re = _family(config)
    ac, tensors = _read(path)
    _check_adapter_config(ac, path, modules)
    r, L = ac["r"], config.n_layers
    alpha = ac.get("lora_alpha", 8)  # PEFT's default
    scaling = alpha / (math.sqrt(r) if ac.get("use_rslora") else r)
    dims = lora_dims(config)  # target -> (D_in, D_out), heads flattened

    # (module, layer) -> {"A": key, "B": key}; everything else is collected as a problem.
    found: dict[tuple[str, int], dict[str, str]] = {}
    unsupported, unexpected = set(), []
    for key in tensors:
        m = _LORA_KEY.fullmatch(key)
        if m is None:
            if ".lora_" in key:  # lora_embedding_A, lora_magnitude_vector, ...
                unsupported.add(key.removeprefix("base_model.model.").split(".lora_")[0])
            else:
                unexpected.append(key)
            continue
        module, ab = m.groups()
        lm = layer_re.fullmatch(module)
        if lm is None or lm.group(2) not in modules:
            unsupported.add(module)
            continue
        layer = int(lm.group(1))
        if layer >= L:
            raise ValueError(f"{path}: {key}: layer {layer} out of range (the model has {L})")
        found.setdefault((lm.group(2), layer), {})[ab] = key
    if unsupported:
        raise ValueError(f"{path}: LoRA on modules we cannot apply: {sorted(unsupported)[:8]}")
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors in {_WEIGHTS_NAME}: {sorted(unexpected)[:8]}")

    targets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for (module, layer), keys in sorted(found.items()):
        for ab in "AB":
            if ab not in keys:
                other = keys["B" if ab == "A" else "A"]
                raise ValueError(f"{path}: {other} has no matching lora_{ab}")
        names = modules[module]
        d_in = dims[names[0]][0]
        outs = [dims[t][1] for t in names]
        lora_a = _checked(tensors, keys["A"], (r, d_in), 0, path)  # [r, D_in]
        lora_b = _checked(tensors, keys["B"], (sum(outs), r), 1, path)  # [D_out..., r]
        # Rows of a fused B (c_attn) are q, k, v in order; all three share A.
        for name, part in zip(names, np.split(lora_b, np.cumsum(outs)[:-1]), strict=True):
            if name not in targets:  # zeros in the layers it skips
                shapes = (L, d_in, r), (L, r, dims[name][1])
                targets[name] = (np.zeros(shapes[0], np.float32), np.zeros(shapes[1], np.float32))
            a, b = targets[name]
            a[layer] = lora_a.T
            b[layer] = scaling * part.T
    return LoRAWeights(rank=r, targets={t: targets[t] for t in _TARGETS if t in targets})


def _checked(
    tensors: dict[str, np.ndarray], key: str, want: tuple[int, int], rank_axis: int, path: str
) -> np.ndarray:
    """`tensors[key]` if its shape is `want`; a rank or a shape error otherwise."""
    got = tuple(tensors[key].shape)
    if got == want:
        return tensors[key]
    other = 1 - rank_axis
    if len(got) == 2 and got[other] == want[other]:
        raise ValueError(
            f"{path}: {key} has rank {got[rank_axis]} but {_CONFIG_NAME} says r={want[rank_axis]}"
        )
    raise ValueError(f"{path}: {key}: shape {got} does not fit the config, want {want}")


__all__ = ["LoRAWeights", "load_peft_lora"]
