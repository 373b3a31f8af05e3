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

_MODEL = flags.DEFINE_string("model", "tiny-gpt", "Model preset (random weights).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Parameter / cache dtype.")
_POLICY = flags.DEFINE_string("policy", "paged", "orca or paged.")
_REQS = flags.DEFINE_integer("num_reqs", 64, "Requests running together.")
_PROMPT = flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per request.")
_OUTPUT = flags.DEFINE_integer("output_len", 64, "Tokens generated per request.")
_UNROLL = flags.DEFINE_integer("layer_unroll", None, "ModelConfig.layer_unroll; unset: auto.")
_OPTIONS = flags.DEFINE_string(
    "attention_options", "", "Pallas kernel options, e.g. one_launch=true,fuse_kv_write=true."
)
_ADD_NORM = flags.DEFINE_bool(
    "fused_add_norm", None, "ModelConfig.fused_add_norm (residual add + norm in one kernel)."
)
_OUT = flags.DEFINE_string("out", None, "Write the table to this file too.")


def main(argv):
    del argv
    model = workload.model_config(
        _MODEL.value, _DTYPE.value, _UNROLL.value, _OPTIONS.value, _ADD_NORM.value
    )
    weights = init_params(model, seed=0)
    n, p, o = _REQS.value, _PROMPT.value, _OUTPUT.value
    prompts = workload.prompts(model.vocab_size, n, p)
    params = workload.sampling(o)
    rows = [
        f"{model.name} {_DTYPE.value}, layer_unroll {layer_unroll(model)}, attention options "
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
