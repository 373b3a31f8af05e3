"""What the sampling extras cost an engine iteration, side by side with plain requests.

  python experiments/bench_sampling_extras.py                     # SmolLM2 widths, 2 layers
  python experiments/bench_sampling_extras.py --layers=30 --dtype=bfloat16   # a GPU

Same engine settings, same prompts, same number of iterations for every row (outputs are
forced to one length: `ignore_eos`, or a regex that cannot end sooner); each row is the
second of two passes of its own engine (the first compiles), timed end to end.
- prompt scoring (`prompt_logprobs`): the LM head over every prompt token;
- logit processing (`logit_bias`, `bad_words`): the processed sampler shape;
- structured outputs (a regex): the automaton's bitmask, built on the host per step and
  applied on the device.
Random weights of SmolLM2's shapes with its real tokenizer (49152-token vocabulary).
"""

from __future__ import annotations

import dataclasses
import time

from absl import app, flags

from models import RandomWeights, get_config
from models.loaders.gguf_llama import default_model_path
from orca_jax import Engine, EngineConfig, SamplingParams, StructuredOutputs
from orca_jax.tokenizer import Tokenizer

_LAYERS = flags.DEFINE_integer("layers", 2, "Layers of the SmolLM2-shaped model.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Parameter / cache dtype.")
_REQS = flags.DEFINE_integer("num_reqs", 16, "Requests per run (all in one batch).")
_PROMPT = flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per request.")
_OUTPUT = flags.DEFINE_integer("output_len", 24, "Generated tokens per request.")


def run(engine: Engine, prompts, params: SamplingParams) -> tuple[float, int, int]:
    """Seconds, iterations and generated tokens of serving every prompt once."""
    start_iters = engine.num_iterations
    t0 = time.perf_counter()
    for p in prompts:
        engine.add_request(p, params)
    tokens = 0
    while engine.has_unfinished_requests():
        tokens += sum(len(o.token_ids) for o in engine.step() if o.finished)
    return time.perf_counter() - t0, engine.num_iterations - start_iters, tokens


def main(_) -> None:
    cfg = get_config("smollm2-135m", n_layers=_LAYERS.value, dtype=_DTYPE.value)
    tok = Tokenizer.from_gguf(default_model_path())
    n, out = _REQS.value, _OUTPUT.value
    config = EngineConfig(
        max_batch_size=n,
        num_kv_blocks=n * -(-(_PROMPT.value + out) // 16) + 1,
        max_model_len=_PROMPT.value + out,
        max_num_batched_tokens=n * _PROMPT.value,
        max_logprobs=5,
        warmup=False,
    )
    text = "The quick brown fox jumps over the lazy dog. " * _PROMPT.value
    base = tok.encode(text)[: _PROMPT.value]
    prompts = [[(t + i) % cfg.vocab_size for t in base] for i in range(n)]
    plain = SamplingParams(max_tokens=out, ignore_eos=True)
    regex = StructuredOutputs(regex=f"([a-z]+ ){{{out},}}")  # longer than out tokens
    rows = [
        ("plain", plain),
        ("prompt_logprobs=0", dataclasses.replace(plain, prompt_logprobs=0)),
        ("prompt_logprobs=5", dataclasses.replace(plain, prompt_logprobs=5)),
        ("logit_bias (8 ids)", dataclasses.replace(plain, logit_bias={i: -1.0 for i in range(8)})),
        ("bad_words (4 words)", dataclasses.replace(plain, bad_words=("fox", "dog", "a", "the"))),
        ("structured (regex)", SamplingParams(max_tokens=out, structured_outputs=regex)),
    ]
    print(
        f"SmolLM2 shapes, {_LAYERS.value} layers, {_DTYPE.value}; {n} requests x "
        f"({_PROMPT.value} prompt + {out} output) tokens, one batch; second pass timed\n"
    )
    print("| requests | s | iterations | ms/iteration | vs plain |")
    print("|---|---|---|---|---|")
    plain_s = None
    for name, params in rows:
        engine = Engine(cfg, RandomWeights(0), tok, config)
        run(engine, prompts, params)  # compiles
        s, iters, tokens = run(engine, prompts, params)
        assert tokens == n * out, (name, tokens)
        plain_s = plain_s or s
        print(f"| {name} | {s:.3f} | {iters} | {1e3 * s / iters:.2f} | {s / plain_s:.2f}x |")


if __name__ == "__main__":
    app.run(main)
