"""What serving LoRA adapters costs a step: the same batches with and without adapters.

  PYTHONPATH=. python experiments/bench_lora.py        # SmolLM2-135M shapes, random weights

Per bucket, side by side in one run: the plain step (no adapter slots, no `lora_slots`), and
the step with `--max_loras` slots of rank `--max_lora_rank` holding random adapters on every
layer (q, k, v, o, gate, up, down), the batch's requests spread over the slots round-robin
(every slot in use: the worst case for the masked matmuls). Decode rows: R requests, one
token each, `--context` cached; prefill rows: one request of T tokens.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags
from step_shapes import decode_batch, prefill_batch, time_step

from models import get_config, init_kv_cache, init_params
from models.batch import per_token_slots
from models.lora import init_lora_slots, lora_dims, slot_arrays, write_slot

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Preset (random weights).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Model dtype.")
_BUCKETS = flags.DEFINE_list("buckets", ["16", "64", "256"], "Token buckets T.")
_CONTEXT = flags.DEFINE_integer("context", 256, "Cached tokens per decoding request.")
_MAX_LORAS = flags.DEFINE_integer("max_loras", 4, "Adapter slots, all in use.")
_RANK = flags.DEFINE_integer("max_lora_rank", 16, "Rank of every adapter.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed steps (median).")


def with_adapters(params, cfg, max_loras: int, rank: int):
    """`params` with `max_loras` slots of random rank-`rank` adapters on every layer."""
    rng = np.random.default_rng(0)
    lora = init_lora_slots(cfg, max_loras, rank)
    for slot in range(max_loras):
        targets = {
            name: (
                rng.normal(0, 0.02, (cfg.n_layers, d_in, rank)).astype(np.float32),
                rng.normal(0, 0.02, (cfg.n_layers, rank, d_out)).astype(np.float32),
            )
            for name, (d_in, d_out) in lora_dims(cfg).items()
        }
        lora = write_slot(lora, slot, slot_arrays(cfg, rank, targets))
    return {**params, "layers": {**params["layers"], "lora": lora}}


def main(argv):
    del argv
    cfg = get_config(_MODEL.value, dtype=_DTYPE.value)
    params = init_params(cfg, seed=0)
    adapted = with_adapters(params, cfg, _MAX_LORAS.value, _RANK.value)
    print(
        f"{cfg.name} {cfg.dtype}, {_MAX_LORAS.value} adapters of rank {_RANK.value} on all "
        f"{len(lora_dims(cfg))} layer kinds, requests round-robin over them\n"
    )
    print("| case | T | plain ms | with adapters ms | ratio |")
    print("|---|---|---|---|---|")
    for t in map(int, _BUCKETS.value):
        for case, (batch, num_pages) in (
            ("decode", decode_batch(t, _CONTEXT.value, 16)),
            ("prefill", prefill_batch(t, 16)),
        ):
            q_lens = np.diff(batch.cu_q_lens[: int(batch.num_reqs) + 1])
            slots = np.arange(len(q_lens)) % _MAX_LORAS.value
            lora_batch = batch.replace(lora_slots=per_token_slots(slots, q_lens, t))
            plain, _ = time_step(
                params, cfg, init_kv_cache(cfg, num_pages, 16), batch, _ITERS.value
            )
            lora, _ = time_step(
                adapted, cfg, init_kv_cache(cfg, num_pages, 16), lora_batch, _ITERS.value
            )
            print(
                f"| {case} | {t} | {plain * 1e3:.2f} | {lora * 1e3:.2f} | {lora / plain:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)
