"""An OpenAI-compatible HTTP server (uvicorn) over the iteration-level engine.

  python -m orca_jax.serve --model=smollm2-135m --port=8000
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
      -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}]}'

Routes: /v1/completions, /v1/chat/completions (both stream with "stream": true),
/v1/responses, /v1/models, /health, /version, /metrics (Prometheus), /tokenize,
/detokenize. Engine and model flags
as in `orca_jax.generate` (see --help).
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from orca_jax import distributed, engine_flags

_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_SERVED_NAME = flags.DEFINE_string(
    "served_model_name", None, "Model name clients ask for (default: --model)."
)
_MAX_LOGPROBS = flags.DEFINE_integer(
    "max_logprobs", 20, "Most top log-probabilities a request may ask."
)
_AUTO_TOOLS = flags.DEFINE_bool(
    "enable_auto_tool_choice",
    False,
    'Serve tool_choice "auto" (the default when tools are sent): read the model\'s own tool '
    "calls out of its text with --tool_call_parser.",
)
_TOOL_PARSER = flags.DEFINE_enum(
    "tool_call_parser",
    None,
    ["hermes", "llama3_json", "pythonic"],
    "The model's tool-call syntax: hermes (<tool_call>{...}</tool_call>: Hermes, Qwen, "
    "SmolLM3...), llama3_json (a JSON object per call: Llama 3.x) or pythonic "
    "([f(a=1)]: Llama 3.2 / 4).",
)
_REASONING = flags.DEFINE_enum(
    "reasoning_parser",
    None,
    ["deepseek_r1", "qwen3"],
    "Return a reasoning model's <think>...</think> as reasoning_content: deepseek_r1 (the "
    "template opens the thinking: DeepSeek-R1 and its Llama/Qwen distillations) or qwen3.",
)
_API_KEY = flags.DEFINE_string(
    "api_key",
    os.environ.get("ORCA_API_KEY"),
    "Serve /v1 only to requests with 'Authorization: Bearer KEY' (default: $ORCA_API_KEY).",
)
_LORA_MODULES = flags.DEFINE_list(
    "lora_modules",
    [],
    "LoRA adapters as name=path (PEFT directories), comma-separated: a request whose model is "
    "`name` runs with that adapter. Implies --enable_lora.",
)
_RUNTIME_LORA = flags.DEFINE_bool(
    "allow_runtime_lora_updating",
    False,
    "Serve /v1/load_lora_adapter and /v1/unload_lora_adapter (they read any path the server "
    "can; vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING). Implies --enable_lora.",
)
_TRUST_TEMPLATES = flags.DEFINE_bool(
    "trust_request_chat_template",
    False,
    "Take a request's own chat_template (sandboxed Jinja, but it can spend server time).",
)


def main(argv: list[str]) -> None:
    del argv
    import uvicorn

    from orca_jax.server import AsyncEngine, build_app, reasoning
    from orca_jax.server.tool_parsers import get_parser

    logging.set_verbosity(logging.INFO)
    if _AUTO_TOOLS.value and _TOOL_PARSER.value is None:
        raise app.UsageError("--enable_auto_tool_choice needs --tool_call_parser")
    loras = lora_modules(_LORA_MODULES.value)
    extra = dict(enable_lora=True) if loras or _RUNTIME_LORA.value else {}
    llm = engine_flags.build_llm(max_logprobs=_MAX_LOGPROBS.value, **extra)
    for lora in loras.values():  # a bad adapter stops the server here, not a request later
        try:
            llm.engine.loras.check(lora)
        except ValueError as e:
            raise app.UsageError(f"--lora_modules {lora.lora_name}: {e}") from e
    if not distributed.is_leader():
        distributed.follow(llm.engine)
        return
    engine = AsyncEngine(llm.engine)
    try:
        app_ = build_app(
            engine,
            _SERVED_NAME.value or engine_flags.model_name(),
            trust_request_chat_template=_TRUST_TEMPLATES.value,
            tool_parser=get_parser(_TOOL_PARSER.value) if _AUTO_TOOLS.value else None,
            reasoning_parser=reasoning.get_parser(_REASONING.value) if _REASONING.value else None,
            api_key=_API_KEY.value,
            lora_modules=loras,
            allow_runtime_lora_updating=_RUNTIME_LORA.value,
        )
        uvicorn.run(app_, host=_HOST.value, port=_PORT.value, log_level="info")
    finally:
        engine.shutdown()
        llm.engine.stop_followers()


def lora_modules(specs: list[str]) -> dict:
    """{name: LoRARequest} from vLLM's `name=path` specs (ids 1, 2, ... in order)."""
    from orca_jax.engine.lora import LoRARequest

    out = {}
    for i, spec in enumerate(specs, 1):
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise app.UsageError(f"--lora_modules takes name=path; got {spec!r}")
        if name in out:
            raise app.UsageError(f"--lora_modules names {name!r} twice")
        out[name] = LoRARequest(name, i, path)
    return out


if __name__ == "__main__":
    app.run(main, flags_parser=engine_flags.parse_flags)
