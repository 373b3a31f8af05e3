"""Ragged paged attention on the GPU: our Pallas kernel against the shipped one and the reference.

  PYTHONPATH=. python experiments/bench_attention.py                # GPU: full cases + sweep
  PYTHONPATH=. python experiments/bench_attention.py --small        # CPU: tiny, interpret mode

For every case: correctness of our kernel against the jnp reference (relative L2 error, and
no NaN although the cache is NaN outside the contexts), then median times of our kernel, the
shipped `jax.experimental.pallas.ops.gpu.paged_attention` (decode cases; fed one layer of the
cache in its [K, P, S, H] layout) and the reference, next to a copy bandwidth measured in the
same run. Effective bandwidth = K/V bytes the batch must read / time; the byte floor adds the
q and output bytes. Times are device times per call: on a GPU the sum of the call's kernel
durations in a profiler trace of `--iters` x `--reps` calls (rotating cache layers so small
cases do not run from L2; `kernel_timing.measure`); on the CPU wall-clock differences.
Prints a markdown table and writes it to --out (default $OUT/attention.md when OUT is set).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from bandwidth import describe
from kernel_timing import bench_context, measure

from pallas_kernels.ragged_paged_attention.kernel import ragged_paged_attention
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_ref
from pallas_kernels.ragged_paged_attention.testing import Batch, random_batch

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import paged_attention as shipped

_SMALL = flags.DEFINE_bool("small", False, "Tiny shapes in interpret mode (CPU smoke run).")
_SWEEP = flags.DEFINE_bool("sweep", True, "Also time a few tuning variants of our kernel.")
_ITERS = flags.DEFINE_integer("iters", 30, "Timed samples per measurement (median kept).")
_REPS = flags.DEFINE_integer("reps", 10, "Calls per timed sample.")
_OUT = flags.DEFINE_string("out", None, "Markdown output (default $OUT/attention.md).")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    num_tokens: int
    num_rows: int
    heads: int = 12
    kv_heads: int = 12
    head_dim: int = 64
    page_size: int = 16
    decode_only: bool = False
    # also time the tuning variants in SWEEP: all of them (True) or those named
    sweep: bool | tuple[str, ...] = False
    cache_dtype: str | None = None  # an fp8 type: the cache holds its bits (kv_cache_dtype)


def _decode(name, n, ctx, **kw):
    return Case(name, (1,) * n, (ctx,) * n, n, n, decode_only=True, **kw)


def _mixed(name, decodes, ctx, prompts=(256, 128, 64), bucket=64, **kw):
    q = (*prompts, *(1,) * decodes)
    kv = (*prompts, *(ctx,) * decodes)
    tokens = -(-sum(q) // bucket) * bucket
    return Case(name, q, kv, tokens, len(q), **kw)


def cases(small: bool) -> list[Case]:
    if small:
        kw = dict(heads=4, kv_heads=4, head_dim=32)
        return [
            _decode("decode 4x40", 4, 40, **kw),
            _mixed("mixed 2 prefills + 3x40", 3, 40, prompts=(24, 9), bucket=16, **kw),
            Case("prefill 2x32", (32, 32), (32, 32), 64, 2, **kw),
            _decode(
                "gqa decode 4x40 (N=6,K=2)",
                4,
                40,
                heads=6,
                kv_heads=2,
                head_dim=32,
                sweep=("splits=1",),
            ),
            _decode("decode 4x40, fp8 cache", 4, 40, cache_dtype="float8_e4m3fn", **kw),
        ]
    smol = dict(heads=9, kv_heads=3)
    # Most-wanted first (the goals), so a cut-short run still answers them.
    return [
        _decode("decode 128x512", 128, 512, sweep=True),
        _mixed("mixed 3 prefills + 125x512", 125, 512, sweep=True),
        # 384 (request, kv head) programs: planned with 2 kv splits and a merge
        _decode(
            "smollm2 decode 128x512 (N=9,K=3)",
            128,
            512,
            sweep=("splits=1", "splits=4", "block_kv=64"),
            **smol,
        ),
        _mixed("smollm2 mixed 3 prefills + 125x512", 125, 512, **smol),
        _decode("decode 128x512, fp8 e4m3 cache", 128, 512, cache_dtype="float8_e4m3fn"),
        Case("prefill 8x512", (512,) * 8, (512,) * 8, 4096, 8),
        _decode("decode 32x256", 32, 256),
    ]


# (name, kwargs) tuning variants timed on the cases marked `sweep` when --sweep.
SWEEP = [
    ("block_kv=64", dict(block_kv=64)),
    ("block_kv=256", dict(block_kv=256)),
    ("splits=1", dict(num_kv_splits=1)),
    ("splits=2", dict(num_kv_splits=2)),
    ("splits=4", dict(num_kv_splits=4)),
    ("stages=2", dict(num_stages=2)),
    ("stages=4", dict(num_stages=4)),
    ("warps=2", dict(num_warps=2)),
    ("warps=8", dict(num_warps=8)),
    ("one_launch", dict(one_launch=True)),
    ("one_launch splits=4", dict(one_launch=True, num_kv_splits=4)),
    ("one_loop", dict(one_loop=True)),
    # one tile class: no second launch (empty on a decode-only batch); prefill chunks then
    # take 16-row tiles, each reading its request's K/V again (decode_one_class does so in
    # decode-like buckets only, T <= 2R: the decode case, not the mixed one)
    ("decode_one_class", dict(decode_one_class=True)),
    ("prefill_rows=16", dict(prefill_rows=16)),
    ("prefill_rows=32", dict(prefill_rows=32)),
]


def make_batch(case: Case, seed: int, num_layers: int) -> Batch:
    S = case.page_size
    mb = max(-(-kv // S) for kv in case.kv_lens)
    return random_batch(
        np.random.default_rng(seed),
        q_lens=list(case.q_lens),
        kv_lens=list(case.kv_lens),
        num_tokens=case.num_tokens,
        num_rows=case.num_rows,
        max_blocks=mb,
        num_heads=case.heads,
        num_kv_heads=case.kv_heads,
        head_dim=case.head_dim,
        page_size=S,
        dtype=jnp.bfloat16,
        num_layers=num_layers,
        device_cache=True,
        cache_dtype=case.cache_dtype,
    )


def rel_error(out, ref, n: int) -> float:
    out, ref = np.asarray(out, np.float32)[:n], np.asarray(ref, np.float32)[:n]
    if np.isnan(out).any():
        return float("nan")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def shipped_args(batch: Batch, layer: int, sm_scale: float):
    """The decode batch in the shipped kernel's layout: one layer's [K, P, S, H] pages.

    It has no softmax scale argument, so q comes pre-scaled (outside the timed region).
    """
    n = int(batch.num_reqs)
    q = jnp.asarray(batch.q[:n]) * jnp.asarray(sm_scale, batch.q.dtype)  # one token each
    k = jnp.asarray(batch.k_cache[layer])
    v = jnp.asarray(batch.v_cache[layer])
    return q, k, v, jnp.asarray(batch.block_tables[:n]), jnp.asarray(batch.kv_lens[:n])


def run_case(case: Case, small: bool, sweep: bool, iters: int, reps: int) -> list[dict]:
    interpret = jax.default_backend() == "cpu"
    # Enough layers that the rotated K/V outgrow the H100's 50 MB L2.
    per_layer = 2 * sum(case.kv_lens) * case.kv_heads * case.head_dim * 2
    layers = 1 if small else int(min(8, max(1, -(-200e6 // per_layer))))
    batch = make_batch(case, 0, layers)
    n = batch.num_real_tokens
    sm_scale = case.head_dim**-0.5
    args = [jnp.asarray(a) for a in batch.args()]
    arg_sets = [tuple(args[:3]) + (jnp.int32(layer),) + tuple(args[4:]) for layer in range(layers)]
    ref_fn = functools.partial(
        ragged_paged_attention_ref, sm_scale=sm_scale, cache_dtype=case.cache_dtype
    )
    ref = ref_fn(*batch.args())
    ours = functools.partial(
        ragged_paged_attention, sm_scale=sm_scale, cache_dtype=case.cache_dtype
    )
    poisoned = [jnp.asarray(a) for a in batch.poisoned().args()]
    err = rel_error(ours(*poisoned), ref, n)
    kv_bytes = batch.kv_bytes()
    floor_bytes = kv_bytes + 2 * n * case.heads * case.head_dim * 2
    rows = [
        dict(
            case=case.name,
            impl="ours",
            err=err,
            kv_bytes=kv_bytes,
            floor=floor_bytes,
            t=measure(ours, arg_sets, iters, reps),
        )
    ]
    if sweep and case.sweep:
        for name, tuning in SWEEP:
            if case.sweep is not True and name not in case.sweep:
                continue
            fn = functools.partial(ours, **tuning)
            rows.append(
                dict(
                    case=case.name,
                    impl=f"ours {name}",
                    kv_bytes=kv_bytes,
                    floor=floor_bytes,
                    err=rel_error(fn(*poisoned), ref, n),
                    t=measure(fn, arg_sets, iters, reps),
                )
            )
    if case.decode_only and case.cache_dtype is None:
        ship = functools.partial(
            shipped.paged_attention,
            pages_per_compute_block=4,
            k_splits=min(16, batch.block_tables.shape[1]),
            interpret=interpret,
        )
        ship_sets = [shipped_args(batch, layer, sm_scale) for layer in range(layers)]
        ship_err = rel_error(ship(*ship_sets[int(batch.layer)]), ref, n)
        rows.append(
            dict(
                case=case.name,
                impl="shipped paged_attention",
                err=ship_err,
                kv_bytes=kv_bytes,
                floor=floor_bytes,
                t=measure(ship, ship_sets, iters, reps),
            )
        )
    rows.append(
        dict(
            case=case.name,
            impl="reference (jnp)",
            err=0.0,
            kv_bytes=kv_bytes,
            floor=floor_bytes,
            t=measure(ref_fn, arg_sets, max(3, iters // 10), 1),
        )
    )
    return rows


def table(rows: list[dict], bws: dict[str, float], device: str) -> str:
    copy_bw = max(bws.values())
    lines = [
        f"Device: {device}. Copy bandwidth (read+write, same run; the fastest is the "
        f"ceiling): {describe(bws)}. bf16 inputs (an fp8 cache where named). Time: device "
        "time per call (the profiler's kernel durations on a GPU). KV GB/s: K/V bytes the "
        "batch must read / time; x byte floor: time / ((K/V + q + out bytes) / copy "
        "bandwidth).",
        "",
        "| case | kernel | time (us) | KV GB/s | % of copy BW | x byte floor | rel err |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["t"]
        bw, floor_t = r["kv_bytes"] / t, r["floor"] / copy_bw
        lines.append(
            f"| {r['case']} | {r['impl']} | {t * 1e6:.1f} | {bw / 1e9:.0f} | "
            f"{100 * bw / copy_bw:.0f}% | {t / floor_t:.2f} | {r['err']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    small = _SMALL.value
    iters, reps = (3, 2) if small else (_ITERS.value, _REPS.value)
    bws, device, out = bench_context(small, _OUT.value, "attention.md")
    rows = []
    for case in cases(small):
        # --small sweeps only the cases naming their variants (a short list)
        sweep = _SWEEP.value and (not small or isinstance(case.sweep, tuple))
        rows += run_case(case, small, sweep, iters, reps)
        print(f"done: {case.name}", flush=True)
        if out:  # after every case, so a timeout keeps what was measured
            with open(out, "w") as f:
                f.write(table(rows, bws, device))
    print(table(rows, bws, device))
    bad = [r for r in rows if not r["err"] < (5e-2 if small else 2e-2)]
    if bad:
        raise SystemExit(f"wrong results: {[(r['case'], r['impl'], r['err']) for r in bad]}")


if __name__ == "__main__":
    app.run(main)
