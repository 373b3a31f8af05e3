"""Host time per iteration, no device work: the scheduler alone, or the whole engine step.

  python experiments/bench_host.py --num_reqs=256 --policy=orca             # scheduler
  python experiments/bench_host.py --num_reqs=256 --policy=orca --engine    # engine.step()
  python experiments/bench_host.py --num_reqs=256 --policy=orca --server    # the server's

`--num_reqs` requests decode together (context ~`--context` tokens each); the model never
runs: sampled tokens are made up on the host, so what is timed is exactly the per-iteration
host work the device would otherwise wait for.

Scheduler mode times schedule + packing the batch (+ sampling metadata) and update. Engine
mode times all of `Engine.step()` (those, plus sampling rows, closing the batch, streaming
deltas and, with `--text`, detokenizing with SmolLM2's tokenizer and looking for a stop
string) with the device replaced by a stub that returns random tokens at once.

Server mode runs the same engine under the HTTP server's `AsyncEngine` (its own thread, the
Prometheus metrics observing) with one streaming consumer per request on an asyncio loop
that builds each SSE chunk as the completions route does; it times the engine thread's
iterations (everything a served iteration costs the host, the handlers' share of the GIL
included).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from absl import app, flags

from models import get_config, init_params
from orca_jax.batch_builder import BatchBuilder
from orca_jax.engine.config import EngineConfig
from orca_jax.sampler import SamplingMetadata
from orca_jax.scheduler import ModelRunnerOutput, Request, SamplingParams, make_scheduler

_NUM_REQS = flags.DEFINE_integer("num_reqs", 256, "Requests running together.")
_CONTEXT = flags.DEFINE_integer("context", 512, "Prompt tokens per request.")
_POLICY = flags.DEFINE_string("policy", "orca", "Scheduling policy.")
_ITERS = flags.DEFINE_integer("iters", 200, "Timed iterations.")
_ENGINE = flags.DEFINE_bool("engine", False, "Time the whole Engine.step(), device stubbed.")
_SERVER = flags.DEFINE_bool("server", False, "Time the server's iterations, device stubbed.")
_DEVICE_MS = flags.DEFINE_float(
    "device_ms",
    0.0,
    "Engine mode: the stub device takes this long per step (asynchronously, as a GPU does); "
    "then the engine runs with and without async_output, side by side.",
)
_TEXT = flags.DEFINE_bool("text", True, "Engine mode: detokenize (SmolLM2's tokenizer).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Engine mode: sampling temperature.")
_REPETITION = flags.DEFINE_float(
    "repetition_penalty", 1.0, "Engine mode: a penalty on every request."
)
_LOGPROBS = flags.DEFINE_integer("logprobs", None, "Engine mode: top logprobs per token.")

_MAX_LEN = 1024


def _config(n: int, ctx: int, **kw) -> EngineConfig:
    return EngineConfig(
        policy=_POLICY.value,
        max_batch_size=n,
        block_size=16,
        num_kv_blocks=n * (_MAX_LEN // 16) + 1,
        max_model_len=_MAX_LEN,
        max_num_batched_tokens=n * ctx,  # whole prompts in one iteration, for every policy
        max_logprobs=_LOGPROBS.value or 0,
        **kw,
    )


def _median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def bench_scheduler(n: int, ctx: int) -> str:
    model = get_config("gpt2")
    # Long enough outputs that, under paged's chunked prefill, all requests decode together
    # for a while before the first ones finish.
    max_tokens = _MAX_LEN - ctx
    sched_cfg, runner_cfg = _config(n, ctx).resolve(model)
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
    s, b, u = _median_ms(sched_t), _median_ms(build_t), _median_ms(update_t)
    return (
        f"policy {_POLICY.value}, {n} decoding requests, context {ctx}: schedule {s:.3f} ms + "
        f"build batch {b:.3f} ms = {s + b:.3f} ms; update {u:.3f} ms (medians of {_ITERS.value})"
    )


class _Pending:
    """A stub device's result: reading it (`np.asarray`) waits until the step is done."""

    def __init__(self, value: np.ndarray, ready_at: float):
        self.value, self.ready_at = value, ready_at

    def __array__(self, dtype=None, copy=None):
        time.sleep(max(0.0, self.ready_at - time.perf_counter()))  # releases the GIL
        return self.value


class _StubDevice:
    """Stands in for `ModelRunner.execute_and_sample`: random tokens, at once or, with
    `step_s`, after that long per step (steps queue up one after another, as on a GPU,
    while the host goes on)."""

    def __init__(self, vocab: int, step_s: float = 0.0):
        self.vocab, self.step_s = vocab, step_s
        self.rng = np.random.default_rng(1)
        self.busy_until = 0.0

    def __call__(self, batch, md, num_top_logprobs=0, prompt_targets=None):
        from orca_jax.runner import StepOutputs

        r, k = batch.max_reqs, num_top_logprobs
        tokens = self.rng.integers(100, self.vocab, r).astype(np.int32)
        top = (
            self.rng.integers(100, self.vocab, (r, k)).astype(np.int32),
            np.zeros((r, k), np.float32),
        )
        out = StepOutputs(tokens, np.zeros(r, np.float32), *top, np.ones(r, np.int32))
        if not self.step_s:
            return out
        self.busy_until = max(self.busy_until, time.perf_counter()) + self.step_s
        return StepOutputs(*(_Pending(a, self.busy_until) for a in out[:5]))


