"""The absl flags that build an `LLM` (model, engine, parallelism), shared by the CLIs
(`orca_jax.generate`, `orca_jax.serve`). Library code never reads them."""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from models.config import parse_attention_options
from orca_jax import distributed
from orca_jax.engine.speculative import SpeculativeConfig
from orca_jax.llm import LLM
from orca_jax.model_loader import model_config

_MODEL = flags.DEFINE_string(
    "model",
    "smollm2-135m",
    "Model: a preset name, a Hugging Face directory (config.json, *.safetensors, "
    "tokenizer.json) or a .gguf file.",
)
_WEIGHTS = flags.DEFINE_string(
    "weights", None, "Weights: a .gguf, a Hugging Face directory, or 'random' (uses --seed)."
)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer path (default: the weights').")
_CHAT_TEMPLATE = flags.DEFINE_string(
    "chat_template", None, "A Jinja chat template, or a file holding one, replacing the model's."
)
SEED = flags.DEFINE_integer("seed", 0, "Seed for random weights and for sampling.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Compute dtype.")
_ATTENTION = flags.DEFINE_enum(
    "attention_impl", None, ["auto", "reference", "pallas"], "Attention (auto: per backend)."
)
_QUANTIZATION = flags.DEFINE_enum(
    "quantization", None, ["int8"], "Weight-only int8 layer kernels (per output channel)."
)
_KV_CACHE_DTYPE = flags.DEFINE_enum(
    "kv_cache_dtype",
    None,
    ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
    "KV cache element type: auto (the model's dtype) or fp8 (half of bf16's bytes per token; "
    "fp8 = fp8_e4m3).",
)
_LAYER_UNROLL = flags.DEFINE_integer(
    "layer_unroll",
    None,
    "Layers per iteration of the step's loop over layers (default: the backend's; the "
    "model's layer count unrolls them all: no loop, compile time grows with depth).",
)
_ATTENTION_OPTIONS = flags.DEFINE_string(
    "attention_options",
    None,
    "The Pallas attention kernel's options over the backend's defaults, e.g. "
    "fuse_kv_write=true,one_launch=true,num_kv_splits=4 (models/config.py).",
)


@flags.validator("attention_options")
def _check_attention_options(text: str | None) -> bool:
    """A bad --attention_options is a flag error (one line), not a traceback at start-up."""
    try:
        parse_attention_options(text)
    except ValueError as e:
        raise flags.ValidationError(str(e)) from None
    return True


_ENABLE_LORA = flags.DEFINE_bool(
    "enable_lora", False, "Serve LoRA adapters (requests name one; serve: --lora_modules)."
)
_MAX_LORAS = flags.DEFINE_integer("max_loras", 1, "LoRA adapters on the device at once.")
_MAX_LORA_RANK = flags.DEFINE_integer("max_lora_rank", 16, "Largest LoRA rank served.")
_POLICY = flags.DEFINE_enum("policy", "orca", ["orca", "paged", "static"], "Scheduling policy.")
_MAX_BATCH = flags.DEFINE_integer("max_batch_size", 16, "Requests per iteration.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 16, "Tokens per KV block.")
_NUM_BLOCKS = flags.DEFINE_integer("num_kv_blocks", None, "KV blocks (block 0 is reserved).")
_KV_MEMORY = flags.DEFINE_integer("kv_cache_memory", 256 * 2**20, "KV bytes if no block count.")
_N_WORKERS = flags.DEFINE_integer("n_workers", 1, "Batches in flight (orca, paged).")
_ORDER = flags.DEFINE_enum(
    "scheduling_order",
    "fcfs",
    ["fcfs", "priority"],
    "paged: serve waiting requests first come first served, or by their priority (lower "
    "first; a running request may be preempted for a more urgent one).",
)
_ASYNC_OUTPUT = flags.DEFINE_bool(
    "async_output",
    True,
    "Dispatch the next batch before the returned one's text work, so the device runs "
    "while the host detokenizes (--noasync_output: emit each batch before the next).",
)
_PREFIX_CACHING = flags.DEFINE_bool(
    "enable_prefix_caching", False, "paged: reuse the K/V of prompt prefixes already computed."
)
_TP = flags.DEFINE_integer("tensor_parallel_size", 1, "Devices splitting heads and FFN.")
_PP = flags.DEFINE_integer("pipeline_parallel_size", 1, "Pipeline stages (layer groups).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, to run over several processes."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index (0 schedules).")
_MAX_LEN = flags.DEFINE_integer(
    "max_model_len",
    None,
    "Longest prompt + output (default: 2048, or the model's context if less).",
)
_MAX_TOKENS_STEP = flags.DEFINE_integer("max_num_batched_tokens", 512, "Tokens per iteration.")


_SPECULATIVE = flags.DEFINE_string(
    "speculative_config",
    None,
    'Speculative decoding as vLLM takes it, JSON: \'{"method": "ngram", '
    '"num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 1}\'.',
)


flags.DEFINE_alias("max_num_seqs", "max_batch_size")  # vLLM's name


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with vLLM's dashed spellings taken too (`--max-num-seqs=8` is
    `--max_num_seqs=8`): what `app.run(main, flags_parser=parse_flags)` uses. A bad flag
    ends the program with absl's one-line message (exit 1)."""
    normalized = [argv[0]]
    for arg in argv[1:]:
        if arg.startswith("--") and not arg.startswith("---"):
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
        normalized.append(arg)
    try:
        return flags.FLAGS(normalized)
    except flags.Error as e:  # as absl's own parser reports it: a line, no traceback
        sys.stderr.write(f"FATAL Flags parsing error: {e}\n")
        sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(1)


def build_llm(**overrides) -> LLM:
    """Join a multi-process run if asked (--coordinator_address), then build the `LLM`."""
    if _COORDINATOR.value:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    kwargs = dict(
        weights=_WEIGHTS.value,
        tokenizer=_TOKENIZER.value,
        seed=SEED.value,
        dtype=_DTYPE.value,
        attention_impl=_ATTENTION.value,
        quantization=_QUANTIZATION.value,
        kv_cache_dtype=_KV_CACHE_DTYPE.value,
        layer_unroll=_LAYER_UNROLL.value,
        attention_options=_ATTENTION_OPTIONS.value,
        enable_lora=_ENABLE_LORA.value,
        max_loras=_MAX_LORAS.value,
        max_lora_rank=_MAX_LORA_RANK.value,
        policy=_POLICY.value,
        max_batch_size=_MAX_BATCH.value,
        block_size=_BLOCK_SIZE.value,
        num_kv_blocks=_NUM_BLOCKS.value,
        kv_cache_memory=_KV_MEMORY.value,
        n_workers=_N_WORKERS.value,
        scheduling_order=_ORDER.value,
        async_output=_ASYNC_OUTPUT.value,
        enable_prefix_caching=_PREFIX_CACHING.value,
        tensor_parallel_size=_TP.value,
        pipeline_parallel_size=_PP.value,
        max_model_len=_MAX_LEN.value or min(2048, model_config(_MODEL.value).max_seq_len),
        max_num_batched_tokens=_MAX_TOKENS_STEP.value,
        speculative_config=speculative_config(),
    )
    llm = LLM(_MODEL.value, **(kwargs | overrides))
    if _CHAT_TEMPLATE.value is not None:
        tok = llm.get_tokenizer()
        if tok is None:
            raise ValueError("--chat_template: this model has no tokenizer")
        tok.chat_template = read_template(_CHAT_TEMPLATE.value)
    return llm


def speculative_config() -> dict | None:
    """--speculative_config read as JSON (None when not given)."""
    return _read_speculative(_SPECULATIVE.value)


def _read_speculative(value: str | None) -> dict | None:
    if not value:
        return None
    try:
        spec = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"--speculative_config is not JSON: {e}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"--speculative_config must be a JSON object, got {value}")
    SpeculativeConfig.from_dict(spec)  # its own checks
    return spec


def _check_speculative(value: str | None) -> bool:
    try:
        _read_speculative(value)
    except ValueError as e:
        raise flags.ValidationError(str(e)) from None
    return True


flags.register_validator(_SPECULATIVE, _check_speculative)


def read_template(value: str) -> str:
    """A chat template given as a file path, or as the template itself."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:  # neither a file nor Jinja: most likely a mistyped path
        raise ValueError(f"--chat_template={value!r} is not a file, nor a Jinja template")
    return value


def model_name() -> str:
    return _MODEL.value
