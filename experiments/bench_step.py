"""Step time of the whole model per token bucket, and against the memory-bandwidth floor.

  python experiments/bench_step.py --models=tiny-gpt,gpt2 --buckets=16,64,256
  python experiments/bench_step.py --models=gpt2 --dtype=bfloat16 --floor_case   # on a GPU
  python experiments/bench_step.py --dtype=bfloat16 --attention_impl=pallas --buckets= \
      --variants=unrolled,unrolled_linear,scanned        # the floor case, side by side

Decode rows: R requests, one token each, every request with `--context` tokens cached.
Prefill rows: one request of T prompt tokens. Prints a markdown table (and writes --out).
`--variants` times the floor case once per named variant of the step (VARIANTS: settings
laid over the flags' config) in one process, one after another on the same weights.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import NamedTuple

import jax
import step_flags
from absl import app, flags
from bandwidth import copy_bandwidths, describe
from step_shapes import decode_batch, prefill_batch, time_step

from models import init_kv_cache, init_params, step

_MODELS = flags.DEFINE_list("models", ["tiny-gpt", "gpt2"], "Presets to time.")
_BUCKETS = flags.DEFINE_list("buckets", ["16", "64", "256"], "Token buckets T.")
_CONTEXT = flags.DEFINE_integer("context", 256, "Cached tokens per decoding request.")
step_flags.define(dtype="float32", attention_impl="reference")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed iterations (median reported).")
_FLOOR = flags.DEFINE_bool(
    "floor_case", False, "Also time --floor_reqs decodes x --floor_context against the floor."
)
_FLOOR_FIRST = flags.DEFINE_bool("floor_first", False, "Time the floor case before the buckets.")
_FLOOR_MODEL = flags.DEFINE_string("floor_model", "gpt2", "Model of the floor case.")
_FLOOR_REQS = flags.DEFINE_integer("floor_reqs", 128, "Decoding requests of the floor case.")
_FLOOR_CTX = flags.DEFINE_integer("floor_context", 512, "Context of the floor case.")
_VARIANTS = flags.DEFINE_list(
    "variants", [], "Also time the floor case for each of these VARIANTS, side by side."
)
_OUT = flags.DEFINE_string("out", None, "Write the table to this file too.")

# Settings laid over the flags' config per variant: layer_unroll ("all" or 1), fused_linear,
# and attention kernel options (added to --attention_options). Most wanted first.
VARIANTS: dict[str, dict] = {
    "unrolled": dict(layer_unroll="all"),
    "unrolled_linear": dict(layer_unroll="all", fused_linear=True),
    # one attention tile class in decode-like buckets: one launch a layer
    "unrolled_linear_1class": dict(
        layer_unroll="all", fused_linear=True, attention_options=dict(decode_one_class=True)
    ),
    "unrolled_1class": dict(layer_unroll="all", attention_options=dict(decode_one_class=True)),
    "unrolled_1loop": dict(layer_unroll="all", attention_options=dict(one_loop=True)),
    "unrolled_kv64": dict(layer_unroll="all", attention_options=dict(block_kv=64)),
    "unrolled_linear_1class_kv64": dict(
        layer_unroll="all",
        fused_linear=True,
        attention_options=dict(decode_one_class=True, block_kv=64),
    ),
    # GQA models (smollm2: 384 programs, planned with 2 kv splits and a merge): one split
    "unrolled_linear_1class_1split": dict(
        layer_unroll="all",
        fused_linear=True,
        attention_options=dict(decode_one_class=True, num_kv_splits=1),
    ),
    "scanned": dict(layer_unroll=1),
    "scanned_linear": dict(layer_unroll=1, fused_linear=True),
}


def time_back_to_back(params, cfg, cache, batch, steps: int, samples: int = 5):
    """Median seconds per step when `steps` steps are queued before one wait (as the engine
    runs with batches in flight: the host's dispatch hides behind the device's work)."""
    batch = jax.device_put(batch)
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, cache = step(params, cache, batch, cfg)
        jax.block_until_ready(logits)
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times), cache


def main(argv):
    del argv
    page = step_flags.value("page_size")
    out = _OUT.value

    def emit(new: list[str]) -> None:
        """Print rows as they come and rewrite --out, so a timeout keeps what was measured."""
        rows.extend(new)
        print("\n".join(new), flush=True)
        if out:
            with open(out, "w") as f:
                f.write("\n".join(rows) + "\n")

    rows: list[str] = []
    if _FLOOR.value and _FLOOR_FIRST.value:
        emit(floor_rows(page))
    emit(
        [
            f"device: {jax.devices()[0].device_kind}, dtype {step_flags.value('dtype')}"
            f"{', int8 weights' if step_flags.value('quantization') else ''}, kv cache "
            f"{step_flags.value('kv_cache_dtype')}, attention "
            f"{step_flags.value('attention_impl')}, page {page}, decode context {_CONTEXT.value}",
            "",
            "| model | case | T | ms/step | tokens/s |",
            "|---|---|---|---|---|",
        ]
    )
    for name in _MODELS.value:
        cfg = step_flags.model_config(name)
        params = init_params(cfg, seed=0)
        for t in map(int, _BUCKETS.value):
            context = min(_CONTEXT.value, cfg.max_seq_len - 1)
            cases = [
                ("decode", *decode_batch(t, context, page)),
                ("prefill", *prefill_batch(t, page)),
            ]
            for case, batch, num_pages in cases:
                cache = init_kv_cache(cfg, num_pages, page)
                sec, cache = time_step(params, cfg, cache, batch, _ITERS.value)
                emit([f"| {name} | {case} | {t} | {sec * 1e3:.2f} | {t / sec:,.0f} |"])
                del cache
    if _FLOOR.value and not _FLOOR_FIRST.value:
        emit(floor_rows(page))
    if _VARIANTS.value:
        variant_rows(page, _VARIANTS.value, emit)


def variant(cfg, settings: dict):
    """`cfg` with a VARIANTS entry's settings laid over it."""
    settings = dict(settings)
    if settings.get("layer_unroll") == "all":
        settings["layer_unroll"] = cfg.n_layers
    options = dict(cfg.attention_options) | settings.pop("attention_options", {})
    return cfg.replace(attention_options=options, **settings)


