"""Device time from the profiler: what each kernel took on the GPU, with no host in it.

Wall-clock timing of a call holds the host's dispatch and wait; at tens of microseconds
per kernel that is most of the figure, and taking differences of wall times leaves noise
of the same size. A `jax.profiler` trace records every kernel's start and duration on the
device (CUPTI on NVIDIA GPUs); `jax.profiler.ProfileData` reads it back. On the CPU the
trace has no device plane, and these helpers say so by returning nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import statistics
import tempfile
from collections.abc import Callable, Sequence

import jax


@dataclasses.dataclass(frozen=True)
class KernelEvent:
    name: str
    start_ns: float
    duration_ns: float


def trace(run: Callable[[], object], logdir: str) -> str:
    """Run `run()` under the profiler and wait for its outputs; the trace file written."""
    jax.profiler.start_trace(logdir)
    try:
        jax.block_until_ready(run())
    finally:
        jax.profiler.stop_trace()
    return sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))[-1]


@dataclasses.dataclass(frozen=True)
class Trace:
    """A trace's events, read once: the devices' kernels (and memcpy / memset), from their
    planes' stream lines rather than the lines derived from them (modules, ops); and the
    host's events, Python functions (the profiler's Python tracer) and the runtime's own
    (dispatch, transfers, waits), which nest, so their durations overlap."""

    kernels: list[KernelEvent]
    host: list[KernelEvent]


def read(path: str) -> Trace:
    data = jax.profiler.ProfileData.from_file(path)

    def events(plane_prefix: str, line_prefix: str) -> list[KernelEvent]:
        return [
            KernelEvent(e.name, e.start_ns, e.duration_ns)
            for plane in data.planes
            if plane.name.startswith(plane_prefix)
            for line in plane.lines
            if line.name.startswith(line_prefix)
            for e in line.events
        ]

    return Trace(kernels=events("/device:", "Stream"), host=events("/host:", ""))


def busy_and_span(kernels: Sequence[KernelEvent]) -> tuple[float, float]:
    """(ns the device was busy: the sum of kernel durations, ns from the first kernel's
    start to the last one's end); (0, 0) without kernels."""
    if not kernels:
        return 0.0, 0.0
    end = max(e.start_ns + e.duration_ns for e in kernels)
    return sum(e.duration_ns for e in kernels), end - min(e.start_ns for e in kernels)


def family(name: str) -> str:
    """A kernel's name without XLA's numbering (`loop_add_fusion_12` -> `loop_add_fusion`),
    so that the same op of every unrolled layer counts as one."""
    return re.sub(r"([._]\d+)+$", "", name)


def per_call(events: Sequence[KernelEvent], calls: int) -> dict[str, float]:
    """Device seconds per call by kernel name: each name's median duration times how many
    times a call launches it (robust to an odd slow launch)."""
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        by_name[e.name].append(e.duration_ns)
    return {n: statistics.median(d) * len(d) / calls * 1e-9 for n, d in by_name.items()}


def device_time_per_call(fn: Callable, arg_sets: Sequence[tuple], calls: int) -> float | None:
    """Device seconds one call of `fn` keeps the device busy (the sum over the kernels it
    launches), from `calls` traced calls cycling through `arg_sets` after a warm-up; None
    where the trace holds no device kernels (the CPU)."""
    for args in arg_sets[:2]:
        jax.block_until_ready(fn(*args))

    def run():
        return [fn(*arg_sets[i % len(arg_sets)]) for i in range(calls)]

    with tempfile.TemporaryDirectory() as logdir:
        events = read(trace(run, logdir)).kernels
    if not events:
        return None
    return sum(per_call(events, calls).values())
