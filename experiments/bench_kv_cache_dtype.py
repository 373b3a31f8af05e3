"""What an fp8 KV cache buys and costs, side by side with the model's own dtype, real weights.

  PYTHONPATH=. python experiments/bench_kv_cache_dtype.py      # SmolLM2-135M, CPU, ~2 minutes

For each setup (a model dtype and a kv_cache_dtype; the first is the baseline): the cache's
bytes per token and the tokens a fixed cache budget holds (capacity); the model's perplexity
on a fixed English text scored through prompt logprobs (quality, the way KV-cache
quantization is usually judged); greedy chat answers against the baseline's (how many tokens
agree before the first difference, how many answers are identical); and the time of that
greedy run (the second of two, so compiles are not timed; on a CPU this shows that the fp8
write and read cost nothing extra, on a GPU the halved K/V read is the point).
"""

from __future__ import annotations

import math
import os
import time

from absl import app, flags

from orca_jax import LLM, SamplingParams

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Model (its own weights).")
_SETUPS = flags.DEFINE_list(
    "setups",
    ["auto", "fp8", "fp8_e5m2", "bfloat16:auto", "bfloat16:fp8"],
    "[model dtype:]kv_cache_dtype, the first being the baseline (default dtype: float32).",
)
_BUDGET = flags.DEFINE_integer("kv_cache_memory", 256 * 2**20, "Cache bytes for capacity.")
_CHUNK = flags.DEFINE_integer("chunk", 256, "Tokens per scored chunk.")
_CHUNKS = flags.DEFINE_integer("chunks", 8, "Chunks scored (perplexity).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 48, "Greedy tokens per chat answer.")
_OUT = flags.DEFINE_string("out", None, "Write the table to this file too.")

QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "Give three tips for learning a new language.",
    "Explain what a transformer model is in two sentences.",
    "Write a haiku about the sea.",
    "What makes a good cup of coffee?",
    "List three prime numbers.",
    "How does a bicycle stay upright?",
]


def scoring_text() -> str:
    """English prose at hand on every machine: this repository's own documentation."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parts = []
    for name in ("docs/ARCHITECTURE.md", "README.md"):
        with open(os.path.join(root, name)) as f:
            parts.append(f.read())
    return "\n\n".join(parts)


def perplexity(llm: LLM, chunks: list[list[int]]) -> float:
    """exp(mean negative log-likelihood) of every token after each chunk's first."""
    score = SamplingParams(max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": c} for c in chunks], score, use_tqdm=False)
    nll, n = 0.0, 0
    for chunk, out in zip(chunks, outs, strict=True):
        for tok, entry in zip(chunk[1:], out.prompt_logprobs[1:], strict=True):
            nll -= entry[tok].logprob
            n += 1
    return math.exp(nll / n)


def greedy(llm: LLM) -> tuple[list[list[int]], float]:
    """The chat answers' tokens (second run) and that run's seconds."""
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    params = SamplingParams(max_tokens=_MAX_TOKENS.value, temperature=0.0)
    llm.chat(conversations, params, use_tqdm=False)  # compiles every bucket it meets
    t0 = time.perf_counter()
    outs = llm.chat(conversations, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], time.perf_counter() - t0


def agreement(base: list[list[int]], other: list[list[int]]) -> tuple[float, int]:
    """Mean tokens equal before the first difference, and how many answers are identical."""
    firsts = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        for a, b in zip(base, other, strict=True)
    ]
    return sum(firsts) / len(firsts), sum(a == b for a, b in zip(base, other, strict=True))


def main(argv):
    del argv
    lines = [
        f"{_MODEL.value}, own weights; perplexity over {_CHUNKS.value} x {_CHUNK.value} tokens "
        f"of this repository's docs; {len(QUESTIONS)} greedy chat answers of up to "
        f"{_MAX_TOKENS.value} tokens; capacity in a {_BUDGET.value / 2**20:.0f} MiB cache.",
        "",
        "Greedy answers are compared with the first row's (which, against itself, shows the "
        "mean answer length).",
        "",
        "| dtype | kv_cache_dtype | bytes/token | tokens in budget | perplexity | tokens "
        "agreeing before 1st difference (mean) | identical answers | greedy run (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = None
    for setup in _SETUPS.value:
        dtype, _, kv = setup.rpartition(":")
        llm = LLM(
            _MODEL.value,
            dtype=dtype or "float32",
            kv_cache_dtype=kv,
            policy="paged",
            max_batch_size=len(QUESTIONS),
            max_model_len=512,
            max_logprobs=0,
            kv_cache_memory=_BUDGET.value,
        )
        config = llm.engine.model_config
        tok = llm.get_tokenizer()
        ids = tok.encode(scoring_text())
        n = _CHUNK.value
        chunks = [ids[i * n : (i + 1) * n] for i in range(_CHUNKS.value)]
        if len(chunks[-1]) < n:
            raise SystemExit(f"the scoring text has only {len(ids)} tokens")
        ppl = perplexity(llm, chunks)
        answers, seconds = greedy(llm)
        base = base or answers
        first, same = agreement(base, answers)
        per_token = config.kv_bytes_per_token()
        lines.append(
            f"| {config.dtype} | {kv} ({config.cache_dtype}) | {per_token:,} | "
            f"{_BUDGET.value // per_token:,} | {ppl:.3f} | {first:.1f} | "
            f"{same}/{len(QUESTIONS)} | {seconds:.2f} |"
        )
        print(lines[-1], flush=True)
        del llm
    table = "\n".join(lines) + "\n"
    print(table)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            f.write(table)


if __name__ == "__main__":
    app.run(main)
