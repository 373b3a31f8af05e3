"""Selective batching against the alternatives it replaced, step by step (the paper's §4.2).

  python experiments/bench_selective_batching.py                  # gpt2 widths, 2 layers
  python experiments/bench_selective_batching.py --layers=12 --dtype=bfloat16   # a GPU

For one set of requests, the time of the model work each way of batching needs:
- selective (Orca): every request's new tokens packed on one token axis, one step, padded
  only to the next token bucket;
- padded (FasterTransformer's batches): every prompt padded to the longest one, one step of
  R x longest tokens;
- one at a time: a step per request (no batching at all).
Two mixes: prompts of different lengths, and prompts arriving while other requests decode
(selective batching runs both in one step; a request-level system runs the prompts padded
and the decodes as a separate step). Each is the median of --iters steps, waited for; same
model, same cache, random weights. The step is the engine's (`models.step`), so padding is
exactly what a padded system would compute.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags
from step_shapes import time_step

from models import get_config, init_kv_cache, init_params, pack_batch
from models.batch import bucket, geometric_buckets

_MODEL = flags.DEFINE_string("model", "gpt2", "Preset whose widths to use (random weights).")
_LAYERS = flags.DEFINE_integer("layers", 2, "Layers (the ratios do not depend on depth).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Parameter / cache dtype.")
_ATTN = flags.DEFINE_string("attention_impl", "auto", "auto, reference or pallas.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed steps per measurement (median).")
_SEED = flags.DEFINE_integer("seed", 0, "Lengths seed.")

PAGE = 16
TOKEN_BUCKETS = geometric_buckets(16, 8192)


def packed(reqs: list[tuple[int, int]]):
    """One batch of requests given as (new tokens, cached tokens), each on its own pages."""
    seqs, next_page = [], 1
    for new, cached in reqs:
        pages = -(-(new + cached) // PAGE)
        seqs.append(([1] * new, cached, list(range(next_page, next_page + pages))))
        next_page += pages
    tokens = bucket(sum(n for n, _ in reqs), TOKEN_BUCKETS)
    max_blocks = max(len(b) for _, _, b in seqs)
    batch = pack_batch(
        seqs, page_size=PAGE, num_tokens=tokens, num_reqs=len(reqs), max_blocks=max_blocks
    )
    return batch, next_page


def seconds(params, cfg, reqs_per_step: list[list[tuple[int, int]]]) -> float:
    """Median time of running these steps one after another."""
    total = 0.0
    for reqs in reqs_per_step:
        batch, pages = packed(reqs)
        cache = init_kv_cache(cfg, pages, PAGE)
        t, _ = time_step(params, cfg, cache, batch, _ITERS.value)
        total += t
    return total


def main(argv):
    del argv
    cfg = get_config(
        _MODEL.value, n_layers=_LAYERS.value, dtype=_DTYPE.value, attention_impl=_ATTN.value
    )
    params = init_params(cfg, seed=0)
    rng = np.random.default_rng(_SEED.value)
    prompts = [int(n) for n in rng.integers(32, 257, 8)]  # the paper's U[32, 512], halved
    longest = max(prompts)
    decodes = [(1, int(c)) for c in rng.integers(32, 513, 24)]
    mixes = {
        f"8 prompts U[32, 256] ({sum(prompts)} tokens)": {
            "selective": [[(n, 0) for n in prompts]],
            "padded": [[(longest, 0)] * len(prompts)],
            "one at a time": [[(n, 0)] for n in prompts],
        },
        f"4 prompts + 24 decodes ({sum(prompts[:4]) + 24} tokens)": {
            "selective": [[(n, 0) for n in prompts[:4]] + decodes],
            "padded": [[(max(prompts[:4]), 0)] * 4, decodes],
            "one at a time": [[(n, 0)] for n in prompts[:4]] + [[d] for d in decodes],
        },
    }
    print(
        f"{cfg.name} widths, {cfg.n_layers} layers, {cfg.dtype}, attention {cfg.attention_impl}; "
        f"median of {_ITERS.value} steps each\n"
    )
    print("| requests | batching | steps | model tokens | ms | x selective |")
    print("|---|---|---|---|---|---|")
    for name, ways in mixes.items():
        base = None
        for way, steps in ways.items():
            t = seconds(params, cfg, steps)
            base = base or t
            tokens = sum(bucket(sum(n for n, _ in s), TOKEN_BUCKETS) for s in steps)
            print(
                f"| {name} | {way} | {len(steps)} | {tokens} | {t * 1e3:.1f} | {t / base:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)
