"""The fused linear kernel against XLA's GEMM and epilogue, on gpt2's layer shapes.

  PYTHONPATH=. python experiments/bench_linear.py                 # GPU: planned + sweep
  PYTHONPATH=. python experiments/bench_linear.py --small         # CPU smoke run

Each case is one linear layer of the decoder at M rows: XLA's `dense` (einsum, bias add,
GELU where the layer has one) on one layer's weights, against `pallas_kernels/linear` on the
stacked weights at a layer index, with its planned blocks and then a sweep of other blocks.
Time: device time per call (the profiler's kernel durations on a GPU, every kernel the call
launches); x floor: time / (bytes of weights + x + y / copy bandwidth).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from bandwidth import describe
from kernel_timing import bench_context, measure

from models.layers import dense
from pallas_kernels.linear.kernel import linear, plan_blocks
from pallas_kernels.linear.reference import linear_ref

_SMALL = flags.DEFINE_bool("small", False, "Tiny shapes in interpret mode (CPU smoke run).")
_ROWS = flags.DEFINE_list("rows", ["128", "16", "512"], "Row counts M (token buckets).")
_SWEEP = flags.DEFINE_bool("sweep", True, "Also time other block shapes at the first M.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed samples per measurement.")
_REPS = flags.DEFINE_integer("reps", 10, "Calls per timed sample.")
_OUT = flags.DEFINE_string("out", None, "Markdown output (default $OUT/linear.md).")

# (name, K, N, activation): gpt2's q (k, v and o have the same shape), up, down
GPT2 = [("q/k/v/o", 768, 768, None), ("up", 768, 3072, "gelu_tanh"), ("down", 3072, 768, None)]
SMALL = [("q", 64, 64, None), ("up", 64, 256, "gelu_tanh"), ("down", 256, 64, None)]
# (block_m, block_n, block_k, num_warps, num_stages) tried beside the plan
SWEEP = [
    (16, 16, 64, 4, 3),
    (32, 16, 64, 4, 3),
    (64, 32, 64, 4, 3),
    (64, 64, 64, 4, 3),
    (128, 16, 64, 4, 3),
    (128, 32, 64, 4, 3),
    (128, 64, 64, 4, 3),
    (64, 16, 128, 4, 3),
    (64, 16, 32, 4, 3),
    (64, 16, 64, 2, 3),
    (64, 16, 64, 8, 3),
    (64, 16, 64, 4, 2),
    (64, 16, 64, 4, 4),
    (64, 16, 64, 4, 5),
]


def run_case(name, M, K, N, act, layers, sweep, iters, reps, dtype):
    rng = np.random.default_rng(M + K + N)
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    w = jnp.asarray(rng.standard_normal((layers, K, N)) / np.sqrt(K), dtype)
    b = jnp.asarray(rng.standard_normal((layers, N)), dtype)
    arg_sets = [(x, w, b, jnp.int32(i)) for i in range(layers)]
    # XLA's GEMM gets each layer's weights as arrays of their own (as an unrolled step's
    # static slices are); calls cycle through the layers, so the weights come from memory
    xla_sets = [(x, jnp.array(w[i]), jnp.array(b[i])) for i in range(layers)]
    want = linear_ref(x, w[0], b[0], activation=act)
    nbytes = (K * N + M * K + M * N + N) * jnp.dtype(dtype).itemsize

    def xla(x, w, b):
        return dense({"kernel": w, "bias": b}, x, "TD,DF->TF", act)

    rows = [dict(case=f"{name} {M}x{K}x{N}", impl="XLA dense", fn=xla)]
    configs = [None] + (SWEEP if sweep else [])
    for cfg in configs:
        if cfg is None:
            kw, label = {}, "ours, planned " + "x".join(map(str, plan_blocks(M, K, N)))
        else:
            bm, bn, bk, warps, stages = cfg
            if N % bn or K % bk:
                continue
            kw = dict(block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
            label = f"ours m{bm} n{bn} k{bk} w{warps} s{stages}"
        rows.append(
            dict(
                case=rows[0]["case"], impl=label, fn=functools.partial(linear, activation=act, **kw)
            )
        )
    out = []
    for r in rows:
        sets = xla_sets if r["fn"] is xla else arg_sets
        try:
            y = r["fn"](*sets[0])
            err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - want.astype(jnp.float32))))
            t = measure(r["fn"], sets, iters, reps)
        except Exception as e:  # a sweep's block shape the compiler refuses: say so, go on
            print(f"{r['case']} {r['impl']}: failed: {str(e)[:300]}", flush=True)
            continue
        out.append(dict(case=r["case"], impl=r["impl"], t=t, bytes=nbytes, err=err))
        print(f"{r['case']} {r['impl']}: {t * 1e6:.1f} us", flush=True)
    return out


def table(rows, bws, device) -> str:
    bw = max(bws.values())
    lines = [
        f"Device: {device}. Copy bandwidth: {describe(bws)}. Time: device time per call "
        "(every kernel it launches); x floor: time / ((weights + x + y bytes) / copy bandwidth).",
        "",
        "| layer M x K x N | implementation | time (us) | x floor | max abs err |",
        "|---|---|---|---|---|",
        *(
            f"| {r['case']} | {r['impl']} | {r['t'] * 1e6:.1f} | {r['t'] * bw / r['bytes']:.1f} "
            f"| {r['err']:.1e} |"
            for r in rows
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    small = _SMALL.value
    dtype = jnp.float32 if small else jnp.bfloat16
    shapes = SMALL if small else GPT2
    rows_list = [16] if small else [int(m) for m in _ROWS.value]
    iters, reps = (2, 2) if small else (_ITERS.value, _REPS.value)
    bws, device, out_path = bench_context(small, _OUT.value, "linear.md")
    rows = []
    for i, M in enumerate(rows_list):
        for name, K, N, act in shapes:
            sweep = _SWEEP.value and i == 0 and not small
            # enough layers that the weights outgrow the H100's and H200's 50 MB L2
            layers = 1 if small else max(2, -(-200_000_000 // (2 * K * N)))
            rows += run_case(name, M, K, N, act, layers, sweep, iters, reps, dtype)
            if out_path:  # after every case, so a timeout keeps what was measured
                with open(out_path, "w") as f:
                    f.write(table(rows, bws, device))
    print(table(rows, bws, device))


if __name__ == "__main__":
    app.run(main)
