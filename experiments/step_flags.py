"""The model-config flags of the whole-step scripts (bench_step, profile_step,
offline_gpu_hlo), defined once here so the three build the same step from the same words;
and how two of them print their report.

Imported by the scripts beside it (run as `python experiments/NAME.py`, which puts this
folder on the path); each calls `define` once at import with its own defaults.
"""

from __future__ import annotations

from absl import flags

from models import get_config
from models.config import ModelConfig, parse_attention_options
from models.decoder import layer_unroll

_FLAGS: dict[str, flags.FlagHolder] = {}


def define(*, dtype: str = "bfloat16", attention_impl: str = "pallas") -> None:
    """Define the shared flags (once per process), with this script's defaults."""
    _FLAGS["dtype"] = flags.DEFINE_string("dtype", dtype, "Parameter / cache dtype.")
    _FLAGS["attention_impl"] = flags.DEFINE_string(
        "attention_impl", attention_impl, "reference or pallas."
    )
    _FLAGS["quantization"] = flags.DEFINE_enum(
        "quantization", None, ["int8"], "Weight-only int8 layer kernels."
    )
    _FLAGS["kv_cache_dtype"] = flags.DEFINE_enum(
        "kv_cache_dtype",
        "auto",
        ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
        "KV cache element type.",
    )
    _FLAGS["layer_unroll"] = flags.DEFINE_integer(
        "layer_unroll", None, "Layers per scan iteration (ModelConfig.layer_unroll); unset: auto."
    )
    _FLAGS["attention_options"] = flags.DEFINE_string(
        "attention_options", "", "Pallas kernel options, e.g. one_launch=true,fuse_kv_write=true."
    )
    _FLAGS["fused_add_norm"] = flags.DEFINE_bool(
        "fused_add_norm", None, "ModelConfig.fused_add_norm (residual add + norm in one kernel)."
    )
    _FLAGS["fused_linear"] = flags.DEFINE_bool(
        "fused_linear", None, "ModelConfig.fused_linear (a layer's linear work as four kernels)."
    )
    _FLAGS["page_size"] = flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")


def value(name: str):
    """One shared flag's value (`define` first)."""
    return _FLAGS[name].value


def model_config(name: str) -> ModelConfig:
    """The preset `name` with this run's dtype, attention, quantization, cache and fusions."""
    return get_config(
        name,
        dtype=value("dtype"),
        attention_impl=value("attention_impl"),
        quantization=value("quantization"),
        kv_cache_dtype=value("kv_cache_dtype"),
        layer_unroll=value("layer_unroll"),
        attention_options=parse_attention_options(value("attention_options")),
        fused_add_norm=value("fused_add_norm"),
        fused_linear=value("fused_linear"),
    )


def describe(name: str, cfg: ModelConfig) -> str:
    """The step's settings in one line, for the head of a report."""
    return (
        f"{name} {value('dtype')}{' int8' if value('quantization') else ''} "
        f"kv {value('kv_cache_dtype')} {value('attention_impl')} "
        f"layer_unroll {layer_unroll(cfg)} options {dict(cfg.attention_options)} "
        f"fused_add_norm {cfg.fused_add_norm} fused_linear {cfg.fused_linear}"
    )


def print_report(lines: list[str], out: str | None) -> None:
    """Print a report's lines, and write them to `out` too when given."""
    print("\n".join(lines))
    if out:
        with open(out, "w") as f:
            f.write("\n".join(lines) + "\n")
