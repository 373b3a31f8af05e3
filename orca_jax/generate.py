"""Generate text from the command line, through the iteration-level engine.

  python -m orca_jax.generate --model=smollm2-135m \
      --prompt="What is the capital of France?" --chat --max_tokens=32
  python -m orca_jax.generate --prompts_file=prompts.txt --policy=paged --max_batch_size=32
  python -m orca_jax.generate --prompt="The capital of France is" --beam_width=4
"""

from __future__ import annotations

from absl import app, flags, logging

from orca_jax import distributed, engine_flags
from orca_jax.beam_search import BeamSearchParams
from orca_jax.engine.lora import LoRARequest
from orca_jax.llm import LLM
from orca_jax.scheduler import SamplingParams

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
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p x the top one's probability.")
_BEAM = flags.DEFINE_integer(
    "beam_width", None, "Beam search of this width (vLLM's LLM.beam_search): the best beams."
)
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 1.0, "Beam scores: cum / len^this.")
_LORA_PATH = flags.DEFINE_string(
    "lora_path", None, "A LoRA adapter (PEFT directory) to generate with; implies --enable_lora."
)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    beam = {"max_logprobs": 2 * _BEAM.value} if _BEAM.value else {}  # 2w candidates a step
    lora = {"enable_lora": True} if _LORA_PATH.value else {}
    llm = engine_flags.build_llm(warmup=False, **beam, **lora)  # compiles only what it meets
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
                f"{engine_flags.model_name()} has no tokenizer at hand: pass --tokenizer or "
                "--prompt_token_ids"
            )
        if _PROMPTS_FILE.value:
            with open(_PROMPTS_FILE.value, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        else:
            prompts = [_PROMPT.value]
    params = SamplingParams(
        max_tokens=_MAX_TOKENS.value,
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
        min_p=_MIN_P.value,
        seed=engine_flags.SEED.value if _TEMPERATURE.value > 0 else None,
    )
    if _CHAT.value and not _PROMPT_IDS.value and _BEAM.value:  # rendered, then searched
        _, prompts = llm.render_chat([[{"role": "user", "content": p}] for p in prompts])
    lora = LoRARequest("cli", 1, _LORA_PATH.value) if _LORA_PATH.value else None
    if _BEAM.value:
        _beam_search(llm, prompts, lora)
        return
    if _CHAT.value and not _PROMPT_IDS.value:  # each prompt as one user turn
        chats = [[{"role": "user", "content": p}] for p in prompts]
        outputs = llm.chat(chats, params, lora_request=lora)
    else:
        outputs = llm.generate(prompts, params, lora_request=lora)
    for out in outputs:
        text = out.outputs[0].text if tok is not None else " ".join(map(str, out.token_ids))
        print(text if len(outputs) == 1 else f"[{out.request_id}] {text!r}")


def _beam_search(llm: LLM, prompts: list, lora: LoRARequest | None) -> None:
    params = BeamSearchParams(
        beam_width=_BEAM.value,
        max_tokens=_MAX_TOKENS.value,
        temperature=_TEMPERATURE.value,
        length_penalty=_LENGTH_PENALTY.value,
    )
    for i, result in enumerate(llm.beam_search(prompts, params, lora_request=lora)):
        for beam in result.sequences:
            text = beam.text if beam.text is not None else " ".join(map(str, beam.tokens))
            print(f"[{i}] {beam.cum_logprob:8.3f} {text!r}")


if __name__ == "__main__":
    app.run(main, flags_parser=engine_flags.parse_flags)
