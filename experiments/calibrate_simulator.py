"""Fit the simulator's cost model to this machine, then check it against a real serving run.

  python experiments/calibrate_simulator.py --model=tiny-gpt --out=cal.json     # CPU, ~2 min
  PYTHONPATH=. python experiments/calibrate_simulator.py --model=gpt2 --dtype=bfloat16 \
      --attention_impl=pallas --out=$OUT/calibration.json                      # a GPU

1. Ceilings of this machine, measured: copy bandwidth (read + write of a large array) and
   matmul FLOP/s.
2. Step times of the real runner (the engine's own buckets and attention) over decode,
   prefill and mixed batches: the samples.
3. `orca_jax.calibration.fit`: the two efficiencies and the per-iteration overhead that
   explain the samples best; prints measured against predicted per sample.
   The engine's own host work per iteration (a full decode batch's `engine.step()` against
   the same batch through the runner alone) is added to the fitted overhead.
4. Validation: the same Poisson workloads served for real (`orca_jax.replay`, warmed-up
   engine) and on the simulator's virtual clock with the fitted cost model; prints both and
   their ratio. The schedulers are the same code in both, so this measures the cost model.

--out writes the `Calibration` as JSON; `bench_serving.py --simulate --calibration=FILE`
then costs any model on this machine with it.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from models import get_config, init_params
from orca_jax import Engine, EngineConfig, SamplingParams
from orca_jax.calibration import fit, predict
from orca_jax.metrics import summarize
from orca_jax.replay import replay
from orca_jax.sampler import SamplingMetadata
from orca_jax.simulate import Hardware, simulate
from orca_jax.workload import poisson

_MODEL = flags.DEFINE_string("model", "tiny-gpt", "Model preset (random weights).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Parameter / cache dtype.")
_ATTN = flags.DEFINE_string("attention_impl", "auto", "auto, reference or pallas.")
_ITERS = flags.DEFINE_integer("iters", 7, "Timed steps per sample (median kept).")
_POLICIES = flags.DEFINE_list("policies", ["orca", "static:8"], "Validation policies.")
_RATES = flags.DEFINE_list("rates", ["20", "80"], "Validation arrival rates (req/s).")
_NUM = flags.DEFINE_integer("num_requests", 60, "Requests per validation point.")
_OUT = flags.DEFINE_string("out", None, "Write the fitted Calibration as JSON.")

ENGINE = dict(max_batch_size=16, max_model_len=256, max_num_batched_tokens=256, block_size=16)
PROMPT, OUTPUT = (16, 96), (1, 48)  # validation workload lengths (uniform)


def timed(fn, iters: int) -> float:
    """Median seconds of `fn()` waited for, after one untimed call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine(dtype) -> Hardware:
    """This machine's measured ceilings: copy bandwidth and matmul FLOP/s; memory from the
    device (host RAM on the CPU); tensor-parallel links left unbounded (one device)."""
    x = jnp.ones(64 * 2**20, dtype)
    copy = jax.jit(lambda a: a + 1)
    bandwidth = 2 * x.nbytes / timed(lambda: copy(x), 5)
    n = 2048
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda m: m @ m)
    flops = 2 * n**3 / timed(lambda: matmul(a), 5)
    device = jax.devices()[0]
    memory = (device.memory_stats() or {}).get("bytes_limit") or (
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    )
    return Hardware(device.device_kind, float(memory), bandwidth, flops, float("inf"))


def sample_shapes() -> list[list[tuple[int, int]]]:
    """Batches as (new tokens, context after them) per request: decodes, prefills, mixed."""
    decodes = [[(1, ctx + 1)] * r for r in (1, 4, 16) for ctx in (32, 160)]
    prefills = [[(t, t)] for t in (16, 64, 128, 240)]
    mixed = [[(96, 96)] + [(1, 100)] * 12, [(32, 32)] * 3 + [(1, 200)] * 8]
    return decodes + prefills + mixed


