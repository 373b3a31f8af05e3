"""Simulated serving: the real schedulers on a virtual clock, the model replaced by a cost model.

For the paper's GPT-3 sizes (13B to 341B on tens of A100s), which no machine here can run:
the scheduling policies are the engine's own (`orca_jax.scheduler`, pure Python), and each
batch takes the time a roofline cost model gives it. This shows how the policies compare at
scale; it predicts no absolute figure better than its cost model, so calibrate that against
measured step times (`experiments/bench_step.py`) before quoting numbers.

Cost model, per pipeline stage and iteration (the model's dtype, per device of a `tp`-way shard):
- every layer reads its weights once, and the K/V of every scheduled token's context;
- its matmuls cost 2 x params FLOPs per token, attention 4 x D FLOPs per (token, context) pair;
- a layer takes max(bytes / bandwidth, FLOPs / peak), each derated by its efficiency, plus two
  ring all-reduces of the activations over the tensor-parallel group;
- the last stage adds the LM head; each iteration pays a fixed `overhead_s` (host, launch).
Stages of one batch run one after another; a stage starts a batch when it is free, so with
`n_workers` batches in flight stage 0 works on batch i+1 while stage 1 runs batch i (Orca).

The `static` policy is the paper's baseline, FasterTransformer behind a request-level
batcher. By default (`pad_static`) its batches cost what FasterTransformer spends on them:
every prompt padded to the batch's longest, and every member decoding until the batch's
last one finishes. Without padding it is a stronger baseline than the paper's.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
from collections.abc import Sequence

from models.config import ModelConfig
from orca_jax.metrics import RequestTiming
from orca_jax.scheduler import (
    ModelRunnerOutput,
    Request,
    SamplingParams,
    SchedulerConfig,
    SchedulerOutput,
    make_scheduler,
)
from orca_jax.workload import WorkItem


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One accelerator, from its spec sheet."""

    name: str
    memory_bytes: float
    hbm_bytes_per_s: float
    flops_per_s: float  # dense bf16
    link_bytes_per_s: float  # per direction, to its tensor-parallel peers