def _stub_engine(n: int, ctx: int, **config):
    """An engine over SmolLM2's vocabulary whose device is `_StubDevice`."""
    from orca_jax import Engine

    tokenizer = None
    if _TEXT.value:
        from models.loaders.gguf_llama import default_model_path
        from orca_jax.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_gguf(default_model_path())
    # One small layer: the weights never run; the vocabulary is SmolLM2's.
    model = get_config("tiny-llama").replace(vocab_size=49152, max_seq_len=_MAX_LEN)
    engine = Engine(model, init_params(model), tokenizer, _config(n, ctx, warmup=False, **config))
    engine.runner.execute_and_sample = _StubDevice(model.vocab_size, _DEVICE_MS.value / 1e3)
    return engine


def _params(max_tokens: int, text: bool) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        ignore_eos=True,
        temperature=_TEMPERATURE.value,
        repetition_penalty=_REPETITION.value,
        logprobs=_LOGPROBS.value,
        stop=("\n\nUser:",) if text else (),
    )


def _case(n: int, ctx: int, text: bool) -> str:
    return (
        f"policy {_POLICY.value}, {n} decoding requests, context {ctx}, "
        f"{'detokenized, one stop string' if text else 'token ids only'}"
        f"{', repetition penalty' if _REPETITION.value != 1.0 else ''}"
        f"{f', {_LOGPROBS.value} logprobs' if _LOGPROBS.value is not None else ''}"
    )


def _time_steps(n: int, ctx: int, **config) -> tuple[float, bool]:
    """Median ms per `Engine.step()` while all requests decode; and whether text was on."""
    engine = _stub_engine(n, ctx, **config)
    params = _params(_MAX_LEN - ctx, engine.tokenizer is not None)
    rng = np.random.default_rng(0)
    for _ in range(n):
        engine.add_request(rng.integers(100, 49152, ctx).tolist(), params)
    while not all(t.request.num_output_tokens for t in engine._requests.values()):
        engine.step()  # prefills (not timed)
    times = []
    for _ in range(_ITERS.value):
        t0 = time.perf_counter()
        outs = engine.step()
        times.append(time.perf_counter() - t0)
        # Request-level batching (static) delivers its outputs when the batch ends.
        assert _POLICY.value == "static" or len(outs) == n, len(outs)
    return _median_ms(times), engine.tokenizer is not None


def bench_engine(n: int, ctx: int) -> str:
    if not _DEVICE_MS.value:
        ms, text = _time_steps(n, ctx)
        return f"{_case(n, ctx, text)}: engine.step() {ms:.3f} ms (median of {_ITERS.value})"
    sync, text = _time_steps(n, ctx, async_output=False)
    overlapped, _ = _time_steps(n, ctx, async_output=True)
    return (
        f"{_case(n, ctx, text)}, device {_DEVICE_MS.value:.2f} ms per step: engine.step() "
        f"{sync:.3f} ms emitting before the next dispatch, {overlapped:.3f} ms after it "
        f"(async_output; x{overlapped / sync:.2f}; medians of {_ITERS.value})"
    )


def bench_server(n: int, ctx: int) -> str:
    import asyncio
    import json

    from orca_jax.server import responses
    from orca_jax.server.async_engine import AsyncEngine
    from orca_jax.server.metrics import ServerMetrics

    engine = _stub_engine(n, ctx)
    served = AsyncEngine(engine)
    served.observers.append(ServerMetrics(engine, "bench").observe)
    stamps: list[tuple[float, int]] = []  # (time, requests progressed) per iteration
    served.observers.append(lambda outs: stamps.append((time.perf_counter(), len(outs))))
    meta = dict(id="cmpl", created=0, model="bench", tokenizer=engine.tokenizer, top_n=0, n=1)
    params = _params(_ITERS.value + 20, engine.tokenizer is not None)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 49152, ctx).tolist() for _ in range(n)]

    async def client(i: int) -> None:
        first = True
        async for out in await served.add(prompts[i], params, f"r{i}"):
            chunk = responses.completion_chunk(i, out, first, **meta)
            first = False
            if chunk is not None:
                json.dumps(chunk)  # what the route sends

    async def all_clients() -> None:
        await asyncio.gather(*(client(i) for i in range(n)))

    asyncio.run(all_clients())
    served.shutdown()
    # Iterations where every request decodes: from the one after all have started.
    full = [t for t, k in stamps if k == n]
    gaps = np.diff(full[5:-5])
    return (
        f"{_case(n, ctx, engine.tokenizer is not None)}, served: engine thread "
        f"{1e3 * float(np.median(gaps)):.3f} ms per iteration (median of {len(gaps)})"
    )


def main(argv):
    del argv
    bench = bench_server if _SERVER.value else bench_engine if _ENGINE.value else bench_scheduler
    print(bench(_NUM_REQS.value, _CONTEXT.value))


if __name__ == "__main__":
    app.run(main)
