"""The engine workload shared by the engine benchmark and the engine profile: R requests of
P random prompt tokens each generate O tokens (EOS ignored), all admitted together.

Imported by the scripts beside it (run as `python experiments/NAME.py`, which puts this
folder on the path).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from absl import flags

from models import ModelConfig, get_config
from models.config import parse_attention_options
from orca_jax import Engine, EngineConfig, SamplingParams


@dataclasses.dataclass(frozen=True)
class WorkloadFlags:
    """The flags both engine scripts take: the model and the workload's shape."""

    model: flags.FlagHolder
    dtype: flags.FlagHolder
    num_reqs: flags.FlagHolder
    prompt_len: flags.FlagHolder
    output_len: flags.FlagHolder
    layer_unroll: flags.FlagHolder
    attention_options: flags.FlagHolder
    fused_add_norm: flags.FlagHolder

    def model_config(self) -> ModelConfig:
        """The preset as the flags set it (`--attention_options` as text)."""
        return get_config(
            self.model.value,
            dtype=self.dtype.value,
            layer_unroll=self.layer_unroll.value,
            attention_options=parse_attention_options(self.attention_options.value),
            fused_add_norm=self.fused_add_norm.value,
        )


def define_flags(model: str, dtype: str, num_reqs: int) -> WorkloadFlags:
    """Define the shared flags, with a script's own defaults for model, dtype and requests."""
    return WorkloadFlags(
        model=flags.DEFINE_string("model", model, "Model preset (random weights)."),
        dtype=flags.DEFINE_string("dtype", dtype, "Parameter / cache dtype."),
        num_reqs=flags.DEFINE_integer("num_reqs", num_reqs, "Requests running together."),
        prompt_len=flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per request."),
        output_len=flags.DEFINE_integer("output_len", 64, "Tokens generated per request."),
        layer_unroll=flags.DEFINE_integer(
            "layer_unroll", None, "ModelConfig.layer_unroll; unset: auto."
        ),
        attention_options=flags.DEFINE_string(
            "attention_options",
            "",
            "Pallas kernel options, e.g. one_launch=true,fuse_kv_write=true.",
        ),
        fused_add_norm=flags.DEFINE_bool(
            "fused_add_norm",
            None,
            "ModelConfig.fused_add_norm (residual add + norm in one kernel).",
        ),
    )


def prompts(vocab_size: int, num_reqs: int, prompt_len: int) -> list[list[int]]:
    """The same random prompts on every run (seed 0)."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab_size, prompt_len).tolist() for _ in range(num_reqs)]


def sampling(output_len: int) -> SamplingParams:
    return SamplingParams(max_tokens=output_len, ignore_eos=True)


def engine_config(num_reqs: int, prompt_len: int, output_len: int, **fields) -> EngineConfig:
    """Pages for every request's whole sequence, 512 tokens an iteration (or one per
    request), no warm-up (the first pass compiles); `fields` override `EngineConfig`'s."""
    fields = {"max_batch_size": num_reqs, **fields}
    return EngineConfig(
        num_kv_blocks=num_reqs * -(-(prompt_len + output_len) // 16) + 1,
        max_model_len=prompt_len + output_len,
        max_num_batched_tokens=max(num_reqs, 512),
        warmup=False,
        **fields,
    )


def serve(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int]:
    """Seconds to serve every prompt to completion, and iterations taken."""
    start_iters = engine.num_iterations
    t0 = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - t0, engine.num_iterations - start_iters
