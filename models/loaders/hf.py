"""Hugging Face checkpoints (torch layout) to our params pytree.

Legend: V vocab, D model, N heads, K kv heads, H head dim, F ffn, L layers, P positions.
Torch `nn.Linear` weights are stored [out, in]; GPT-2's `Conv1D` weights are stored [in, out].
Our kernels are [in..., out...] with heads split out, layers stacked on a leading L axis.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from models.config import PRESETS, ModelConfig
from models.decoder import param_shapes
from models.layers import Params

StateDict = Mapping[str, np.ndarray]

# Buffers some checkpoints carry that are not parameters (causal masks, RoPE tables).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def _architecture(config: ModelConfig) -> ModelConfig:
    return dataclasses.replace(config, name="", dtype="float32", attention_impl="reference")


def preset_name(config: ModelConfig) -> str:
    """Name of the preset with exactly these shapes and numerics (dtype aside), else config.name."""
    arch = _architecture(config)
    return next((p.name for p in PRESETS.values() if _architecture(p) == arch), config.name)


def config_from_hf_json(path: str, *, name: str | None = None) -> ModelConfig:
    """ModelConfig from a Hugging Face `config.json` (a file or its directory): gpt2, llama
    or mistral."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as f:
        hf = json.load(f)
    model_type = hf.get("model_type")
    default_name = name or os.path.basename(os.path.dirname(os.path.abspath(path))) or model_type
    if model_type == "gpt2":
        cfg = _gpt2_config(hf, default_name)
    elif model_type == "llama":
        cfg = _llama_config(hf, default_name)
    elif model_type == "mistral":  # Llama's layout, plus a sliding attention window
        cfg = _llama_config(hf, default_name).replace(sliding_window=hf.get("sliding_window"))
    else:
        raise ValueError(
            f"unsupported model_type {model_type!r} in {path} (gpt2, llama or mistral)"
        )
    return cfg if name else cfg.replace(name=preset_name(cfg))


def _gpt2_config(hf: dict, name: str) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise ValueError(f"GPT-2 activation {act!r}: only the tanh-approximate GELU is supported")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ValueError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
    d, heads = hf["n_embd"], hf["n_head"]
    return ModelConfig(
        name=name,
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=hf["n_layer"],
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=d // heads,
        d_ff=hf.get("n_inner") or 4 * d,
        max_seq_len=hf["n_positions"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def _llama_config(hf: dict, name: str) -> ModelConfig:
    if hf.get("rope_scaling"):
        raise ValueError(f"rope_scaling {hf['rope_scaling']!r} is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Llama hidden_act {hf['hidden_act']!r}: only silu (SwiGLU) supported")
    attn_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if attn_bias != mlp_bias:
        raise ValueError("attention_bias and mlp_bias must agree (one use_bias switch)")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    return ModelConfig(
        name=name,
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or d // heads,
        d_ff=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation="swiglu",
        position="rope",
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        use_bias=bool(attn_bias),
    )


class _Reader:
    """Takes named tensors out of a state dict, stripping a prefix, and tracks what was used."""

    def __init__(self, sd: StateDict, prefix: str):
        self.sd, self.used = sd, set()
        self.prefix = prefix if any(k.startswith(prefix) for k in sd) else ""

    def __call__(self, name: str, shape: tuple, *, prefixed: bool = True) -> np.ndarray:
        """Tensor `name` as f32 numpy of checkpoint-layout `shape` (None: any size there)."""
        key = self.prefix + name if prefixed and (self.prefix + name) in self.sd else name
        if key not in self.sd:
            raise KeyError(f"state dict has no {key!r}")
        self.used.add(key)
        arr = np.asarray(self.sd[key], np.float32)
        if len(arr.shape) != len(shape) or any(
            want not in (None, got) for got, want in zip(arr.shape, shape, strict=True)
        ):
            raise ValueError(f"{key}: shape {arr.shape} != {tuple(shape)} expected by the config")
        return arr

    def layers(self, fn: Callable[[int], np.ndarray], n_layers: int) -> np.ndarray:
        return np.stack([fn(i) for i in range(n_layers)])  # [L, ...]

    def check_all_used(self, allowed_unused: tuple[str, ...] = ()) -> None:
        unused = [
            k
            for k in self.sd
            if k not in self.used and not k.endswith(_IGNORED_SUFFIXES) and k not in allowed_unused
        ]
        if unused:
            raise ValueError(f"unexpected tensors in state dict: {sorted(unused)[:8]}...")


def _dims(c: ModelConfig) -> tuple[int, ...]:
    """(V, D, N, K, H, F, L) of a config."""
    return c.vocab_size, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.n_layers


def finish_params(params: Params, config: ModelConfig) -> Params:
    """Check a numpy tree against `param_shapes(config)`; put it on the device in config.dtype."""
    want = param_shapes(config)
    got_struct = jax.tree_util.tree_structure(params)
    if got_struct != jax.tree_util.tree_structure(want):
        raise ValueError(f"param tree {got_struct} does not match the config's {want}")
    for (path, arr), sds in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(want), strict=True
    ):
        if arr.shape != sds.shape:
            raise ValueError(
                f"{jax.tree_util.keystr(path)}: shape {arr.shape} != expected {sds.shape}"
            )
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, config.dtype), params)


