"""Generate text from the command line, through the iteration-level engine.

  python -m orca_jax.generate --model=smollm2-135m \
      --prompt="What is the capital of France?" --chat --max_tokens=32
  python -m orca_jax.generate --prompts_file=prompts.txt --policy=paged --max_batch_size=32
"""

from __future__ import annotations

from absl import app, flags, logging

from orca_jax import distributed
from orca_jax.llm import LLM
from orca_jax.scheduler import SamplingParams

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Model preset name.")
_WEIGHTS = flags.DEFINE_string(
    "weights", None, "Weights: a .gguf, a Hugging Face directory, or 'random' (uses --seed)."
)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer path (default: the weights').")
_PROMPT = flags.DEFINE_string("prompt", "What is the capital of France?", "Prompt text.")
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file", None, "A file of prompts, one per line, all served by the engine at once."
)
_PROMPT_IDS = flags.DEFINE_list("prompt_token_ids", None, "Prompt as token ids instead of text.")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap each prompt in the model's chat template.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 32, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k cut (0: off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus cut (1: off).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for random weights and for sampling.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Compute dtype.")
_ATTENTION = flags.DEFINE_enum(
    "attention_impl", None, ["auto", "reference", "pallas"], "Attention (auto: per backend)."
)
_POLICY = flags.DEFINE_enum("policy", "orca", ["orca", "paged", "static"], "Scheduling policy.")
_MAX_BATCH = flags.DEFINE_integer("max_batch_size", 16, "Requests per iteration.")
_BLOCK_SIZE = flags.DEFINE_integer("block_size", 16, "Tokens per KV block.")
_NUM_BLOCKS = flags.DEFINE_integer("num_kv_blocks", None, "KV blocks (block 0 is reserved).")
_KV_MEMORY = flags.DEFINE_integer("kv_cache_memory", 256 * 2**20, "KV bytes if no block count.")
_N_WORKERS = flags.DEFINE_integer("n_workers", 1, "Batches in flight (orca policy).")
_TP = flags.DEFINE_integer("tensor_parallel_size", 1, "Devices splitting heads and FFN.")
_PP = flags.DEFINE_integer("pipeline_parallel_size", 1, "Pipeline stages (layer groups).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, to run over several processes."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index (0 schedules).")
_MAX_LEN = flags.DEFINE_integer("max_model_len", 2048, "Longest prompt + output.")
_MAX_TOKENS_STEP = flags.DEFINE_integer("max_num_batched_tokens", 512, "Tokens per iteration.")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    if _COORDINATOR.value:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    llm = LLM(
        _MODEL.value,
        weights=_WEIGHTS.value,
        tokenizer=_TOKENIZER.value,
        seed=_SEED.value,
        dtype=_DTYPE.value,
        attention_impl=_ATTENTION.value,
        policy=_POLICY.value,
        max_batch_size=_MAX_BATCH.value,
        block_size=_BLOCK_SIZE.value,
        num_kv_blocks=_NUM_BLOCKS.value,
        kv_cache_memory=_KV_MEMORY.value,
        n_workers=_N_WORKERS.value,
        tensor_parallel_size=_TP.value,
        pipeline_parallel_size=_PP.value,
        max_model_len=_MAX_LEN.value,
        max_num_batched_tokens=_MAX_TOKENS_STEP.value,
        warmup=False,  # a one-shot run compiles only the shapes it meets
    )
    if not distributed.is_leader():
        distributed.follow(llm.engine)  # run the leader's steps until it stops
        return
    try:
        _generate(llm)
    finally:
        llm.engine.stop_followers()


def _generate(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    if _PROMPT_IDS.value:
        prompts = [[int(t) for t in _PROMPT_IDS.value]]
    else:
        if tok is None:
            raise app.UsageError(
                f"{_MODEL.value} has no tokenizer at hand: pass --tokenizer or --prompt_token_ids"
            )
        if _PROMPTS_FILE.value:
            with open(_PROMPTS_FILE.value, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        else:
            prompts = [_PROMPT.value]
        if _CHAT.value:
            prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    params = SamplingParams(
        max_tokens=_MAX_TOKENS.value,
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
        seed=_SEED.value if _TEMPERATURE.value > 0 else None,
    )
    outputs = llm.generate(prompts, params)
    for out in outputs:
        text = out.outputs[0].text if tok is not None else " ".join(map(str, out.token_ids))
        print(text if len(outputs) == 1 else f"[{out.request_id}] {text!r}")


if __name__ == "__main__":
    app.run(main)
