"""Device time per call of a kernel (or any jitted function), for the kernel benchmarks.

On a GPU: the sum of the call's kernel durations in a profiler trace (`device_trace`), with
no host dispatch in it. On the CPU (no device plane in the trace): wall-clock differences
that cancel the dispatch and the wait.
"""

from __future__ import annotations

import os
import statistics
import time

import device_trace
import jax
from bandwidth import copy_bandwidths


def _repeated(fn, arg_sets, reps: int):
    """One jitted call running `fn` `reps` times, cycling through `arg_sets`, returning every
    output (so none is dead code). Each call's inputs pass an optimization barrier with the
    previous output, so XLA neither merges repeated calls nor reorders them, and no kernel
    is added between them."""

    def run(*sets):
        outs = []
        for i in range(reps):
            args = sets[i % len(sets)]
            if outs:
                args, _ = jax.lax.optimization_barrier((args, outs[-1]))
            outs.append(fn(*args))
        return outs

    return jax.jit(run)


def time_calls(fn, arg_sets, iters: int, reps: int) -> float:
    """Seconds per call of `fn` by the wall clock, with no host dispatch in it: the median
    time of one jitted call running `fn` 2 * reps times, less that of one running it reps
    times, over reps (the dispatch and the wait cancel out; about +-10 us of noise on a
    GPU at these sizes, so `measure` uses the profiler there)."""
    medians = []
    for n in (reps, 2 * reps):
        run = _repeated(fn, arg_sets, n)
        jax.block_until_ready(run(*arg_sets))
        samples = []
        for _ in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(run(*arg_sets))
            samples.append(time.perf_counter() - t0)
        medians.append(statistics.median(samples))
    return max(medians[1] - medians[0], 1e-9) / reps


def measure(fn, arg_sets, iters: int, reps: int) -> float:
    """Device seconds per call of `fn`: on an accelerator the sum of its kernels' durations
    in a profiler trace of iters x reps calls (`device_trace`); on the CPU `time_calls`."""
    if jax.default_backend() != "cpu":
        t = device_trace.device_time_per_call(jax.jit(fn), arg_sets, iters * reps)
        if t is not None:
            return t
    return time_calls(fn, arg_sets, iters, reps)


def bench_context(small: bool, out_flag: str | None, name: str) -> tuple[dict, str, str | None]:
    """What a kernel benchmark's table needs from its run: the copy bandwidths measured now
    (8 MiB buffers on a `small` CPU run, 2 GiB otherwise), the device's name, and where the
    table goes (`out_flag`, else $OUT/`name` when OUT is set, else nowhere)."""
    bws = copy_bandwidths((8 if small else 2048) * 2**20, 4, 3 if small else 10)
    out = out_flag or (os.path.join(os.environ["OUT"], name) if os.environ.get("OUT") else None)
    return bws, jax.devices()[0].device_kind, out
