"""Where a whole decode step's device time goes: its kernels, from a JAX profiler trace.

  PYTHONPATH=. python experiments/profile_step.py --model=gpt2 --dtype=bfloat16 \
      --attention_impl=pallas --reqs=128 --context=512            # on a GPU

Runs --steps decode steps back to back under `jax.profiler`, reads the trace back
(`jax.profiler.ProfileData`) and prints, per step: the kernels launched, the device's busy
time (the sum of kernel times), the span from the first kernel's start to the last one's
end, and the kernels that take the most time, grouped by name. Busy time well under the
span means the device waits (launches, host syncs); many small kernels mean launch overhead.
On the CPU there is no device plane, so it says so and prints the host's busiest events.
"""

from __future__ import annotations

import collections
import glob
import os
import tempfile

import jax
from absl import app, flags
from step_shapes import decode_batch

from models import get_config, init_kv_cache, init_params, step
from models.decoder import layer_unroll

_MODEL = flags.DEFINE_string("model", "gpt2", "Preset.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Parameter / cache dtype.")
_ATTN = flags.DEFINE_string("attention_impl", "pallas", "reference or pallas.")
_UNROLL = flags.DEFINE_integer("layer_unroll", None, "ModelConfig.layer_unroll; unset: auto.")
_REQS = flags.DEFINE_integer("reqs", 128, "Decoding requests.")
_CONTEXT = flags.DEFINE_integer("context", 512, "Cached tokens per request.")
_PAGE = flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps traced.")
_TOP = flags.DEFINE_integer("top", 15, "Kernel names listed.")
_OUT = flags.DEFINE_string("out", None, "Write the report to this file too.")


def trace_steps(params, cfg, cache, batch, steps: int, logdir: str) -> str:
    """Trace `steps` back-to-back steps (after warm-up); the xspace file written."""
    batch = jax.device_put(batch)
    for _ in range(3):
        logits, cache = step(params, cache, batch, cfg)
    jax.block_until_ready(logits)
    jax.profiler.start_trace(logdir)
    for _ in range(steps):
        logits, cache = step(params, cache, batch, cfg)
    jax.block_until_ready(logits)
    jax.profiler.stop_trace()
    return sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))[-1]


def _kernel_events(plane) -> list[tuple[str, float, float]]:
    """(name, start ns, duration ns) of a device plane's kernels: its stream lines, which
    hold the kernels and copies as they ran (not the derived module/op lines)."""
    events = []
    for line in plane.lines:
        if not line.name.startswith("Stream"):
            continue
        events += [(e.name, e.start_ns, e.duration_ns) for e in line.events]
    return events


def report(path: str, steps: int, top: int) -> list[str]:
    data = jax.profiler.ProfileData.from_file(path)
    devices = [p for p in data.planes if p.name.startswith("/device:")]
    events = [e for p in devices for e in _kernel_events(p)]
    if not events and devices:  # an unexpected layout: show what the device lines hold
        lines = ["no Stream lines on the device planes; their lines, and top events of each:"]
        for p in devices:
            for line in p.lines:
                c = collections.Counter()
                for e in line.events:
                    c[e.name] += e.duration_ns
                lines.append(f"{p.name} / {line.name}: {sum(c.values()) / steps / 1e3:.1f} us")
                lines += [f"  {n[:90]}: {t / steps / 1e3:.1f}" for n, t in c.most_common(5)]
        return lines
    if not events:
        host = collections.Counter()
        for p in data.planes:
            for line in p.lines:
                for e in line.events:
                    host[e.name] += e.duration_ns
        lines = ["no device kernels in the trace (CPU?); busiest host events, us per step:"]
        lines += [f"  {n[:90]}: {t / steps / 1e3:.1f}" for n, t in host.most_common(top)]
        return lines
    busy = sum(d for _, _, d in events)
    span = max(s + d for _, s, d in events) - min(s for _, s, _ in events)
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for name, _, d in events:
        by_name[name].append(d)
    lines = [
        f"{len(events) / steps:.0f} kernels per step; device busy {busy / steps / 1e3:.1f} us "
        f"per step of a span of {span / steps / 1e3:.1f} us per step "
        f"({100 * busy / span:.0f}% busy)",
        "",
        "| kernel | per step | us per step | us each |",
        "|---|---|---|---|",
    ]
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    for name, ds in ranked[:top]:
        lines.append(
            f"| {name[:80]} | {len(ds) / steps:.0f} | {sum(ds) / steps / 1e3:.1f} | "
            f"{sum(ds) / len(ds) / 1e3:.1f} |"
        )
    rest = ranked[top:]
    if rest:
        n = sum(len(ds) for _, ds in rest)
        t = sum(sum(ds) for _, ds in rest)
        lines.append(f"| ({len(rest)} other names) | {n / steps:.0f} | {t / steps / 1e3:.1f} | |")
    return lines


def main(argv):
    del argv
    cfg = get_config(
        _MODEL.value,
        dtype=_DTYPE.value,
        attention_impl=_ATTN.value,
        layer_unroll=_UNROLL.value,
    )
    params = init_params(cfg, seed=0)
    batch, num_pages = decode_batch(_REQS.value, _CONTEXT.value, _PAGE.value)
    cache = init_kv_cache(cfg, num_pages, _PAGE.value)
    with tempfile.TemporaryDirectory() as logdir:
        path = trace_steps(params, cfg, cache, batch, _STEPS.value, logdir)
        lines = [
            f"{jax.devices()[0].device_kind}: {_MODEL.value} {_DTYPE.value} {_ATTN.value} "
            f"layer_unroll {layer_unroll(cfg)}, decode {_REQS.value} x {_CONTEXT.value}, "
            f"{_STEPS.value} steps back to back",
            *report(path, _STEPS.value, _TOP.value),
        ]
    print("\n".join(lines))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
