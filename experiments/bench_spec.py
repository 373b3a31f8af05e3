"""Speculative decoding by n-gram lookup against plain decoding, side by side, real weights.

  PYTHONPATH=. python experiments/bench_spec.py            # SmolLM2-135M, CPU, a few minutes

Two workloads, greedy. `copy` (vLLM's case for the `ngram` method): each request asks the
chat model to repeat a passage (one of four). `free`: open questions, whose answers seldom
repeat earlier text, to show what drafts cost when they rarely help. For each batch size, one
engine runs
it without drafts and one with k drafts per step; each engine serves the workload twice and
the second pass is timed (so no compile is timed). Reports output tokens/s, iterations, the
drafts' acceptance, and whether every request's tokens equal plain decoding's (they must).
"""

from __future__ import annotations

import itertools
import time

from absl import app, flags

from orca_jax import Engine, EngineConfig, SamplingParams
from orca_jax.engine.speculative import SpeculativeConfig
from orca_jax.model_loader import load_model
from orca_jax.utils.compilation import count_compiles

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Model (its own weights).")
_BATCHES = flags.DEFINE_list("num_reqs", ["1", "8"], "Requests served together.")
_KS = flags.DEFINE_list("k", ["3", "5"], "Drafts per request and step.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 96, "Tokens generated per request.")
_LOOKUP_MIN = flags.DEFINE_integer("prompt_lookup_min", 1, "Shortest n-gram looked up.")
_WITHIN = flags.DEFINE_enum(
    "within_bucket", "auto", ["auto", "true", "false"], "SpeculativeConfig.within_bucket."
)
_WORKLOADS = flags.DEFINE_list("workloads", ["copy", "free"], "copy and/or free.")
_OUT = flags.DEFINE_string("out", None, "Write the table to this file too.")

PASSAGES = [
    "The iteration-level scheduler runs the model one iteration at a time over the requests "
    "that are active, so a finished request returns at once and a new one joins at the next "
    "iteration.",
    "Selective batching applies batching only to the position-wise operations, such as the "
    "linear layers and layer normalization, and runs attention separately for each request.",
    "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n\n\n"
    "def sub(a, b):\n    return a - b\n",
    "Paris is the capital of France. Berlin is the capital of Germany. Madrid is the capital "
    "of Spain. Rome is the capital of Italy.",
]

QUESTIONS = [
    "Write a short story about a lighthouse keeper.",
    "Why is the sky blue?",
    "Give three tips for learning a new language.",
    "What makes a good cup of coffee?",
]


def user_messages(workload: str, n: int) -> list[str]:
    if workload == "copy":
        return ["Repeat this text exactly:\n\n" + PASSAGES[i % 4] for i in range(n)]
    return [QUESTIONS[i % 4] for i in range(n)]


def serve(engine: Engine, prompts: list[str], params: SamplingParams):
    """(seconds, iterations, tokens per request) for serving every prompt to completion."""
    iters, drafts, accepted = (
        engine.num_iterations,
        engine.num_draft_tokens,
        engine.num_accepted_tokens,
    )
    t0 = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    seconds = time.perf_counter() - t0
    stats = (engine.num_draft_tokens - drafts, engine.num_accepted_tokens - accepted)
    return seconds, engine.num_iterations - iters, [done[i] for i in ids], stats


def main(argv):
    del argv
    loaded = load_model(_MODEL.value)
    tok = loaded.tokenizer
    params = SamplingParams(max_tokens=_MAX_TOKENS.value, ignore_eos=False)
    rows = [
        f"{loaded.config.name} (its own weights), greedy, max_tokens={_MAX_TOKENS.value}, "
        f"prompt_lookup_min={_LOOKUP_MIN.value}, within_bucket={_WITHIN.value}; "
        "second pass of each engine timed",
        "",
        "| workload | requests | drafts k | s | iterations | output tok/s | speed-up |"
        " accepted / drafts | same tokens | compiles timed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for workload, n in itertools.product(_WORKLOADS.value, map(int, _BATCHES.value)):
        prompts = [
            tok.apply_chat_template([{"role": "user", "content": text}])
            for text in user_messages(workload, n)
        ]
        plain = None
        for k in [0, *map(int, _KS.value)]:
            config = EngineConfig(
                max_batch_size=n,
                max_model_len=512,
                max_num_batched_tokens=512,
                num_kv_blocks=n * 32 + 1,
                speculative=SpeculativeConfig(
                    num_speculative_tokens=k,
                    prompt_lookup_min=_LOOKUP_MIN.value,
                    prompt_lookup_max=max(4, _LOOKUP_MIN.value),
                    within_bucket={"auto": None, "true": True, "false": False}[_WITHIN.value],
                )
                if k
                else None,
                warmup=False,
            )
            engine = Engine(loaded.config, loaded.params, tok, config)
            serve(engine, prompts, params)  # compiles what it meets
            with count_compiles() as counts:
                seconds, iters, tokens, (drafts, accepted) = serve(engine, prompts, params)
            total = sum(map(len, tokens))
            if plain is None:
                plain = (tokens, total / seconds)
            rate = f"{accepted} / {drafts} ({accepted / drafts:.0%})" if drafts else "-"
            rows.append(
                f"| {workload} | {n} | {k or '-'} | {seconds:.2f} | {iters} | "
                f"{total / seconds:.1f} | {total / seconds / plain[1]:.2f}x | {rate} | "
                f"{'yes' if tokens == plain[0] else 'NO'} | {counts.compiles} |"
            )
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    print("\n" + table)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    app.run(main)
