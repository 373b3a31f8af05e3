"""Model configuration: one decoder family with switches, and presets by name.

GPT-2/GPT-3 style: learned positions, LayerNorm, GELU, multi-head attention, biases.
Llama style: RoPE, RMSNorm, SwiGLU, grouped-query attention, optionally tied embeddings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

from pallas_kernels.ragged_paged_attention.checks import TUNING_ARGS

Norm = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "swiglu"]
PositionEmbedding = Literal["learned", "rope"]
# "auto": per backend, whichever measured faster there (models/attention.py, AUTO_ATTENTION).
AttentionImpl = Literal["auto", "reference", "pallas"]
Quantization = Literal["int8"] | None  # weight-only, per output channel (models/quantize.py)
# The KV cache's element type (vLLM's --kv-cache-dtype): "auto" is the model's dtype; the fp8
# kinds store K/V in 8 bits (half of bf16's bytes, so twice the tokens per GiB) and attention
# widens them to the compute dtype as it reads. "fp8" means fp8_e4m3.
KVCacheDtype = Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]
KV_CACHE_DTYPES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
# What `ModelConfig.attention_options` may set: the Pallas kernel's tuning keywords, and
# "fuse_kv_write" (the kernel stores the step's K/V into the pages itself, so no scatter
# kernels run; `ragged_paged_attention(new_kv=)`).
ATTENTION_OPTIONS = (*TUNING_ARGS, "fuse_kv_write")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


def parse_attention_options(
    options: str | Mapping[str, int | bool] | None,
) -> dict[str, int | bool]:
    """Attention options from a flag's text, e.g. `one_launch=true,num_kv_splits=4` (values
    are integers, or true / false), or a mapping as it is; None or "" is none."""
    if options is None or isinstance(options, Mapping):
        return dict(options or {})
    parsed = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        name, eq, value = item.partition("=")
        if not eq or name not in ATTENTION_OPTIONS:
            raise ValueError(
                f"attention option {item!r}: want name=value, name one of "
                f"{', '.join(ATTENTION_OPTIONS)}"
            )
        low = value.strip().lower()
        if low in ("true", "false"):
            parsed[name] = low == "true"
        elif low.lstrip("-").isdigit():
            parsed[name] = int(low)
        else:
            raise ValueError(f"attention option {item!r}: the value must be an integer or bool")
    return parsed


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static, hashable description of a decoder (safe as a `jax.jit` static argument)."""

    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_seq_len: int
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    activation: Activation = "gelu"
    position: PositionEmbedding = "learned"
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    use_bias: bool = True
    # Dtype of parameters, activations and the KV cache; softmax and norms accumulate in f32.
    dtype: str = "float32"
    attention_impl: AttentionImpl = "auto"
    quantization: Quantization = None
    kv_cache_dtype: KVCacheDtype = "auto"
    # Sliding-window attention (Mistral): each token attends to itself and the
    # sliding_window - 1 tokens before it (as torch's Mistral and vLLM count); None: all.
    sliding_window: int | None = None
    # Layers per iteration of the scan over the stacked layers (`lax.scan(unroll=)`):
    # n_layers or more unrolls them all, so no loop runs and XLA sees every layer's kernels
    # at once (compile time then grows with depth); None: this backend's default
    # (`models/decoder.py: AUTO_LAYER_UNROLL`).
    layer_unroll: int | None = None
    # The Pallas attention kernel's options (names in ATTENTION_OPTIONS) as sorted (name,
    # value) pairs; a dict is accepted and sorted. Each one set here overrides the
    # backend's default (`models/attention.py: KERNEL_OPTIONS`).
    attention_options: tuple[tuple[str, int | bool], ...] = ()
    # Each residual add and the norm after it as one Pallas kernel (`pallas_kernels/add_norm`)
    # instead of XLA's ops; None: this backend's default (`models/decoder.py:
    # AUTO_FUSED_ADD_NORM`). Unsharded steps only (with tensor parallelism XLA's ops run).
    # With `fused_linear` the linear kernels take the adds and norms in, and this is moot.
    fused_add_norm: bool | None = None
    # Each linear layer with its bias and activation, the norm before it and the residual add
    # after it as one Pallas kernel reading the stacked weights at the layer
    # (`pallas_kernels/linear`) instead of XLA's GEMM, norm and epilogue ops; None: this
    # backend's default (`models/decoder.py: AUTO_FUSED_LINEAR`). Unsharded, unquantized
    # steps only, and not for a projection that has LoRA adapters (XLA's ops run those).
    fused_linear: bool | None = None

    def __post_init__(self) -> None:
        options = self.attention_options
        options = options.items() if isinstance(options, dict) else options
        object.__setattr__(self, "attention_options", tuple(sorted(tuple(o) for o in options)))
        for name, _ in self.attention_options:
            if name not in ATTENTION_OPTIONS:
                raise ValueError(
                    f"unknown attention option {name!r}; known: {', '.join(ATTENTION_OPTIONS)}"
                )
        if self.quantization not in (None, "int8"):
            raise ValueError(f"quantization must be None or int8; got {self.quantization!r}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be auto, {', '.join(KV_CACHE_DTYPES)}; "
                f"got {self.kv_cache_dtype!r}"
            )
        if self.attention_impl not in ("auto", "reference", "pallas"):
            raise ValueError(
                f"attention_impl must be auto, reference or pallas; got {self.attention_impl!r}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None; got {self.sliding_window}")
        if self.layer_unroll is not None and self.layer_unroll < 1:
            raise ValueError(f"layer_unroll must be >= 1 or None; got {self.layer_unroll}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "d_ff"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one KV head (1 for multi-head attention)."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (embeddings included), for memory planning."""
        D, N, K, H, F, L = (
            self.d_model,
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
            self.d_ff,
            self.n_layers,
        )
        bias = self.use_bias
        norm = 2 * D if self.norm == "layernorm" else D
        attn = D * (N + 2 * K) * H + N * H * D + (bias * ((N + 2 * K) * H + D))
        mlp_mats = 3 if self.activation == "swiglu" else 2
        mlp = mlp_mats * D * F + bias * ((mlp_mats - 1) * F + D)
        per_layer = attn + mlp + 2 * norm
        embed = self.vocab_size * D + (self.max_seq_len * D if self.position == "learned" else 0)
        head = 0 if self.tie_embeddings else D * self.vocab_size
        return L * per_layer + embed + norm + head

    @property
    def cache_dtype(self) -> str:
        """The KV cache's element type: the model's dtype, or an fp8 kind."""
        return KV_CACHE_DTYPES.get(self.kv_cache_dtype, self.dtype)

    def kv_bytes_per_token(self, dtype_bytes: int | None = None) -> int:
        """Bytes of K and V one token occupies across all layers (in the cache's dtype)."""
        if dtype_bytes is None:
            dtype_bytes = _DTYPE_BYTES[self.cache_dtype]
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes


def _gpt(name: str, layers: int, d: int, heads: int, ctx: int = 1024) -> ModelConfig:
    return ModelConfig(
        name=name,
        vocab_size=50257,
        d_model=d,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=d // heads,
        d_ff=4 * d,
        max_seq_len=ctx,
    )


def _llama_like(name: str, **kw) -> ModelConfig:
    base = dict(
        norm="rmsnorm",
        activation="swiglu",
        position="rope",
        use_bias=False,
        tie_embeddings=True,
    )
    base.update(kw)
    return ModelConfig(name=name, **base)


PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        # Tiny configs for tests: a few layers, small vocab, runs in milliseconds on CPU.
        ModelConfig(
            name="tiny-gpt",
            vocab_size=256,
            d_model=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=4,
            head_dim=16,
            d_ff=256,
            max_seq_len=256,
        ),
        _llama_like(
            "tiny-llama",
            vocab_size=256,
            d_model=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            head_dim=16,
            d_ff=128,
            max_seq_len=256,
            norm_eps=1e-5,
        ),
        _gpt("gpt2", 12, 768, 12),
        _gpt("gpt2-medium", 24, 1024, 16),
        _gpt("gpt2-large", 36, 1280, 20),
        _gpt("gpt2-xl", 48, 1600, 25),
        # The paper's GPT-3 shapes (Orca §6): random weights, context 2048.
        _gpt("gpt3-13b", 40, 5120, 40, ctx=2048),
        _gpt("gpt3-101b", 80, 10240, 80, ctx=2048),
        _gpt("gpt3-175b", 96, 12288, 96, ctx=2048),
        _gpt("gpt3-341b", 120, 15360, 120, ctx=2048),
        _llama_like(
            "smollm2-135m",
            vocab_size=49152,
            d_model=576,
            n_layers=30,
            n_heads=9,
            n_kv_heads=3,
            head_dim=64,
            d_ff=1536,
            max_seq_len=8192,
            rope_theta=100000.0,
            norm_eps=1e-5,
        ),
    ]
}


def get_config(name: str, **overrides) -> ModelConfig:
    """Preset by name, with optional field overrides (e.g. dtype="bfloat16")."""
    if name not in PRESETS:
        raise ValueError(
            f"unknown model {name!r}: neither a preset ({', '.join(sorted(PRESETS))}) nor a "
            "Hugging Face directory or .gguf file"
        )
    cfg = PRESETS[name]
    return cfg.replace(**overrides) if overrides else cfg
