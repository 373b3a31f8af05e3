"""An OpenAI-compatible HTTP server (uvicorn) over the iteration-level engine.

  python -m orca_jax.serve --model=smollm2-135m --port=8000
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
      -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}]}'

Routes: /v1/completions, /v1/chat/completions (both stream with "stream": true),
/v1/models, /health, /metrics (Prometheus), /tokenize, /detokenize. Engine and model flags
as in `orca_jax.generate` (see --help).
"""

from __future__ import annotations

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
_TRUST_TEMPLATES = flags.DEFINE_bool(
    "trust_request_chat_template",
    False,
    "Take a request's own chat_template (sandboxed Jinja, but it can spend server time).",
)


def main(argv: list[str]) -> None:
    del argv
    import uvicorn

    from orca_jax.server import AsyncEngine, build_app

    logging.set_verbosity(logging.INFO)
    llm = engine_flags.build_llm(max_logprobs=_MAX_LOGPROBS.value)
    if not distributed.is_leader():
        distributed.follow(llm.engine)
        return
    engine = AsyncEngine(llm.engine)
    try:
        app_ = build_app(
            engine,
            _SERVED_NAME.value or engine_flags.model_name(),
            trust_request_chat_template=_TRUST_TEMPLATES.value,
        )
        uvicorn.run(app_, host=_HOST.value, port=_PORT.value, log_level="info")
    finally:
        engine.shutdown()
        llm.engine.stop_followers()


if __name__ == "__main__":
    app.run(main)
