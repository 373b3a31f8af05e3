"""Many hosts through JAX's own multi-process runtime (`jax.distributed`).

Every process builds the same engine (same model, params, config) over the global device
mesh, so each jitted step spans all processes' devices. Only process 0 (the leader) schedules:
before each step it broadcasts that step's inputs (the packed batch and the sampling
settings, a few KB of integers) to the other processes (followers), which run the same step
on their devices in the same order, until the leader says stop. Warm-up runs on every
process in the same order by construction.

    # on every host (or local process):
    orca_jax.distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=i)
    llm = LLM(..., tensor_parallel_size=jax.device_count())
    if orca_jax.distributed.is_leader():
        outputs = llm.generate(prompts)
        llm.engine.stop_followers()
    else:
        orca_jax.distributed.follow(llm.engine)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from models import RaggedBatch
from orca_jax.runner import ModelRunner, dummy_batch
from orca_jax.sampler import SamplingMetadata

_STOP, _STEP = 0, 1
_HEADER = 9  # int32s in a message header (StepBroadcast)


class StepInputs(NamedTuple):
    """One step's inputs as a follower receives them (`ModelRunner.execute_and_sample`'s)."""

    batch: RaggedBatch
    md: SamplingMetadata
    num_top_logprobs: int
    prompt_targets: np.ndarray | None


def initialize(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    local_device_ids: list[int] | None = None,
) -> None:
    """Join the job (call before any other JAX use). On CPU, collectives go through gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )


def is_leader() -> bool:
    return jax.process_index() == 0


class StepBroadcast:
    """Process 0 sends each step's inputs; every other process receives them, in order.

    Each message is two collective broadcasts: a fixed-size header `[kind, T, R, pages,
    num_top_logprobs, penalty history width, bias width, mask words, has prompt targets]`,
    then the arrays, whose shapes the header fixes.
    """

    def send(
        self,
        batch: RaggedBatch,
        md: SamplingMetadata,
        num_top_logprobs: int,
        prompt_targets: np.ndarray | None = None,
    ) -> None:
        T, R, P = batch.num_tokens, batch.max_reqs, batch.block_tables.shape[1]
        W, B, M = md.history.shape[1], md.bias_ids.shape[1], md.allowed.shape[1]
        scored = prompt_targets is not None
        self._header(np.array([_STEP, T, R, P, num_top_logprobs, W, B, M, scored], np.int32))
        multihost_utils.broadcast_one_to_all((batch, md, prompt_targets))

    def send_stop(self) -> None:
        self._header(np.zeros(_HEADER, np.int32))

    def recv(self) -> StepInputs | None:
        """The next step's inputs, or None when the leader has stopped."""
        header = self._header(np.zeros(_HEADER, np.int32))
        kind, T, R, P, n, W, B, M, scored = (int(v) for v in header)
        if kind == _STOP:
            return None
        targets = np.full(T, -1, np.int32) if scored else None
        template = (dummy_batch(T, R, P), SamplingMetadata.greedy(R, W, B, M), targets)
        received = multihost_utils.broadcast_one_to_all(template, is_source=False)
        batch, md, targets = jax.tree.map(np.asarray, received)
        return StepInputs(batch, md, n, targets)

    @staticmethod
    def _header(header: np.ndarray) -> np.ndarray:
        return np.asarray(multihost_utils.broadcast_one_to_all(header))


def follow(engine) -> int:
    """A follower's loop: run every step the leader broadcasts until it stops; returns how
    many steps ran. `engine` is an `Engine` built like the leader's (only its runner runs)."""
    channel: StepBroadcast = engine.broadcast
    runner: ModelRunner = engine.runner
    steps = 0
    while (inputs := channel.recv()) is not None:
        runner.execute_and_sample(*inputs)
        steps += 1
    return steps
