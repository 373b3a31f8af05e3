"""Where a whole decode step's device time goes: its kernels, from a JAX profiler trace.

  PYTHONPATH=. python experiments/profile_step.py --model=gpt2 --dtype=bfloat16 \
      --attention_impl=pallas --reqs=128 --context=512            # on a GPU

Runs --steps decode steps back to back under `jax.profiler`, reads the trace back
(`jax.profiler.ProfileData`) and prints, per step: the kernels launched, the device's busy
time (the sum of kernel times), the span from the first kernel's start to the last one's
end, and the kernels that take the most time, grouped by name. Busy time well under the
span means the device waits (launches, host syncs); many small kernels mean launch overhead.
Kernels are grouped by name with XLA's numbering dropped, so an unrolled step's layers add
up under one name. On the CPU there is no device plane, and it says so.
"""

from __future__ import annotations

import collections
import statistics
import tempfile

import device_trace
import jax
import step_flags
from absl import app, flags
from step_shapes import decode_batch

from models import init_kv_cache, init_params, step

_MODEL = flags.DEFINE_string("model", "gpt2", "Preset.")
step_flags.define(dtype="bfloat16", attention_impl="pallas")
_REQS = flags.DEFINE_integer("reqs", 128, "Decoding requests.")
_CONTEXT = flags.DEFINE_integer("context", 512, "Cached tokens per request.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps traced.")
_TOP = flags.DEFINE_integer("top", 20, "Kernel names listed.")
_OUT = flags.DEFINE_string("out", None, "Write the report to this file too.")
_ORDER = flags.DEFINE_integer(
    "order", 0, "Also list one step's first N kernels in launch order (which op is which)."
)
_HLO = flags.DEFINE_string(
    "hlo_out", None, "Write the step's optimized HLO here (what XLA fused into each kernel)."
)


def trace_steps(compiled, params, cache, batch, steps: int, logdir: str) -> str:
    """Trace `steps` back-to-back steps of the compiled step (after warm-up); the trace file
    written."""
    for _ in range(3):
        logits, cache = compiled(params, cache, batch)
    jax.block_until_ready(logits)

    def run():
        nonlocal cache
        for _ in range(steps):
            logits, cache = compiled(params, cache, batch)
        return logits

    return device_trace.trace(run, logdir)


def launch_order(events, steps: int, first: int) -> list[str]:
    """The middle step's first `first` kernels in launch order, with their durations."""
    events = sorted(events, key=lambda e: e.start_ns)
    per_step = len(events) // steps
    middle = events[per_step * (steps // 2) :][:first]
    lines = ["", f"| # | kernel, in launch order (step {steps // 2}) | us |", "|---|---|---|"]
    return lines + [
        f"| {i} | {e.name[:90]} | {e.duration_ns / 1e3:.1f} |" for i, e in enumerate(middle)
    ]


def report(path: str, steps: int, top: int, order: int = 0) -> list[str]:
    events = device_trace.read(path).kernels
    if not events:
        return ["no device kernels in the trace (the CPU has no device plane)"]
    busy, span = device_trace.busy_and_span(events)
    by_family: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        by_family[device_trace.family(e.name)].append(e.duration_ns)
    lines = [
        f"{len(events) / steps:.0f} kernels per step; device busy {busy / steps / 1e3:.1f} us "
        f"per step of a span of {span / steps / 1e3:.1f} us per step "
        f"({100 * busy / span:.0f}% busy)",
        "",
        "| kernel (XLA's numbering dropped) | per step | us per step | us each (median) |",
        "|---|---|---|---|",
    ]
    ranked = sorted(by_family.items(), key=lambda kv: -sum(kv[1]))
    for name, ds in ranked[:top]:
        lines.append(
            f"| {name[:80]} | {len(ds) / steps:.0f} | {sum(ds) / steps / 1e3:.1f} | "
            f"{statistics.median(ds) / 1e3:.1f} |"
        )
    rest = ranked[top:]
    if rest:
        n = sum(len(ds) for _, ds in rest)
        t = sum(sum(ds) for _, ds in rest)
        lines.append(f"| ({len(rest)} other names) | {n / steps:.0f} | {t / steps / 1e3:.1f} | |")
    return lines + (launch_order(events, steps, order) if order else [])


def main(argv):
    del argv
    cfg = step_flags.model_config(_MODEL.value)
    params = init_params(cfg, seed=0)
    batch, num_pages = decode_batch(_REQS.value, _CONTEXT.value, step_flags.value("page_size"))
    cache = init_kv_cache(cfg, num_pages, step_flags.value("page_size"))
    batch = jax.device_put(batch)
    compiled = step.lower(params, cache, batch, cfg).compile()  # once: traced and dumped
    if _HLO.value:
        with open(_HLO.value, "w") as f:
            f.write(compiled.as_text())
    with tempfile.TemporaryDirectory() as logdir:
        path = trace_steps(compiled, params, cache, batch, _STEPS.value, logdir)
        lines = [
            f"{jax.devices()[0].device_kind}: {step_flags.describe(_MODEL.value, cfg)}, "
            f"decode {_REQS.value} x {_CONTEXT.value}, "
            f"{_STEPS.value} steps back to back",
            *report(path, _STEPS.value, _TOP.value, _ORDER.value),
        ]
    step_flags.print_report(lines, _OUT.value)


if __name__ == "__main__":
    app.run(main)