def measure(engine: Engine, shape: list[tuple[int, int]], iters: int) -> float:
    """Seconds of one real iteration of `shape` as the engine runs it, scheduling aside:
    pack (padded to the runner's buckets), step, sample, fetch the tokens."""
    runner, page = engine.runner, engine.runner.config.page_size
    usable = runner.config.num_pages - 1
    seqs, next_page = [], 0
    for n, ctx in shape:
        pages = [1 + (next_page + i) % usable for i in range(-(-ctx // page))]
        next_page += len(pages)
        seqs.append((list(range(n)), ctx - n, pages))

    def iteration():
        batch = runner.build_batch(seqs)
        md = SamplingMetadata.greedy(batch.max_reqs)
        return [np.asarray(a) for a in runner.execute_and_sample(batch, md)[:4]]

    return timed(iteration, iters)


def host_overhead(engine: Engine, iters: int) -> float:
    """Seconds per iteration the engine spends beyond the device iteration `measure` times
    (scheduling, sampling metadata, closing the batch, outputs): a full decode batch's
    `engine.step()` against `measure` of the same shape."""
    n, prompt = engine.scheduler.config.max_batch_size, 48
    ids = [
        engine.add_request(
            list(range(1, prompt + 1)), SamplingParams(max_tokens=200, ignore_eos=True)
        )
        for _ in range(n)
    ]
    for _ in range(3):  # prefill, then decoding
        engine.step()
    step = timed(engine.step, 5 * iters)
    context = engine.scheduler.requests[ids[0]].num_tokens
    for req_id in ids:
        engine.abort(req_id)
    while engine.has_unfinished_requests():
        engine.step()
    return step - measure(engine, [(1, context)] * n, 5 * iters)


def engine_config(policy: str) -> EngineConfig:
    name, _, bs = policy.partition(":")
    kw = dict(ENGINE, max_batch_size=int(bs)) if bs else ENGINE
    return EngineConfig(policy=name, num_kv_blocks=600, warmup=True, **kw)


def main(argv):
    del argv
    model = get_config(_MODEL.value, dtype=_DTYPE.value, attention_impl=_ATTN.value)
    params = init_params(model, seed=0)
    hw = machine(jnp.dtype(_DTYPE.value))
    print(
        f"{hw.name}: copy {hw.hbm_bytes_per_s / 1e9:.1f} GB/s, "
        f"matmul {hw.flops_per_s / 1e12:.2f} TFLOP/s",
        flush=True,
    )

    # One warmed-up engine per policy, reused across rates (a drained engine holds nothing).
    engines = {p: Engine(model, params, None, engine_config(p)) for p in _POLICIES.value}
    engine = next(iter(engines.values()))
    shapes = sample_shapes()
    samples = [(s, measure(engine, s, _ITERS.value)) for s in shapes]
    cal = fit(model, hw, samples)
    host = max(0.0, host_overhead(engine, _ITERS.value))
    print(
        f"fit: bandwidth efficiency {cal.bandwidth_efficiency:.3g}, FLOP efficiency "
        f"{cal.flops_efficiency:.3g}, overhead {cal.overhead_s * 1e3:.3f} ms/iteration, "
        f"rms log error {cal.rms_log_error:.3f}; engine host work {host * 1e3:.3f} "
        "ms/iteration, added to the overhead\n"
    )
    cal = dataclasses.replace(cal, overhead_s=cal.overhead_s + host)
    cost = cal.cost_model(model)
    print("| batch (requests x new tokens @ context) | measured ms | predicted ms |")
    print("|---|---|---|")
    for shape, t in samples:
        kinds = sorted(set(shape), key=lambda x: -x[0])
        desc = " + ".join(f"{shape.count(k)} x {k[0]} @ {k[1]}" for k in kinds)
        print(f"| {desc} | {t * 1e3:.2f} | {(predict(cost, shape) - host) * 1e3:.2f} |")
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(cal.to_json())

    print(
        "\n| policy | rate | measured req/s | simulated | measured norm. latency ms | "
        "simulated | measured TTFT ms | simulated |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for policy, real_engine in engines.items():
        for rate in map(float, _RATES.value):
            work = poisson(rate, _NUM.value, PROMPT, OUTPUT, seed=3)
            real = summarize(*replay(real_engine, work))
            # Unpadded static batches: the real engine's static policy runs only real tokens.
            sim = summarize(*simulate(work, real_engine.scheduler.config, cost, pad_static=False))
            cells = [
                f"{real['throughput_req_s']:.1f}",
                f"{sim['throughput_req_s']:.1f}",
                f"{real['normalized_latency_median'] * 1e3:.2f}",
                f"{sim['normalized_latency_median'] * 1e3:.2f}",
                f"{real['ttft_median'] * 1e3:.1f}",
                f"{sim['ttft_median'] * 1e3:.1f}",
            ]
            print(f"| {policy} | {rate:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    app.run(main)
