"""The fused linear kernel against XLA's GEMM and epilogue, on gpt2's layer shapes.

  PYTHONPATH=. python experiments/bench_linear.py                 # GPU: planned + sweep
  PYTHONPATH=. python experiments/bench_linear.py --small         # CPU smoke run

Each case is one linear layer of the decoder at M rows (or q, k and v, three products of
the same x): XLA's `dense` (einsum, bias add, GELU where the layer has one) on one layer's
weights, against `pallas_kernels/linear` on the stacked weights at a layer index, in one
launch with its planned blocks, then a sweep of other blocks and K splits. Then a layer's
whole chain of linear work (`--chain`): norm, q/k/v, o and the residual add, norm, up with
GELU, down and the residual add (q standing in for the attention's output), as XLA's ops,
as our kernels beside XLA's norms and adds, and as the decoder's fused path: four launches,
the norms and residual adds in the kernels.
Time: device time per call (the profiler's kernel durations on a GPU, every kernel the call
launches); x floor: time / (bytes of weights + x + y / copy bandwidth).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from bandwidth import describe
from kernel_timing import bench_context, measure

from models.layers import dense
from pallas_kernels.add_norm.reference import norm_ref
from pallas_kernels.linear.kernel import linear, linear_group, plan_blocks
from pallas_kernels.linear.reference import linear_ref

_SMALL = flags.DEFINE_bool("small", False, "Tiny shapes in interpret mode (CPU smoke run).")
_ROWS = flags.DEFINE_list("rows", ["128", "16", "512"], "Row counts M (token buckets).")
_SWEEP = flags.DEFINE_bool("sweep", True, "Also time other block shapes at the first M.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed samples per measurement.")
_REPS = flags.DEFINE_integer("reps", 10, "Calls per timed sample.")
_OUT = flags.DEFINE_string("out", None, "Markdown output (default $OUT/linear.md).")
_CHAIN = flags.DEFINE_bool("chain", True, "Also time a layer's chain of linear work.")

# (name, K, N, activation, products sharing x): gpt2's q, k and v (one launch), o, up, down
GPT2 = [
    ("q+k+v", 768, 768, None, 3),
    ("o", 768, 768, None, 1),
    ("up", 768, 3072, "gelu_tanh", 1),
    ("down", 3072, 768, None, 1),
]
SMALL = [("q+k+v", 64, 64, None, 3), ("up", 64, 256, "gelu_tanh", 1), ("down", 256, 64, None, 1)]
# (block_m, block_n, block_k, num_warps, num_stages, num_k_splits) tried beside the plan:
# around the best of the last sweep (m64 n16 k64, 5 stages), then K split over programs
SWEEP = [
    # block_n, block_k, stages: the last sweep's best, wider K chunks, more stages
    *((64, n, k, 4, st, 1) for n, k, st in [(16, 64, 5), (16, 128, 5), (16, 128, 4)]),
    *((64, n, k, 4, st, 1) for n, k, st in [(32, 64, 5), (32, 128, 5), (16, 64, 6)]),
    # block_n, K splits
    *((64, n, 64, 4, 5, sp) for n, sp in [(16, 4), (32, 4), (64, 2), (64, 4), (64, 8), (128, 8)]),
    (128, 64, 64, 8, 5, 4),
    # all 128 rows in one block: each weight tile read by one program, not two
    *((128, n, 64, 4, 5, sp) for n, sp in [(16, 1), (32, 1), (64, 4)]),
    # wide column blocks, unsplit: x's rows are read (from L2) once per column block, so
    # 16-column blocks read them N / 16 times (q+k+v: 144 x 98 KB = 14 MB a row block)
    *((64, n, 64, 4, 5, 1) for n in (64, 128)),
]


def run_case(name, M, K, N, act, count, layers, sweep, iters, reps, dtype):
    """XLA's `dense` for each of `count` products of x, against ours in one launch (and, for
    several, ours launched once per product), then the sweep's settings."""
    rng = np.random.default_rng(M + K + N)
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    ws = [
        jnp.asarray(rng.standard_normal((layers, K, N)) / np.sqrt(K), dtype) for _ in range(count)
    ]
    bs = [jnp.asarray(rng.standard_normal((layers, N)), dtype) for _ in range(count)]
    arg_sets = [(x, ws, bs, jnp.int32(i)) for i in range(layers)]
    # XLA's GEMMs get each layer's weights as arrays of their own (as an unrolled step's
    # static slices are); calls cycle through the layers, so the weights come from memory
    xla_sets = [
        (x, [jnp.array(w[i]) for w in ws], [jnp.array(b[i]) for b in bs]) for i in range(layers)
    ]
    want = linear_ref(x, ws[-1][0], bs[-1][0], activation=act)  # the last product's
    nbytes = count * (K * N + M * N + N) * jnp.dtype(dtype).itemsize + M * K * 2

    def xla(x, ws, bs):
        return [
            dense({"kernel": w, "bias": b}, x, "TD,DF->TF", act)
            for w, b in zip(ws, bs, strict=True)
        ]

    def separate(x, ws, bs, layer):
        return [linear(x, w, b, layer, activation=act) for w, b in zip(ws, bs, strict=True)]

    case = f"{name} {M}x{K}x{N}"
    rows = [dict(impl="XLA dense", fn=xla)]
    if count > 1:
        rows.append(dict(impl=f"ours, {count} launches", fn=separate))
    for cfg in [None] + (SWEEP if sweep else []):
        if cfg is None:
            kw, label = (
                {},
                "ours, planned m{}n{}k{} splits {}".format(*plan_blocks(M, K, [N] * count)),
            )
        else:
            bm, bn, bk, warps, stages, splits = cfg
            if N % bn or K % bk or (K // bk) % splits:
                continue
            kw = dict(
                block_m=bm,
                block_n=bn,
                block_k=bk,
                num_warps=warps,
                num_stages=stages,
                num_k_splits=splits,
            )
            label = f"ours m{bm} n{bn} k{bk} w{warps} s{stages} splits {splits}"
        rows.append(dict(impl=label, fn=functools.partial(linear_group, activation=act, **kw)))
    out = []
    for r in rows:
        sets = xla_sets if r["fn"] is xla else arg_sets
        try:
            y = r["fn"](*sets[0])[-1]
            err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - want.astype(jnp.float32))))
            t = measure(r["fn"], sets, iters, reps)
        except Exception as e:  # a sweep's block shape the compiler refuses: say so, go on
            print(f"{case} {r['impl']}: failed: {str(e)[:300]}", flush=True)
            continue
        out.append(dict(case=case, impl=r["impl"], t=t, bytes=nbytes, err=err))
        print(f"{case} {r['impl']}: {t * 1e6:.1f} us", flush=True)
    return out


