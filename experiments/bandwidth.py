"""The device's copy bandwidth: the memory ceiling every byte floor in the benchmarks uses.

A single elementwise pass can sit well under what the memory delivers (narrow loads, a
buffer too small to hide the launch, one host round trip per call), and a low ceiling
flatters every ratio measured against it. So the copy is timed several ways (2-byte and
4-byte elements, a plain device-to-device copy), each as `reps` passes inside one jitted
call over a buffer far larger than the L2, and the fastest is the ceiling.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def _passes(op, reps: int):
    """One jitted call making `reps` dependent passes of `op` over its input (the barrier
    keeps XLA from fusing them into one pass)."""

    def run(x):
        for _ in range(reps):
            x = jax.lax.optimization_barrier(op(x))
        return x

    return jax.jit(run)


# name -> (element dtype, one pass: reads and writes the whole buffer once)
_VARIANTS = {
    "bf16 x*2": (jnp.bfloat16, lambda a: a * jnp.asarray(2, a.dtype)),
    "u32 x+1": (jnp.uint32, lambda a: a + jnp.uint32(1)),
    "f32 x*2": (jnp.float32, lambda a: a * 2.0),
}


def copy_bandwidths(nbytes: int | None = None, reps: int = 8, iters: int = 10) -> dict[str, float]:
    """Read+write bytes/s of each copy variant: median of `iters` calls of `reps` passes
    over `nbytes` (default 2 GiB on an accelerator, 64 MiB on the CPU)."""
    if nbytes is None:
        nbytes = (64 if jax.default_backend() == "cpu" else 2048) * 2**20
    out = {}
    for name, (dtype, op) in _VARIANTS.items():
        n = nbytes // jnp.dtype(dtype).itemsize
        x = jax.random.bits(jax.random.key(0), (n,), jnp.uint32)
        x = x.astype(dtype) if dtype != jnp.uint32 else x
        f = _passes(op, reps)
        jax.block_until_ready(f(x))
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(f(x))
            times.append(time.perf_counter() - t0)
        out[name] = 2 * nbytes * reps / statistics.median(times)
        del x
    return out


def copy_bandwidth(nbytes: int | None = None, reps: int = 8, iters: int = 10) -> float:
    """The fastest variant's read+write bytes/s (the practical ceiling of the memory)."""
    return max(copy_bandwidths(nbytes, reps, iters).values())


def describe(bws: dict[str, float]) -> str:
    """One line: every variant's GB/s, the fastest (the ceiling used) first."""
    parts = sorted(bws.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{name} {bw / 1e9:.0f} GB/s" for name, bw in parts)
