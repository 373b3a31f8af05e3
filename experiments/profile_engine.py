"""Where an engine iteration's wall time goes: the device's kernels against the host's work.

  PYTHONPATH=. python experiments/profile_engine.py --model=gpt2 --dtype=bfloat16   # on a GPU

Serves R requests of P prompt tokens, O output tokens each (EOS ignored), twice on one
engine: the first pass compiles, the second runs under `jax.profiler`. Prints the wall time
per iteration, the device's busy time per iteration (the sum of its kernels' durations;
`device_trace.py`), and the host events that take the most time per iteration (Python
functions and the runtime's dispatch, transfers and waits; they nest, so their times
overlap). Busy time far under the wall time means the device waits for the host.
"""

from __future__ import annotations

import collections
import tempfile

import device_trace
import engine_workload as workload
from absl import app, flags

from models import init_params
from models.decoder import layer_unroll
from orca_jax import Engine

_FLAGS = workload.define_flags(model="gpt2", dtype="bfloat16", num_reqs=128)
_ASYNC = flags.DEFINE_bool("async_output", True, "EngineConfig.async_output.")
_TOP = flags.DEFINE_integer("top", 25, "Host events listed.")


def main(argv):
    del argv
    model = _FLAGS.model_config()
    n, p, o = _FLAGS.num_reqs.value, _FLAGS.prompt_len.value, _FLAGS.output_len.value
    prompts = workload.prompts(model.vocab_size, n, p)
    params = workload.sampling(o)
    config = workload.engine_config(n, p, o, async_output=_ASYNC.value)
    engine = Engine(model, init_params(model, seed=0), None, config)
    workload.serve(engine, prompts, params)  # compiles the shapes this workload meets
    wall, iters = 0.0, 0

    def run():
        nonlocal wall, iters
        wall, iters = workload.serve(engine, prompts, params)

    with tempfile.TemporaryDirectory() as logdir:
        path = device_trace.trace(run, logdir)
        trace = device_trace.read(path)
    kernels, host = trace.kernels, trace.host
    busy, span = device_trace.busy_and_span(kernels)
    lines = [
        f"{model.name} {model.dtype}, layer_unroll {layer_unroll(model)}, attention options "
        f"{dict(model.attention_options)}, async_output "
        f"{_ASYNC.value}: {n} requests x ({p} prompt + {o} output), {iters} iterations traced",
        f"wall {wall / iters * 1e3:.3f} ms per iteration (under the profiler); "
        f"device kernels {len(kernels) / iters:.0f} per iteration, busy "
        f"{busy / iters / 1e6:.3f} ms per iteration over a span of {span / iters / 1e6:.3f} ms"
        + (f" ({100 * busy / span:.0f}% busy)" if span else " (no device plane: the CPU)"),
        "",
        "| host event | per iteration | ms per iteration |",
        "|---|---|---|",
    ]
    total: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for e in host:
        total[e.name] += e.duration_ns
        count[e.name] += 1
    for name, t in sorted(total.items(), key=lambda kv: -kv[1])[: _TOP.value]:
        lines.append(f"| {name[:90]} | {count[name] / iters:.1f} | {t / iters / 1e6:.3f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
