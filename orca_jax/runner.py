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

import jax
import numpy as np
from jax.sharding import Mesh

from models import KVCache, ModelConfig, RaggedBatch, init_kv_cache, pack_batch, step
from models.batch import bucket, geometric_buckets
from models.layers import Params
from orca_jax.sampler import SamplingMetadata, sample
from sharding import kv_cache_sharding, shard_params, tensor_parallel_size

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


class ModelRunner:
    """Runs one packed step at a time on the device; returns last-token logits per request.

    With a `mesh` (see `sharding/`), params and KV pages are split over its `model` axis
    (tensor parallelism) and every step runs on all its devices; batches stay host-built.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        params: Params,
        config: RunnerConfig,
        mesh: Mesh | None = None,
    ):
        if config.max_model_len > model_config.max_seq_len:
            raise ValueError(
                f"max_model_len={config.max_model_len} exceeds the model's context "
                f"{model_config.max_seq_len}"
            )
        self.model_config = model_config
        self.config = config
        self.mesh = mesh if tensor_parallel_size(mesh) > 1 else None
        if self.mesh is not None:
            params = shard_params(params, model_config, self.mesh)
        self.params = params
        self.kv_cache: KVCache = init_kv_cache(
            model_config,
            config.num_pages,
            config.page_size,
            sharding=kv_cache_sharding(self.mesh) if self.mesh is not None else None,
        )  # allocated split over the mesh, never whole on one device

    def build_batch(self, seqs: Sequence[SeqSpec]) -> RaggedBatch:
        """Pack requests into a numpy batch padded to its bucket."""
        t, r, p = self.config.bucket(
            sum(len(t) for t, _, _ in seqs), len(seqs), max(len(b) for _, _, b in seqs)
        )
        return pack_batch(
            list(seqs), page_size=self.config.page_size, num_tokens=t, num_reqs=r, max_blocks=p
        )

    def execute(self, batch: RaggedBatch) -> jax.Array:
        """One step on the device; returns logits [R, V] (padding rows included)."""
        logits, self.kv_cache = step(
            self.params, self.kv_cache, batch, self.model_config, self.mesh
        )
        return logits

    def run(self, seqs: Sequence[SeqSpec]) -> np.ndarray:
        """Pack, run, and fetch logits [len(seqs), V] of each request's last token."""
        return np.asarray(self.execute(self.build_batch(seqs)))[: len(seqs)]

    def execute_and_sample(
        self,
        batch: RaggedBatch,
        sampling_rows: Sequence[tuple[float, int, float, int, int]],
        num_top_logprobs: int = 0,
    ) -> tuple[jax.Array, ...]:
        """Dispatch one step and sampling; returns device arrays without waiting.

        `sampling_rows` holds `(temperature, top_k, top_p, seed, step)` per request. Returns
        (tokens [R], logprobs [R], top ids [R, n], top logprobs [R, n]), rows padded to R.
        """
        md = SamplingMetadata.build(list(sampling_rows), batch.max_reqs)
        return sample(self.execute(batch), md, num_top_logprobs)

    def warmup(
        self, buckets: Sequence[tuple[int, int, int]] | None = None, num_top_logprobs: int = 0
    ) -> int:
        """Compile step and sampling for every bucket (or the given ones); returns how many."""
        shapes = self.config.all_buckets() if buckets is None else buckets
        out = None
        for t, r, p in shapes:
            out = sample(
                self.execute(_dummy_batch(t, r, p)), SamplingMetadata.greedy(r), num_top_logprobs
            )
        jax.block_until_ready((self.kv_cache, out))
        return len(shapes)


def _dummy_batch(num_tokens: int, num_reqs: int, max_blocks: int) -> RaggedBatch:
    """A batch of the given bucket with one one-token request writing to the null page."""
    return pack_batch(
        [([0], 0, [0])],
        page_size=1,
        num_tokens=num_tokens,
        num_reqs=num_reqs,
        max_blocks=max_blocks,
    )