def gpt2_params_from_state_dict(sd: StateDict, config: ModelConfig) -> Params:
    """Our params from a GPT-2 state dict (`transformer.h.0...` or `h.0...`; Conv1D [in, out])."""
    r = _Reader(sd, "transformer.")
    V, D, N, _, H, F, L = _dims(config)
    h = lambda i, name, shape: r(f"h.{i}.{name}", shape)

    def c_attn(i: int, part: int, suffix: str) -> np.ndarray:
        shape = (D, 3 * N * H) if suffix == "weight" else (3 * N * H,)
        w = np.split(h(i, f"attn.c_attn.{suffix}", shape), 3, axis=-1)[part]  # q, k or v
        return w.reshape(*w.shape[:-1], N, H)

    def linear(name: str, in_shape: tuple, out_shape: tuple) -> Params:
        n_in, n_out = math.prod(in_shape), math.prod(out_shape)
        weight = lambda i: h(i, f"{name}.weight", (n_in, n_out)).reshape(*in_shape, *out_shape)
        bias = lambda i: h(i, f"{name}.bias", (n_out,)).reshape(out_shape)
        return {"kernel": r.layers(weight, L), "bias": r.layers(bias, L)}

    def ln(name: str) -> Params:
        return {
            "scale": r.layers(lambda i: h(i, f"{name}.weight", (D,)), L),
            "bias": r.layers(lambda i: h(i, f"{name}.bias", (D,)), L),
        }

    qkv = {
        key: {
            "kernel": r.layers(lambda i, j=j: c_attn(i, j, "weight"), L),  # [L, D, N, H]
            "bias": r.layers(lambda i, j=j: c_attn(i, j, "bias"), L),  # [L, N, H]
        }
        for j, key in enumerate(("q", "k", "v"))
    }
    wpe = r("wpe.weight", (None, D))  # [P, D], P >= max_seq_len
    if wpe.shape[0] < config.max_seq_len:
        raise ValueError(f"checkpoint has {wpe.shape[0]} positions < {config.max_seq_len}")
    params = {
        "embed": {"tokens": r("wte.weight", (V, D)), "positions": wpe[: config.max_seq_len]},
        "layers": {
            "attn_norm": ln("ln_1"),
            **qkv,
            "o": linear("attn.c_proj", (N, H), (D,)),
            "mlp_norm": ln("ln_2"),
            "mlp": {"up": linear("mlp.c_fc", (D,), (F,)), "down": linear("mlp.c_proj", (F,), (D,))},
        },
        "final_norm": {"scale": r("ln_f.weight", (D,)), "bias": r("ln_f.bias", (D,))},
    }
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": r("lm_head.weight", (V, D), prefixed=False).T}  # [D, V]
    r.check_all_used(allowed_unused=("lm_head.weight",))
    return finish_params(params, config)


