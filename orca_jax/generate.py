"""Generate text from the command line.

  python -m orca_jax.generate --model=smollm2-135m \
      --prompt="What is the capital of France?" --chat --max_tokens=32
"""

from __future__ import annotations

from absl import app, flags

from orca_jax.model_loader import load_model
from orca_jax.runner import ModelRunner, RunnerConfig
from orca_jax.simple_loop import greedy_generate

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Model preset name.")
_WEIGHTS = flags.DEFINE_string(
    "weights", None, "Weights: a .gguf, a Hugging Face directory, or 'random' (uses --seed)."
)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer path (default: the weights').")
_PROMPT = flags.DEFINE_string("prompt", "What is the capital of France?", "Prompt text.")
_PROMPT_IDS = flags.DEFINE_list("prompt_token_ids", None, "Prompt as token ids instead of text.")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap the prompt in the model's chat template.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 32, "Tokens to generate at most.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for random weights.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Compute dtype.")
_ATTENTION = flags.DEFINE_enum("attention_impl", None, ["reference", "pallas"], "Attention.")
_PAGE_SIZE = flags.DEFINE_integer("block_size", 16, "Tokens per KV page.")
_NUM_PAGES = flags.DEFINE_integer("num_kv_blocks", 256, "KV pages (page 0 is reserved).")


def main(argv: list[str]) -> None:
    del argv
    loaded = load_model(
        _MODEL.value,
        weights=_WEIGHTS.value,
        tokenizer=_TOKENIZER.value,
        seed=_SEED.value,
        dtype=_DTYPE.value,
        attention_impl=_ATTENTION.value,
    )
    tok = loaded.tokenizer
    if _PROMPT_IDS.value:
        prompt_ids = [int(t) for t in _PROMPT_IDS.value]
    else:
        if tok is None:
            raise app.UsageError(
                f"{_MODEL.value} has no tokenizer at hand: pass --tokenizer or --prompt_token_ids"
            )
        text = _PROMPT.value
        if _CHAT.value:
            text = tok.apply_chat_template([{"role": "user", "content": text}])
        prompt_ids = tok.encode(text)
    max_model_len = min(loaded.config.max_seq_len, 2048)
    runner = ModelRunner(
        loaded.config,
        loaded.params,
        RunnerConfig(
            num_pages=_NUM_PAGES.value,
            page_size=_PAGE_SIZE.value,
            max_num_tokens=max(16, 1 << (len(prompt_ids) - 1).bit_length()),
            max_num_reqs=1,
            max_model_len=max_model_len,
        ),
    )
    eos = tok.eos_token_id if tok is not None else None
    [out] = greedy_generate(runner, [prompt_ids], _MAX_TOKENS.value, eos_token_id=eos)
    print(tok.decode(out) if tok is not None else " ".join(map(str, out)))


if __name__ == "__main__":
    app.run(main)