def _row(a, i):
    return a[i]


def run_chain(M, D, F, layers, iters, reps, dtype):
    """A gpt2 layer's linear work at M rows (no attention: q stands in for its output):
    XLA's ops; our linear kernel with XLA's norms and residual adds; our kernel with the
    norms and adds in it (the decoder's fused path: 4 launches)."""
    rng = np.random.default_rng(M + D)
    r = lambda *shape, s=1.0: jnp.asarray(s * rng.standard_normal(shape), dtype)  # noqa: E731
    shapes = dict(q=(D, D), k=(D, D), v=(D, D), o=(D, D), up=(D, F), down=(F, D))
    w = {n: r(layers, *kn, s=kn[0] ** -0.5) for n, kn in shapes.items()}
    b = {n: r(layers, kn[1]) for n, kn in shapes.items()}
    ln = {n: (1 + 0.1 * r(layers, D), r(layers, D)) for n in ("ln1", "ln2")}  # scale, bias
    x = r(M, D, s=3.0)

    def xla(x, w, b, ln):  # one layer's arrays (an unrolled step's static slices)
        d = lambda n, h, act=None: dense({"kernel": w[n], "bias": b[n]}, h, "TD,DF->TF", act)  # noqa: E731
        h = norm_ref(x, *ln["ln1"], eps=1e-5, layernorm=True)
        q, k, v = d("q", h), d("k", h), d("v", h)
        x = x + d("o", q)
        h = norm_ref(x, *ln["ln2"], eps=1e-5, layernorm=True)
        return x + d("down", d("up", h, "gelu_tanh")), k, v  # k, v: not dead code

    def kernels(x, w, b, ln, i):  # our linear kernel, XLA's norms and residual adds
        h = norm_ref(x, *(a[i] for a in ln["ln1"]), eps=1e-5, layernorm=True)
        q, k, v = linear_group(h, [w[n] for n in "qkv"], [b[n] for n in "qkv"], i)
        x = x + linear(q, w["o"], b["o"], i)
        h = norm_ref(x, *(a[i] for a in ln["ln2"]), eps=1e-5, layernorm=True)
        h = linear(h, w["up"], b["up"], i, activation="gelu_tanh")
        return x + linear(h, w["down"], b["down"], i), k, v

    def fused(x, w, b, ln, i, down=None):  # the norms and residual adds in the kernels
        n1, n2 = ({"norm_scale": s, "norm_bias": t} for s, t in (ln["ln1"], ln["ln2"]))
        qkv = [w[n] for n in "qkv"], [b[n] for n in "qkv"]
        q, k, v = linear_group(x, *qkv, i, norm="layernorm", **n1)
        x = linear(q, w["o"], b["o"], i, residual=x)
        h = linear(x, w["up"], b["up"], i, norm="layernorm", activation="gelu_tanh", **n2)
        return linear(h, w["down"], b["down"], i, residual=x, **(down or {})), k, v

    whole_k = functools.partial(fused, down=dict(num_k_splits=1, block_n=16))
    stacked = [(x, w, b, ln, jnp.int32(i)) for i in range(layers)]
    sliced = [
        (x, *(jax.tree.map(functools.partial(_row, i=i), d) for d in (w, b, ln)))
        for i in range(layers)
    ]
    want = xla(*sliced[0])[0]
    nbytes = sum(a[0].size for a in [*w.values(), *b.values()]) * jnp.dtype(dtype).itemsize
    case, out = f"layer chain {M}x{D}x{F}", []
    for impl, fn, sets in [
        ("XLA ops", xla, sliced),
        ("our GEMMs, XLA norms + adds", kernels, stacked),
        ("ours, norms + adds fused (4 launches)", fused, stacked),
        ("ours, fused, down unsplit (n16)", whole_k, stacked),
    ]:
        y = fn(*sets[0])[0]
        err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - want.astype(jnp.float32))))
        t = measure(fn, sets, iters, reps)
        out.append(dict(case=case, impl=impl, t=t, bytes=nbytes, err=err))
        print(f"{case} {impl}: {t * 1e6:.1f} us (max abs err {err:.1e})", flush=True)
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
        for name, K, N, act, count in shapes:
            sweep = _SWEEP.value and i == 0 and not small
            # enough layers that the weights outgrow the H100's and H200's 50 MB L2
            layers = 1 if small else max(2, -(-200_000_000 // (2 * K * N * count)))
            rows += run_case(name, M, K, N, act, count, layers, sweep, iters, reps, dtype)
            if out_path:  # after every case, so a timeout keeps what was measured
                with open(out_path, "w") as f:
                    f.write(table(rows, bws, device))
        if _CHAIN.value:
            D, F = (64, 256) if small else (768, 3072)
            layers = 1 if small else 12
            rows += run_chain(M, D, F, layers, iters, reps, dtype)
    print(table(rows, bws, device))


if __name__ == "__main__":
    app.run(main)
