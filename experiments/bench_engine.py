"""Engine throughput with host work overlapped (async_output; n_workers=2) or not.

  PYTHONPATH=. python experiments/bench_engine.py --model=gpt2 --dtype=bfloat16   # on a GPU

R requests of P prompt tokens each generate O tokens (EOS ignored), all together, under
`--policy`. Each configuration runs the same workload twice on one engine: the first pass
compiles the shapes it meets, the second is timed (so no compile is timed). Reports time per
iteration and output tokens/s for one batch of all R requests (n_workers=1), with the
returned batch's text work before the next dispatch or after it (async_output: overlapping
the device's step), and for two batches of R/2 in flight (n_workers=2: a request in flight
is not scheduled again, so the requests alternate, as in Orca's pipeline): there the host
schedules and packs one batch while the device runs the other.
"""

from __future__ import annotations

import engine_workload as workload
from absl import app, flags

from models import init_params
from models.decoder import layer_unroll
from orca_jax import Engine

_FLAGS = workload.define_flags(model="tiny-gpt", dtype="float32", num_reqs=64)
_POLICY = flags.DEFINE_string("policy", "paged", "orca or paged.")
_OUT = flags.DEFINE_string("out", None, "Write the table to this file too.")


def main(argv):
    del argv
    model = _FLAGS.model_config()
    weights = init_params(model, seed=0)
    n, p, o = _FLAGS.num_reqs.value, _FLAGS.prompt_len.value, _FLAGS.output_len.value
    prompts = workload.prompts(model.vocab_size, n, p)
    params = workload.sampling(o)
    rows = [
        f"{model.name} {model.dtype}, layer_unroll {layer_unroll(model)}, attention options "
        f"{dict(model.attention_options)}, {_POLICY.value}, "
        f"{n} requests x ({p} prompt + {o} output) tokens; second pass of each engine timed",
        "",
        "| n_workers | async_output | max batch | s | iterations | ms/iteration | output tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    configs = ((1, False, n), (1, True, n), (2, True, -(-n // 2)))
    for n_workers, async_output, max_batch in configs:
        config = workload.engine_config(
            n,
            p,
            o,
            policy=_POLICY.value,
            max_batch_size=max_batch,
            n_workers=n_workers,
            async_output=async_output,
        )
        engine = Engine(model, weights, None, config)
        workload.serve(engine, prompts, params)  # compiles the shapes this workload meets
        sec, iters = workload.serve(engine, prompts, params)
        rows.append(
            f"| {n_workers} | {async_output} | {max_batch} | {sec:.3f} | {iters} | "
            f"{1e3 * sec / iters:.3f} | "
            f"{n * o / sec:,.0f} |"
        )
        print(rows[-1], flush=True)
    text = "\n".join(rows)
    print(text)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
