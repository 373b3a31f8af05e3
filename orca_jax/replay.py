"""Serve a workload in real time on an engine and record what each client would see.

The engine runs in this thread: between iterations, requests whose arrival time has passed
are added (with random prompt tokens of their length, EOS ignored so each generates exactly
its output length), and every token's arrival at the client is stamped when the iteration
that produced it returns. A request's latency counts from its scheduled arrival, so time it
spent waiting while an iteration ran is charged to it, as it would be to a real client.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence

import numpy as np

from orca_jax.engine.engine import Engine
from orca_jax.metrics import RequestTiming
from orca_jax.scheduler import SamplingParams
from orca_jax.workload import WorkItem


def replay(
    engine: Engine,
    workload: Sequence[WorkItem],
    *,
    seed: int = 0,
    shared_prefix: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list[RequestTiming], float]:
    """Run `workload` to completion; returns each request's timing and the run's duration.

    `shared_prefix`: every prompt starts with the same random tokens, this many (at most its
    length), as a common system prompt would (what prefix caching saves).
    """
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    prefix = rng.integers(0, vocab, shared_prefix).tolist()
    pending = collections.deque(sorted(workload, key=lambda w: w.arrival))
    timings: dict[str, RequestTiming] = {}
    start = clock()
    while pending or engine.has_unfinished_requests():
        now = clock() - start
        while pending and pending[0].arrival <= now:
            item = pending.popleft()
            own = rng.integers(0, vocab, max(0, item.prompt_len - len(prefix))).tolist()
            prompt = (prefix + own)[: item.prompt_len]
            params = SamplingParams(max_tokens=item.output_len, ignore_eos=True)
            rid = engine.add_request(prompt, params)
            timings[rid] = RequestTiming(item.arrival, item.prompt_len)
        if engine.has_unfinished_requests():
            outputs = engine.step()
            t = clock() - start
            for out in outputs:
                timings[out.request_id].token_times += [t] * len(out.outputs[0].delta_token_ids)
        elif pending:
            time.sleep(max(0.0, pending[0].arrival - (clock() - start)))
    return list(timings.values()), clock() - start