A100_40GB = Hardware("A100-SXM4-40GB", 40e9, 1.555e12, 312e12, 300e9)
H100_80GB = Hardware("H100-SXM5-80GB", 80e9, 3.35e12, 989e12, 450e9)
H200_141GB = Hardware("H200-SXM-141GB", 141e9, 4.8e12, 989e12, 450e9)
HARDWARE = {"a100": A100_40GB, "h100": H100_80GB, "h200": H200_141GB}

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Iteration time of `model` split `tp` ways within each of `pp` stages on `hw`.

    The efficiencies and the overhead default to rough guesses; `orca_jax.calibration`
    fits them to step times measured on the machine.
    """

    model: ModelConfig
    hw: Hardware
    tp: int = 1
    pp: int = 1
    bandwidth_efficiency: float = 0.7  # fraction of `hw.hbm_bytes_per_s` reached
    flops_efficiency: float = 0.7  # fraction of `hw.flops_per_s` reached
    overhead_s: float = 1e-3  # per iteration

    @property
    def bytes_per_param(self) -> int:
        """Bytes per weight (the model's dtype)."""
        return _DTYPE_BYTES[self.model.dtype]

    @property
    def layer_weight_bytes(self) -> float:
        """Bytes per layer weight: 1 with int8 kernels (their scales are negligible)."""
        return 1 if self.model.quantization == "int8" else self.bytes_per_param

    def layer_params(self) -> int:
        m = self.model
        attn = m.d_model * m.head_dim * (2 * m.n_heads + 2 * m.n_kv_heads)
        mlp = (3 if m.activation == "swiglu" else 2) * m.d_model * m.d_ff
        return attn + mlp

    def kv_bytes_per_token_layer(self) -> float:
        """K and V bytes of one token in one layer, in the cache's dtype (fp8: one byte)."""
        return self.model.kv_bytes_per_token() / self.model.n_layers

    def kv_capacity_tokens(self, reserve_fraction: float = 0.1) -> int:
        """Tokens of K/V that fit beside the weights (all layers), keeping some memory back."""
        layers = self.model.n_layers * self.layer_params()
        weights = (self.model.num_params() - layers) * self.bytes_per_param
        weights = (weights + layers * self.layer_weight_bytes) / (self.tp * self.pp)
        free = self.hw.memory_bytes * (1 - reserve_fraction) - weights
        per_token = self.kv_bytes_per_token_layer() * self.model.n_layers / (self.tp * self.pp)
        if free <= 0:
            raise ValueError(
                f"{self.model.name} weights ({weights / 1e9:.1f} GB per device) do not fit on "
                f"{self.hw.name} with tp={self.tp}, pp={self.pp}"
            )
        return int(free // per_token)

    def stage_time(self, batch: Sequence[tuple[int, int]], last: bool) -> float:
        """Seconds one stage takes for `batch`: (new tokens, context after them) per request."""
        m, hw = self.model, self.hw
        bandwidth = hw.hbm_bytes_per_s * self.bandwidth_efficiency
        tokens = sum(n for n, _ in batch)
        pairs = sum(n * (ctx - (n - 1) / 2) for n, ctx in batch)  # causal (query, key) pairs
        context = sum(ctx for _, ctx in batch)
        read = (
            self.layer_params() * self.layer_weight_bytes
            + context * self.kv_bytes_per_token_layer()
        ) / self.tp
        flops = (2 * tokens * self.layer_params() + 4 * pairs * m.n_heads * m.head_dim) / self.tp
        layer = max(read / bandwidth, flops / (hw.flops_per_s * self.flops_efficiency))
        if self.tp > 1:  # two ring all-reduces of [tokens, D] activations
            msg = tokens * m.d_model * self.bytes_per_param
            layer += 2 * 2 * (self.tp - 1) / self.tp * msg / hw.link_bytes_per_s
        t = layer * m.n_layers / self.pp
        if last:
            head = m.vocab_size * m.d_model * self.bytes_per_param / self.tp
            t += head / bandwidth
        return t


class _PaddedStaticBatch:
    """The shapes FasterTransformer runs for a request-level batch: [members, longest prompt]
    for the prompts, then [members, 1] per decode step, finished members included."""

    def __init__(self) -> None:
        self.members = self.longest = self.steps = 0

    def shape(self, batch: SchedulerOutput) -> list[tuple[int, int]]:
        if all(s.start_pos == 0 for s in batch.scheduled):  # a new batch: its prompts
            self.members = len(batch.scheduled)
            self.longest = max(s.num_tokens for s in batch.scheduled)
            self.steps = 0
            return [(self.longest, self.longest)] * self.members
        self.steps += 1
        return [(1, self.longest + self.steps)] * self.members


def simulate(
    workload: Sequence[WorkItem],
    config: SchedulerConfig,
    cost: CostModel,
    pad_static: bool = True,
) -> tuple[list[RequestTiming], float]:
    """Serve `workload` under `config`'s policy on the virtual clock of `cost`.

    Returns each request's timing (tokens stamped when their batch leaves the last stage)
    and the time the last request finished. Every request generates its `output_len`.
    `pad_static`: cost `static` batches as FasterTransformer runs them (module docstring).
    """
    scheduler = make_scheduler(config)
    pending = collections.deque(sorted(workload, key=lambda w: w.arrival))
    timings: dict[str, RequestTiming] = {}
    inflight: list[tuple[float, int, SchedulerOutput]] = []  # heap of (done time, id, batch)
    stage_free = [0.0] * cost.pp
    now, ids = 0.0, 0
    padded = _PaddedStaticBatch() if pad_static and config.policy == "static" else None

    def record(deltas, t: float) -> None:
        for delta in deltas:
            timings[delta.req_id].token_times += [t] * len(delta.new_token_ids)

    while pending or scheduler.has_unfinished_requests() or inflight:
        while pending and pending[0].arrival <= now:
            item = pending.popleft()
            rid = str(len(timings))
            params = SamplingParams(max_tokens=item.output_len, ignore_eos=True)
            scheduler.add_request(Request(rid, [0] * item.prompt_len, params, item.arrival))
            timings[rid] = RequestTiming(item.arrival, item.prompt_len)
        batch = None
        if len(inflight) < config.n_workers and scheduler.has_unfinished_requests():
            batch = scheduler.schedule()
            if batch.is_empty:
                record(scheduler.update(ModelRunnerOutput(batch.batch_id)), now)
                batch = None
        if batch is not None:
            if padded is not None:
                shape = padded.shape(batch)
            else:
                shape = [(s.num_tokens, s.start_pos + s.num_tokens) for s in batch.scheduled]
            t = now
            for stage in range(cost.pp):
                start = max(t, stage_free[stage])
                t = stage_free[stage] = start + cost.stage_time(shape, stage == cost.pp - 1)
            heapq.heappush(inflight, (t + cost.overhead_s, ids, batch))
            ids += 1
            continue
        # Nothing to start now: jump to the next event (a batch returns or a request arrives).
        next_arrival = pending[0].arrival if pending else float("inf")
        if inflight and inflight[0][0] <= next_arrival:
            now, _, done = heapq.heappop(inflight)
            sampled = {s.req_id: 0 for s in done.scheduled if s.sample}
            record(scheduler.update(ModelRunnerOutput(done.batch_id, sampled)), now)
        elif pending:
            now = max(now, next_arrival)
        else:  # requests wait for room no batch in flight will free: a config error
            raise RuntimeError("simulation stalled: requests cannot be scheduled")
    return list(timings.values()), now
