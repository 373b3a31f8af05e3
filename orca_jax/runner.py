"""The model runner: owns params and the paged KV cache, pads batches to buckets, runs steps.

Only integers cross from the host: each call packs `(token_ids, start_pos, block_ids)` per
request into a `RaggedBatch` padded to the smallest (tokens, requests, pages-per-request)
bucket that fits, so a warmed-up runner never compiles again.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from models import (
    KVCache,
    ModelConfig,
    RaggedBatch,
    RandomWeights,
    init_kv_cache,
    init_params,
    pack_batch,
)
from models.batch import bucket, geometric_buckets
from models.decoder import stage_step, token_logprobs
from models.layers import Params
from models.lora import init_lora_slots, slot_arrays, write_slot
from orca_jax.sampler import SamplingMetadata, sample
from sharding import (
    ParallelConfig,
    check_tensor_parallel,
    init_sharded,
    kv_cache_sharding,
    plan_stages,
    replicated,
    shard_params,
    stage_params,
)

SeqSpec = tuple[Sequence[int], int, Sequence[int]]  # (token_ids, start_pos, block_ids)


@dataclasses.dataclass(frozen=True)
class RunnerConfig:
    """Cache geometry and the shape buckets every step is padded to."""

    num_pages: int = 512
    page_size: int = 16
    max_num_tokens: int = 512  # largest token bucket T
    max_num_reqs: int = 64  # largest request bucket R
    max_model_len: int = 1024  # longest context a request may reach
    min_token_bucket: int = 16
    min_req_bucket: int = 8
    min_pages_bucket: int = 8
    # Bias entries per request in the sampler (logit_bias, bad_words, min_tokens' stop ids).
    max_logit_bias: int = 300
    max_loras: int = 0  # LoRA slots on the device (0: no adapters; models/lora.py)
    max_lora_rank: int = 16

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.max_num_reqs > self.max_num_tokens:
            raise ValueError("max_num_reqs must be <= max_num_tokens (each request feeds >= 1)")

    @property
    def max_pages_per_req(self) -> int:
        return -(-self.max_model_len // self.page_size)

    @functools.cached_property
    def token_buckets(self) -> tuple[int, ...]:
        return geometric_buckets(
            min(self.min_token_bucket, self.max_num_tokens), self.max_num_tokens
        )

    @functools.cached_property
    def req_buckets(self) -> tuple[int, ...]:
        return geometric_buckets(min(self.min_req_bucket, self.max_num_reqs), self.max_num_reqs)

    @functools.cached_property
    def pages_buckets(self) -> tuple[int, ...]:
        hi = self.max_pages_per_req
        # Steps of 4: the page axis only bounds the reference's gather (the kernel reads just
        # the pages in use), so fewer buckets means fewer compiles at warm-up.
        return geometric_buckets(min(self.min_pages_bucket, hi), hi, factor=4)

    def bucket(self, num_tokens: int, num_reqs: int, max_pages: int) -> tuple[int, int, int]:
        """The (T, R, pages) bucket a batch of this size is padded to."""
        return (
            bucket(num_tokens, self.token_buckets),
            bucket(num_reqs, self.req_buckets),
            bucket(max_pages, self.pages_buckets),
        )

    def all_buckets(self) -> list[tuple[int, int, int]]:
        """Every (T, R, pages) shape a step can take (R <= T)."""
        return [
            (t, r, p)
            for t, r, p in itertools.product(
                self.token_buckets, self.req_buckets, self.pages_buckets
            )
            if r <= t
        ]


@dataclasses.dataclass
class _Stage:
    """What the runner holds per pipeline stage (one stage without pipeline parallelism)."""

    params: Params  # the stage's slice, placed on its devices
    kv_cache: KVCache  # the pages of the stage's layers
    mesh: Mesh | None  # passed to the step when it splits heads (tensor parallel > 1)
    first: bool
    last: bool
    inputs: jax.sharding.Sharding | None  # where the batch and activations go; None: as given


class ModelRunner:
    """Runs one packed step at a time on the device; returns last-token logits per request.

    With a `ParallelConfig` the model is spread over devices (see `sharding/`): heads and FFN
    split over each stage's devices, layers cut into pipeline stages. Batches stay host-built;
    every call dispatches all stages without waiting, so batches in flight overlap stages.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        params: Params | RandomWeights,
        config: RunnerConfig,
        parallel: ParallelConfig | None = None,
    ):
        """`params`: a tree of arrays (host arrays are best: each device then receives only
        its slices), or `RandomWeights(seed)`, drawn on the devices that hold them."""
        if config.max_model_len > model_config.max_seq_len:
            raise ValueError(
                f"max_model_len={config.max_model_len} exceeds the model's context "
                f"{model_config.max_seq_len}"
            )
        self.model_config = model_config
        self.config = config
        self.parallel = parallel = parallel or ParallelConfig()
        if parallel.num_devices == 1:
            cache = init_kv_cache(model_config, config.num_pages, config.page_size)
            if isinstance(params, RandomWeights):
                params = init_params(model_config, params.seed)
            self.stages = [_Stage(jax.device_put(params), cache, None, True, True, None)]
            if config.max_loras:
                self._add_lora_slots()
            return
        check_tensor_parallel(model_config, parallel.tensor_parallel_size)
        if parallel.pipeline_parallel_size > 1 and jax.process_count() > 1:
            raise ValueError(
                "pipeline parallelism over several processes is not supported: activations "
                "move between stages by device_put, which stays within a process. Across "
                "processes use tensor parallelism (--tensor_parallel_size covering all "
                "devices); pipeline stages work within one process."
            )
        self.stages = []
        plans = plan_stages(
            model_config, parallel.pipeline_parallel_size, parallel.tensor_parallel_size
        )
        for plan in plans:
            stage_config = model_config.replace(n_layers=plan.num_layers)
            cache = init_kv_cache(
                stage_config,
                config.num_pages,
                config.page_size,
                sharding=kv_cache_sharding(plan.mesh),
            )  # allocated split over the stage's devices, never whole on one device
            if isinstance(params, RandomWeights):
                make = functools.partial(_random_stage, model_config, params.seed, plan)
                placed = init_sharded(make, model_config, plan.mesh)
            else:
                placed = shard_params(
                    stage_params(params, plan, model_config), model_config, plan.mesh
                )
            self.stages.append(
                _Stage(
                    params=placed,
                    kv_cache=cache,
                    mesh=plan.mesh if parallel.tensor_parallel_size > 1 else None,
                    first=plan.first,
                    last=plan.last,
                    inputs=replicated(plan.mesh) if len(plans) > 1 else None,
                )
            )
        if config.max_loras:
            self._add_lora_slots()

    def _add_lora_slots(self) -> None:
        """Empty LoRA slots beside each stage's layers (they scan with them), laid out by the
        partition rules on a stage's mesh."""
        cfg = self.config
        for st, config in zip(self.stages, self._stage_configs(), strict=True):
            lora = {"layers": {"lora": init_lora_slots(config, cfg.max_loras, cfg.max_lora_rank)}}
            mesh = st.mesh if st.inputs is None else st.inputs.mesh  # the stage's devices
            if mesh is not None:
                lora = shard_params(lora, config, mesh)
            st.params = {**st.params, "layers": {**st.params["layers"], **lora["layers"]}}

    def _stage_configs(self) -> list[ModelConfig]:
        sizes = [st.kv_cache.k.shape[0] for st in self.stages]  # layers per stage
        return [self.model_config.replace(n_layers=n) for n in sizes]

    def set_lora(self, slot: int, targets: dict) -> None:
        """Put one adapter (`models.loaders.peft_lora.LoRAWeights.targets`) into `slot`."""
        arrays = slot_arrays(self.model_config, self.config.max_lora_rank, targets)
        start = 0
        for st in self.stages:
            n = st.kv_cache.k.shape[0]
            part = {k: (a[start : start + n], b[start : start + n]) for k, (a, b) in arrays.items()}
            old = st.params["layers"]["lora"]
            lora = jax.device_put(
                write_slot(old, slot, part), jax.tree.map(lambda a: a.sharding, old)
            )
            st.params = {**st.params, "layers": {**st.params["layers"], "lora": lora}}
            start += n

    @property
    def mask_words(self) -> int:
        """Words of a structured-output bitmask row (the sampler's `allowed`)."""
        return -(-self.model_config.vocab_size // 32)

    @property
    def kv_cache(self) -> KVCache:
        """The KV cache (single-stage runners; see `stages` for a pipeline's)."""
        if len(self.stages) != 1:
            raise AttributeError("a pipelined runner has one cache per stage: see .stages")
        return self.stages[0].kv_cache

    def build_batch(self, seqs: Sequence[SeqSpec]) -> RaggedBatch:
        """Pack requests into a numpy batch padded to its bucket."""
        t, r, p = self.config.bucket(
            sum(len(t) for t, _, _ in seqs), len(seqs), max(len(b) for _, _, b in seqs)
        )
        return pack_batch(
            list(seqs), page_size=self.config.page_size, num_tokens=t, num_reqs=r, max_blocks=p
        )

    def forward(self, batch: RaggedBatch) -> tuple[jax.Array, jax.Array]:
        """One step on the device: (logits [R, V] with padding rows, the last layer's
        activations [T, D] for `token_logprobs`)."""
        x = logits = None  # x [T, D] between stages; the last stage also gives logits
        for st in self.stages:
            b = batch
            if st.inputs is not None:
                b = jax.device_put(batch, st.inputs)
                x = None if x is None else jax.device_put(x, st.inputs)
            x, logits, st.kv_cache = stage_step(
                st.params,
                st.kv_cache,
                x,
                b,
                self.model_config,
                st.mesh,
                first=st.first,
                last=st.last,
            )
        return logits, x

    def execute(self, batch: RaggedBatch) -> jax.Array:
        """One step on the device; returns logits [R, V] (padding rows included)."""
        return self.forward(batch)[0]

    def run(self, seqs: Sequence[SeqSpec]) -> np.ndarray:
        """Pack, run, and fetch logits [len(seqs), V] of each request's last token."""
        return np.asarray(self.execute(self.build_batch(seqs)))[: len(seqs)]

    def execute_and_sample(
        self,
        batch: RaggedBatch,
        md: SamplingMetadata,
        num_top_logprobs: int = 0,
        prompt_targets: np.ndarray | None = None,
    ) -> StepOutputs:
        """Dispatch one step and sampling; returns device arrays without waiting.

        `md` from `SamplingMetadata.build` (what other processes receive from process 0
        under `orca_jax.distributed`). `prompt_targets` i32[T]: per packed token, the prompt
        token that follows it, to be scored (-1: none); when given, `.prompt` holds the
        scores with the same `num_top_logprobs` alternatives.
        """
        logits, x = self.forward(batch)
        out = StepOutputs(*sample(logits, md, num_top_logprobs))
        if prompt_targets is None:
            return out
        last = self.stages[-1]
        scores = token_logprobs(last.params, x, prompt_targets, self.model_config, num_top_logprobs)
        return out._replace(prompt=scores)

    def warmup(
        self,
        buckets: Sequence[tuple[int, int, int]] | None = None,
        num_top_logprobs: int = 0,
        prompt_logprobs: bool = True,
    ) -> int:
        """Compile step and sampling (with and without penalties / bias, and structured-output
        masks) for every bucket (or the given ones), and prompt scoring per token bucket
        unless `prompt_logprobs` is False; returns how many buckets."""
        shapes = self.config.all_buckets() if buckets is None else buckets
        out, logits, hidden = None, {}, {}
        for t, r, p in shapes:
            logits[r], hidden[t] = self.forward(dummy_batch(t, r, p, self.config.max_loras > 0))
            out = sample(logits[r], SamplingMetadata.greedy(r), num_top_logprobs)
        processed = (self.config.max_model_len, self.config.max_logit_bias)
        for r, x in logits.items():  # the samplers of batches whose logits some row changes
            for widths, mask in (
                (processed, 0),
                ((0, 0), self.mask_words),
                (processed, self.mask_words),
            ):
                md = SamplingMetadata.greedy(r, *widths, mask)
                out = sample(x, md, num_top_logprobs)
        if prompt_logprobs:
            for t, x in hidden.items():
                targets = np.full(t, -1, np.int32)
                out = token_logprobs(
                    self.stages[-1].params, x, targets, self.model_config, num_top_logprobs
                )
        jax.block_until_ready(([st.kv_cache for st in self.stages], out))
        return len(shapes)


class StepOutputs(NamedTuple):
    """What one dispatched step returns (device arrays, rows padded to the bucket)."""

    tokens: jax.Array  # i32[R] sampled next token per request
    token_logprobs: jax.Array  # f32[R] its log-probability (raw distribution)
    top_ids: jax.Array  # i32[R, n] the n most likely tokens
    top_logprobs: jax.Array  # f32[R, n] their log-probabilities
    token_ranks: jax.Array  # i32[R] the sampled token's rank (1: the most likely)
    # Per packed token when prompt targets were given (`token_logprobs`): the target's
    # logprob f32[T], top ids i32[T, n], top logprobs f32[T, n], the target's rank i32[T].
    prompt: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None


def _random_stage(config: ModelConfig, seed: int, plan) -> Params:
    """The random params of one pipeline stage (traced under jit: only its slice is drawn)."""
    return stage_params(init_params(config, seed), plan, config)


def dummy_batch(num_tokens: int, num_reqs: int, max_blocks: int, lora: bool = False) -> RaggedBatch:
    """A batch of the given bucket with one one-token request writing to the null page."""
    return pack_batch(
        [([0], 0, [0])],
        page_size=1,
        num_tokens=num_tokens,
        num_reqs=num_reqs,
        max_blocks=max_blocks,
        lora_slots=[-1] if lora else None,
    )
