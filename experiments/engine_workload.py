"""The engine workload shared by the engine benchmark and the engine profile: R requests of
P random prompt tokens each generate O tokens (EOS ignored), all admitted together.

Imported by the scripts beside it (run as `python experiments/NAME.py`, which puts this
folder on the path).
"""

from __future__ import annotations

import time

import numpy as np

from models import ModelConfig, get_config
from models.config import parse_attention_options
from orca_jax import Engine, EngineConfig, SamplingParams


def model_config(
    name: str,
    dtype: str,
    layer_unroll: int | None,
    attention_options: str,
    fused_add_norm: bool | None,
) -> ModelConfig:
    """The preset `name` as the scripts' flags set it (`--attention_options` as text)."""
    return get_config(
        name,
        dtype=dtype,
        layer_unroll=layer_unroll,
        attention_options=parse_attention_options(attention_options),
        fused_add_norm=fused_add_norm,
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