class FloorCase(NamedTuple):
    """--floor_reqs decodes of --floor_context tokens on a model, and its byte floor."""

    cfg: object  # ModelConfig
    params: dict
    batch: object  # RaggedBatch
    num_pages: int
    page: int
    weight_bytes: int
    kv_bytes: int
    bws: dict[str, float]  # copy bandwidths (bytes/s) by kernel

    @property
    def floor(self) -> float:
        """Seconds to move the weights and K/V once at the best copy bandwidth."""
        return (self.weight_bytes + self.kv_bytes) / max(self.bws.values())

    def time(self, cfg) -> tuple[float, float]:
        """Seconds per step under `cfg` (the case's or a variant's), each waited for and
        queued back to back."""
        iters = max(_ITERS.value, 20)
        cache = init_kv_cache(cfg, self.num_pages, self.page)
        sec, cache = time_step(self.params, cfg, cache, self.batch, iters)
        queued, _ = time_back_to_back(self.params, cfg, cache, self.batch, iters)
        return sec, queued


@functools.cache  # --floor_case and --variants share one: weights made, bandwidth measured once
def floor_case(name: str, page: int) -> FloorCase:
    reqs, ctx = _FLOOR_REQS.value, _FLOOR_CTX.value
    cfg = step_flags.model_config(name)
    params = init_params(cfg, seed=0)
    batch, num_pages = decode_batch(reqs, ctx, page)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    kv_bytes = reqs * (ctx + 1) * cfg.kv_bytes_per_token()
    return FloorCase(cfg, params, batch, num_pages, page, weight_bytes, kv_bytes, copy_bandwidths())


def variant_rows(page: int, names: list[str], emit) -> None:
    """The floor case once per variant, on the same weights, emitted row by row."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    name, reqs, ctx = _FLOOR_MODEL.value, _FLOOR_REQS.value, _FLOOR_CTX.value
    case = floor_case(name, page)
    floor = case.floor
    emit(
        [
            "",
            f"{jax.devices()[0].device_kind}: {step_flags.describe(name, case.cfg)}, decode "
            f"{reqs} x {ctx}, variants side by side; floor {floor * 1e3:.3f} ms "
            f"(copy bandwidth: {describe(case.bws)})",
            "",
            "| variant | settings | waited for (ms) | queued (ms) | x floor (queued) |",
            "|---|---|---|---|---|",
        ]
    )
    for v in names:
        emit([variant_row(case, v)])


def variant_row(case: FloorCase, name: str) -> str:
    """One variant's table row; a variant that fails (a kernel that does not compile or
    run on this device) gets its error in the row, so the variants after it still run."""
    settings = ", ".join(f"{k}={val}" for k, val in VARIANTS[name].items())
    try:
        sec, queued = case.time(variant(case.cfg, VARIANTS[name]))
    except Exception as e:  # noqa: BLE001 (one variant's failure must not cost the others)
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return f"| {name} | {settings} | failed: {type(e).__name__}: {first} | | |"
    return (
        f"| {name} | {settings} | {sec * 1e3:.3f} | {queued * 1e3:.3f} | "
        f"{queued / case.floor:.2f}x |"
    )


def floor_rows(page: int) -> list[str]:
    """R decoding requests of context C: step time vs its memory-bandwidth floor."""
    name, reqs, ctx = _FLOOR_MODEL.value, _FLOOR_REQS.value, _FLOOR_CTX.value
    case = floor_case(name, page)
    sec, queued = case.time(case.cfg)
    floor = case.floor
    return [
        f"{step_flags.describe(name, case.cfg)} decode {reqs} x {ctx}: floor "
        f"{floor * 1e3:.3f} ms = ({case.weight_bytes / 1e6:.0f} MB weights + "
        f"{case.kv_bytes / 1e6:.0f} MB KV) / {max(case.bws.values()) / 1e12:.2f} TB/s copy;",
        f"  each step waited for: {sec * 1e3:.3f} ms/step = {sec / floor:.2f}x floor; "
        f"steps queued back to back: {queued * 1e3:.3f} ms/step = {queued / floor:.2f}x floor",
        f"  copy bandwidth (read+write, fastest kept): {describe(case.bws)}",
        "",
    ]


if __name__ == "__main__":
    app.run(main)
