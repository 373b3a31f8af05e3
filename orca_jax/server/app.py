"""The FastAPI app: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus
/health, Prometheus' /metrics (`metrics.py`) and vLLM's /tokenize and /detokenize.

Errors come back in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with
status 400 for requests we cannot serve (validation, unsupported options, prompts too long
for the cache) and 404 for an unknown model. Streams are server-sent events ending with
`data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

import orca_jax
from orca_jax.beam_search import BeamSearch
from orca_jax.engine.lora import LoRARequest
from orca_jax.engine.outputs import CompletionOutput, RequestOutput
from orca_jax.server import responses, responses_api
from orca_jax.server.async_engine import AsyncEngine
from orca_jax.server.lora_routes import add_lora_routes
from orca_jax.server.metrics import ServerMetrics
from orca_jax.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    StreamOptions,
    TokenizeRequest,
)
from orca_jax.server.reasoning import ReasoningParser, ReasoningStream
from orca_jax.server.responses_api import ResponsesRequest
from orca_jax.server.tool_parsers import ToolParser
from orca_jax.server.tool_stream import ToolCallStream


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=status)


def build_app(
    engine: AsyncEngine,
    model_name: str,
    *,
    trust_request_chat_template: bool = False,
    tool_parser: ToolParser | None = None,
    reasoning_parser: ReasoningParser | None = None,
    api_key: str | None = None,
    lora_modules: dict[str, LoRARequest] | None = None,
    allow_runtime_lora_updating: bool = False,
) -> FastAPI:
    """The server's routes over `engine` (already running), serving `model_name`.

    `trust_request_chat_template`: take a request's own `chat_template` (a Jinja template
    runs sandboxed, yet can still spend the server's time); refused by default, as vLLM
    does. `tool_parser`: reads the model's own tool calls, for `tool_choice: "auto"`
    (`tool_parsers.py`); without it "auto" is refused. `reasoning_parser`: a reasoning
    model's thinking goes to `reasoning_content` (`reasoning.py`). `api_key`: the `/v1`
    routes answer only requests bearing it (`Authorization: Bearer KEY`), as vLLM's
    `--api-key`. `lora_modules`: LoRA adapters by the model name a request gives to use
    one (vLLM's `--lora-modules`), listed by /v1/models; `allow_runtime_lora_updating` adds
    the routes that load and unload them while the server runs (`lora_routes.py`)."""
    lora_modules = dict(lora_modules or {})
    app = FastAPI(title="orca-jax", description="Iteration-level scheduling on JAX")
    tokenizer = engine.engine.tokenizer
    max_model_len = engine.engine.scheduler.config.max_model_len
    metrics = ServerMetrics(engine.engine, model_name)
    engine.observers.append(metrics.observe)

    if api_key is not None:

        @app.middleware("http")
        async def _authorized(request: Request, call_next):
            bearer = request.headers.get("authorization", "")
            if request.url.path.startswith("/v1") and bearer != f"Bearer {api_key}":
                return error(401, "a valid API key is needed (Authorization: Bearer KEY)")
            return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error(
            400, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        )

    def check(req) -> JSONResponse | None:
        if req.model is not None and req.model != model_name and req.model not in lora_modules:
            names = ", ".join(map(repr, [model_name, *lora_modules]))
            return error(
                404,
                f"model {req.model!r} does not exist; this server has {names}",
                "not_found_error",
            )
        why = req.unsupported()
        return error(400, why) if why else None

    if allow_runtime_lora_updating:
        add_lora_routes(app, engine, model_name, lora_modules, error)

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.error is not None:
            return error(500, f"engine loop failed: {engine.error!r}", "internal_error")
        return JSONResponse({})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": orca_jax.__version__})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(responses.model_list(model_name, max_model_len, lora_modules))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if (bad := check(req)) is not None:
            return bad
        prompts = req.prompts()
        if any(isinstance(p, str) for p in prompts) and tokenizer is None:
            return error(400, "this model has no tokenizer: send token ids as the prompt")
        try:
            params = req.sampling_params(req.max_tokens, req.logprobs)
        except ValueError as e:
            return error(400, str(e))
        return await _serve(
            prompts,
            params,
            req,
            "cmpl",
            responses.completion_chunk,
            responses.completion,
            echo=req.echo,
        )

    def chat_prompt(messages, options: dict, tools=None) -> list[int] | JSONResponse:
        """The chat's token ids, as the model's template (or the request's, `options`)
        renders it, or the error."""
        if options.get("chat_template") is not None and not trust_request_chat_template:
            return error(
                400,
                "this server does not take chat templates from requests (start it with "
                "--trust_request_chat_template)",
            )
        if tokenizer is None or (tokenizer.chat_template is None and not options["chat_template"]):
            return error(400, "this model has no chat template")
        try:
            text = tokenizer.apply_chat_template(
                [m.as_template_message() for m in messages], tools=tools, **options
            )
        except Exception as e:  # noqa: BLE001 -- a template's raise_exception, bad content parts
            return error(400, f"chat template: {e}")
        return tokenizer.encode(text, add_special_tokens=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest):
        return await _chat(req, "chatcmpl", responses.chat_chunk, responses.chat)

    @app.post("/v1/responses")
    async def create_response(req: ResponsesRequest):
        if (why := req.unsupported()) is not None:
            return error(400, why)
        try:
            chat_req = req.to_chat()
        except ValueError as e:  # pydantic's ValidationError too
            return error(400, str(e))
        return await _chat(
            chat_req,
            "resp",
            responses_api.events,
            responses_api.response,
            request=req,
            items=responses_api.ItemStream(),  # what its stream has opened
        )

    async def _chat(req: ChatCompletionRequest, prefix, chunk_fn, final_fn, **extra):
        """A chat request (or a Responses one, as a chat) rendered, checked and served."""
        req.use_tool_parser(tool_parser)
        if (bad := check(req)) is not None:
            return bad
        prompt = chat_prompt(req.messages, req.template_options(), req.template_tools())
        if isinstance(prompt, JSONResponse):
            return prompt
        max_tokens = (
            req.max_completion_tokens or req.max_tokens or max(1, max_model_len - len(prompt))
        )
        try:
            params = req.sampling_params(max_tokens, req.num_logprobs())
        except ValueError as e:
            return error(400, str(e))
        return await _serve(
            [prompt],
            params,
            req,
            prefix,
            chunk_fn,
            final_fn,
            tools=req.tool_calling(),
            # A constrained output (a schema, forced tool calls) is all answer: the model
            # had no room to think.
            reasoning=reasoning_parser if params.structured_outputs is None else None,
            **extra,
        )

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        if (bad := check(req)) is not None:
            return bad
        if req.messages is not None:
            tokens = chat_prompt(req.messages, req.template_options())
            if isinstance(tokens, JSONResponse):
                return tokens
        elif tokenizer is None:
            return error(400, "this model has no tokenizer")
        else:
            tokens = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return JSONResponse(
            {"tokens": tokens, "count": len(tokens), "max_model_len": max_model_len}
        )

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        if (bad := check(req)) is not None:
            return bad
        if tokenizer is None:
            return error(400, "this model has no tokenizer")
        vocab = engine.engine.model_config.vocab_size
        if bad_ids := [t for t in req.tokens if not 0 <= t < vocab]:
            return error(400, f"token ids {bad_ids[:5]} outside the vocabulary [0, {vocab})")
        return JSONResponse({"prompt": tokenizer.decode(req.tokens)})

    async def _serve(prompts, params, req, prefix, chunk_fn, final_fn, **extra):
        """Queue n completions of every prompt (all or none), then stream or collect them.

        Choice i * n + j is completion j of prompt i, as OpenAI numbers them.
        """
        if req.use_beam_search:
            return await _beams(prompts, params, req, prefix, final_fn, **extra)
        rid = f"{prefix}-{uuid.uuid4().hex}"
        created = int(time.time())
        lora = lora_modules.get(req.model)  # None: the base model
        streams = []
        try:
            for prompt in prompts:
                for j, one in enumerate(params.completions()):  # j samples from seed + j
                    # The prompt is scored once, by j = 0, and shared; but a stream echoes
                    # every completion's scored prompt in its first chunk, when j = 0 may
                    # not have it yet: there each completion scores it.
                    if j and not (extra.get("echo") and req.stream):
                        one = dataclasses.replace(one, prompt_logprobs=None)
                    rid_j = f"{rid}-{len(streams)}"
                    streams.append(await engine.add(prompt, one, rid_j, req.priority, lora))
        except ValueError as e:
            for i in range(len(streams)):
                engine.abort(f"{rid}-{i}")
            return error(400, str(e))
        meta = dict(
            id=rid,
            created=created,
            model=model_name if lora is None else req.model,
            tokenizer=tokenizer,
            top_n=params.logprobs or 0,
            n=params.n,
            **extra,  # completions: echo; chat: tools
        )
        if req.stream:
            options = req.stream_options or StreamOptions()
            return StreamingResponse(
                _sse(streams, chunk_fn, meta, options), media_type="text/event-stream"
            )
        finals = await asyncio.gather(*(_last(s) for s in streams))
        return JSONResponse(final_fn(finals, **meta))

    async def _beams(prompts, params, req, prefix, final_fn, **extra):
        """vLLM's `use_beam_search`: the n best beams of each prompt as its n choices, run
        step by step on the engine (`BeamSearch`: one request per live beam per step)."""
        try:
            beam_params = req.beam_search_params(params)
            beam_params.check(engine.engine.config.max_logprobs)
            ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        except ValueError as e:
            return error(400, str(e))
        rid = f"{prefix}-{uuid.uuid4().hex}"
        lora = lora_modules.get(req.model)  # None: the base model
        search = BeamSearch(ids, beam_params, tokenizer.eos_token_id if tokenizer else None)
        step = 0
        while beams := search.pending():
            streams = []
            try:
                for i, tokens in enumerate(beams):
                    rid_i = f"{rid}-{step}-{i}"
                    streams.append(await engine.add(tokens, search.step_params, rid_i, 0, lora))
            except ValueError as e:
                for i in range(len(streams)):
                    engine.abort(f"{rid}-{step}-{i}")
                return error(400, str(e))
            search.advance(await asyncio.gather(*(_last(s) for s in streams)))
            step += 1
        outs = [
            RequestOutput(
                rid,
                prompt if isinstance(prompt, str) else None,
                tokens,
                [CompletionOutput(0, b.text or "", b.tokens[len(tokens) :], b.finish_reason)],
                finished=True,
            )
            for prompt, tokens, result in zip(prompts, ids, search.results(tokenizer), strict=True)
            for b in result.sequences
        ]
        model = model_name if lora is None else req.model
        meta = dict(id=rid, created=int(time.time()), model=model, tokenizer=tokenizer)
        return JSONResponse(final_fn(outs, **meta, top_n=0, n=params.n, **extra))

    return app


async def _last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    return last


async def _merge(streams: list[AsyncIterator[RequestOutput]]):
    """(index, snapshot) pairs from all streams as they come."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for out in stream:
                await queue.put((i, out))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, out = await queue.get()
            if out is None:
                live -= 1
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:  # let each stream's finally run (it aborts an unfinished request)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


async def _sse(streams, chunk_fn, meta, options: StreamOptions):
    finals: dict[int, RequestOutput] = {}
    first = [True] * len(streams)
    tools, reasoning = meta.get("tools"), meta.get("reasoning")  # chat: per choice
    own = [
        ({"tool_stream": ToolCallStream(tools)} if tools else {})
        | ({"reasoning_stream": ReasoningStream(reasoning)} if reasoning else {})
        for _ in streams
    ]
    numbered = 0  # Responses events carry their place in the stream
    async for i, out in _merge(streams):
        chunk = chunk_fn(i, out, first[i], **meta, **own[i])
        first[i] = False
        if isinstance(chunk, list):  # Responses events
            for event in chunk:
                event["sequence_number"], numbered = numbered, numbered + 1
                yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
            continue
        if chunk is not None:
            if options.continuous_usage_stats:
                chunk["usage"] = responses.running_usage(out)
            yield f"data: {json.dumps(chunk)}\n\n"
        if out.finished:
            finals[i] = out
    if options.include_usage:
        usage = responses.usage_chunk([finals[i] for i in sorted(finals)], chunk_fn, **meta)
        yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"
