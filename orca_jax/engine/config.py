"""Engine configuration: scheduling policy, KV cache size, shape buckets."""

from __future__ import annotations

import dataclasses

import jax

from models import ModelConfig
from models.kv_cache import num_pages_for_memory
from orca_jax.engine.speculative import SpeculativeConfig
from orca_jax.runner import RunnerConfig
from orca_jax.scheduler import SchedulerConfig
from sharding import ParallelConfig, check_tensor_parallel, layer_ranges


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs beyond the model; names follow vLLM's engine args."""

    policy: str = "orca"  # "orca" (the paper's Algorithm 1), "paged" or "static"
    max_batch_size: int = 16  # requests per iteration (the paper's max_bs)
    block_size: int = 16  # tokens per KV page
    num_kv_blocks: int | None = None  # KV pages incl. the null page; None: from memory
    kv_cache_memory: int = 256 * 2**20  # bytes of KV cache (all devices) if no num_kv_blocks
    n_workers: int = 1  # batches in flight (orca, paged; static runs one)
    # Dispatch the next batch before the returned one's text work (detokenizing, stop
    # strings, outputs), so the device runs while the host does it (Engine.step).
    async_output: bool = True
    tensor_parallel_size: int = 1  # devices that split heads and FFN (see sharding/)
    pipeline_parallel_size: int = 1  # stages of consecutive layers, each on its own devices
    max_model_len: int | None = None  # longest prompt + output; None: the model's context
    max_num_batched_tokens: int = 512  # token bucket ceiling, and paged's per-step budget
    scheduling_order: str = "fcfs"  # paged only: "fcfs" or "priority"
    enable_prefix_caching: bool = False  # paged only: reuse K/V of full blocks already computed
    max_logprobs: int = 0  # top log-probabilities a request may ask for
    max_logit_bias: int = 300  # biased ids per request: logit_bias, bad_words, min_tokens' stops
    seed: int = 0  # draws a seed for requests that set none
    # Speculative decoding by n-gram lookup (orca and paged policies); None: off.
    speculative: SpeculativeConfig | None = None
    # LoRA adapters (vLLM's names): requests may name one (`lora_request`); up to max_loras on
    # the device at once, each of rank <= max_lora_rank (orca_jax/engine/lora.py).
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    # Compile every shape bucket at start-up. None: yes on accelerators; on the CPU, where one
    # compile of a real model takes seconds and a full warm-up minutes, buckets compile on
    # first use instead (steady state still compiles nothing once each bucket has been seen).
    warmup: bool | None = None

    @property
    def parallel(self) -> ParallelConfig:
        return ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size)

    def resolve(self, model: ModelConfig) -> tuple[SchedulerConfig, RunnerConfig]:
        """The scheduler's and runner's configs for this model."""
        max_len = self.max_model_len or model.max_seq_len
        if max_len > model.max_seq_len:
            raise ValueError(
                f"max_model_len={max_len} exceeds {model.name}'s context {model.max_seq_len}"
            )
        check_tensor_parallel(model, self.parallel.tensor_parallel_size)
        layer_ranges(model.n_layers, self.parallel.pipeline_parallel_size)  # raises if too many
        num_blocks = self.num_kv_blocks or num_pages_for_memory(
            model, self.block_size, self.kv_cache_memory
        )
        if num_blocks < 2:
            raise ValueError(f"KV cache too small: {num_blocks} blocks (need >= 2)")
        max_tokens = max(self.max_num_batched_tokens, self.max_batch_size)
        max_rows = self.max_batch_size  # logits rows per step: one per request...
        if self.speculative is not None:
            if self.policy == "static":
                raise ValueError(
                    "speculative decoding needs an iteration-level policy (orca or paged); "
                    "static batching is the paper's baseline and stays plain"
                )
            # ... and one more per draft, within the token bucket.
            max_rows *= 1 + self.speculative.num_speculative_tokens
        max_rows = min(max_rows, max_tokens)
        if self.enable_lora:
            self._check_lora()
        runner = RunnerConfig(
            num_pages=num_blocks,
            page_size=self.block_size,
            max_num_tokens=max_tokens,
            max_num_reqs=max_rows,
            max_model_len=max_len,
            max_logit_bias=self.max_logit_bias,
            max_loras=self.max_loras if self.enable_lora else 0,
            max_lora_rank=self.max_lora_rank,
        )
        within = self.speculative is not None and self.speculative.within_bucket
        if within is None:  # the default: where compute bounds a step
            within = jax.default_backend() == "cpu"
        sched = SchedulerConfig(
            policy=self.policy,
            max_batch_size=self.max_batch_size,
            num_blocks=num_blocks,
            block_size=self.block_size,
            max_num_batched_tokens=max_tokens,
            n_workers=self.n_workers,
            max_model_len=max_len,
            scheduling_order=self.scheduling_order,
            enable_prefix_caching=self.enable_prefix_caching,
            draft_token_buckets=runner.token_buckets if within else (),
        )
        return sched, runner

    def _check_lora(self) -> None:
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError(
                f"max_loras ({self.max_loras}) and max_lora_rank ({self.max_lora_rank}) must "
                "be >= 1"
            )
        if jax.process_count() > 1:
            raise ValueError(
                "LoRA adapters are served within one process (one device, tensor-parallel "
                "devices, pipeline stages); multi-process runs do not take them yet"
            )