def llama_params_from_state_dict(sd: StateDict, config: ModelConfig) -> Params:
    """Our params from a Llama state dict (`model.layers.0.self_attn.q_proj.weight`, [out, in])."""
    r = _Reader(sd, "model.")
    V, D, N, K, H, F, L = _dims(config)
    lay = lambda i, name, shape: r(f"layers.{i}.{name}", shape)

    def linear(name: str, in_shape: tuple, out_shape: tuple) -> Params:
        n_in, n_out = math.prod(in_shape), math.prod(out_shape)
        # torch [out, in] -> ours [in..., out...]
        weight = lambda i: lay(i, f"{name}.weight", (n_out, n_in)).T.reshape(*in_shape, *out_shape)
        p = {"kernel": r.layers(weight, L)}
        if config.use_bias:
            p["bias"] = r.layers(lambda i: lay(i, f"{name}.bias", (n_out,)).reshape(out_shape), L)
        return p

    norm = lambda name: {"scale": r.layers(lambda i: lay(i, f"{name}.weight", (D,)), L)}
    params = {
        "embed": {"tokens": r("embed_tokens.weight", (V, D))},
        "layers": {
            "attn_norm": norm("input_layernorm"),
            "q": linear("self_attn.q_proj", (D,), (N, H)),
            "k": linear("self_attn.k_proj", (D,), (K, H)),
            "v": linear("self_attn.v_proj", (D,), (K, H)),
            "o": linear("self_attn.o_proj", (N, H), (D,)),
            "mlp_norm": norm("post_attention_layernorm"),
            "mlp": {
                "gate": linear("mlp.gate_proj", (D,), (F,)),
                "up": linear("mlp.up_proj", (D,), (F,)),
                "down": linear("mlp.down_proj", (F,), (D,)),
            },
        },
        "final_norm": {"scale": r("norm.weight", (D,))},
    }
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": r("lm_head.weight", (V, D), prefixed=False).T}  # [D, V]
    r.check_all_used(allowed_unused=("lm_head.weight",))
    return finish_params(params, config)


def _safetensors_files(path_or_dir: str) -> list[str]:
    if os.path.isfile(path_or_dir):
        return [path_or_dir]
    single = os.path.join(path_or_dir, "model.safetensors")
    files = (
        [single]
        if os.path.exists(single)
        else sorted(glob.glob(os.path.join(path_or_dir, "*.safetensors")))
    )
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path_or_dir}")
    return files


def read_safetensors(path_or_dir: str) -> dict[str, np.ndarray]:
    """All tensors of `model.safetensors` (or of every `*.safetensors` shard) as f32 numpy."""
    from safetensors import safe_open  # noqa: PLC0415

    sd: dict[str, np.ndarray] = {}
    for file in _safetensors_files(path_or_dir):
        # The flax framework reads bf16 too (numpy has no bf16 of its own).
        with safe_open(file, framework="flax") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                sd[key] = np.asarray(f.get_tensor(key), np.float32)
    return sd


def load_safetensors(path_or_dir: str, config: ModelConfig | None = None) -> Params:
    """Params from HF safetensors; the config defaults to the directory's `config.json`."""
    if config is None:
        directory = path_or_dir if os.path.isdir(path_or_dir) else os.path.dirname(path_or_dir)
        config = config_from_hf_json(directory)
    sd = read_safetensors(path_or_dir)
    if config.position == "learned" and config.activation == "gelu":
        return gpt2_params_from_state_dict(sd, config)
    if config.position == "rope" and config.activation == "swiglu":
        return llama_params_from_state_dict(sd, config)
    raise ValueError(f"no loader for position={config.position}, activation={config.activation}")


__all__ = [
    "config_from_hf_json",
    "finish_params",
    "gpt2_params_from_state_dict",
    "llama_params_from_state_dict",
    "load_safetensors",
    "preset_name",
    "read_safetensors",
]
