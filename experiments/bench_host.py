"""Host time per iteration: schedule + build the packed batch (+ update), no device work.

  python experiments/bench_host.py --num_reqs=256 --policy=orca

256 requests decode together (context ~--context tokens each); the model never runs: sampled
tokens are made up on the host, so what is timed is exactly the per-iteration host work the
device would otherwise wait for.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from absl import app, flags

from models import get_config
from orca_jax.batch_builder import BatchBuilder
from orca_jax.engine.config import EngineConfig
from orca_jax.sampler import SamplingMetadata
from orca_jax.scheduler import ModelRunnerOutput, Request, SamplingParams, make_scheduler

_NUM_REQS = flags.DEFINE_integer("num_reqs", 256, "Requests running together.")
_CONTEXT = flags.DEFINE_integer("context", 512, "Prompt tokens per request.")
_POLICY = flags.DEFINE_string("policy", "orca", "Scheduling policy.")
_ITERS = flags.DEFINE_integer("iters", 200, "Timed iterations.")


def main(argv):
    del argv
    n, ctx = _NUM_REQS.value, _CONTEXT.value
    model = get_config("gpt2")
    max_len = 1024
    # Long enough outputs that, under paged's chunked prefill, all requests decode together
    # for a while before the first ones finish.
    max_tokens = max_len - ctx
    cfg = EngineConfig(
        policy=_POLICY.value,
        max_batch_size=n,
        block_size=16,
        num_kv_blocks=n * (max_len // 16) + 1,
        max_model_len=max_len,
        max_num_batched_tokens=n * ctx,  # whole prompts in one iteration, for every policy
    )
    sched_cfg, runner_cfg = cfg.resolve(model)
    scheduler = make_scheduler(sched_cfg)
    builder = BatchBuilder(runner_cfg, max_live_reqs=sched_cfg.num_blocks)
    rng = np.random.default_rng(0)
    for i in range(n):
        prompt = rng.integers(0, model.vocab_size, ctx).tolist()
        scheduler.add_request(
            Request(str(i), prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        )
    # Prefill everything first (not timed): iterations until all requests decode.
    while True:
        out = scheduler.schedule()
        scheduler.update(
            ModelRunnerOutput(out.batch_id, {s.req_id: 1 for s in out.scheduled if s.sample})
        )
        if all(len(s.token_ids) == 1 for s in out.scheduled) and len(out.scheduled) == n:
            break
    sched_t, build_t, update_t = [], [], []
    for _ in range(_ITERS.value):
        t0 = time.perf_counter()
        out = scheduler.schedule()
        t1 = time.perf_counter()
        builder.build(out)
        SamplingMetadata.build([(0.0, 0, 1.0, 0, 0)] * len(out.scheduled), n)
        t2 = time.perf_counter()
        scheduler.update(ModelRunnerOutput(out.batch_id, {s.req_id: 7 for s in out.scheduled}))
        t3 = time.perf_counter()
        assert len(out.scheduled) == n
        sched_t.append(t1 - t0)
        build_t.append(t2 - t1)
        update_t.append(t3 - t2)
    med = lambda xs: statistics.median(xs) * 1e3
    print(
        f"policy {_POLICY.value}, {n} decoding requests, context {ctx}: "
        f"schedule {med(sched_t):.3f} ms + build batch {med(build_t):.3f} ms = "
        f"{med(sched_t) + med(build_t):.3f} ms; update {med(update_t):.3f} ms (medians of "
        f"{_ITERS.value})"
    )


if __name__ == "__main__":
    app.run(main)
