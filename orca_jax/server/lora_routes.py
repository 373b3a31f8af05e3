"""Adding and removing LoRA adapters while the server runs (vLLM's runtime LoRA updating).

  POST /v1/load_lora_adapter    {"lora_name": "sql", "lora_path": "/adapters/sql"}
  POST /v1/unload_lora_adapter  {"lora_name": "sql"}

Registered only when the server allows it (`--allow_runtime_lora_updating`, as vLLM guards
them with VLLM_ALLOW_RUNTIME_LORA_UPDATING): they read any path the server can. A new
adapter is read and checked in a worker thread before its name is served, so a bad one is a
400 and changes nothing; requests already running with a removed adapter finish with it.
"""

from __future__ import annotations

import asyncio
import itertools

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel

from orca_jax.engine.lora import LoRARequest, load_adapter


class LoadLoRARequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoRARequest(BaseModel):
    lora_name: str


def add_lora_routes(app: FastAPI, engine, model_name: str, lora_modules: dict, error) -> None:
    """The two routes over `lora_modules` (name -> LoRARequest, shared with the request
    routes); `engine` is the `AsyncEngine`, `error(status, message, kind)` the server's."""
    ids = itertools.count(max((m.lora_int_id for m in lora_modules.values()), default=0) + 1)
    config = engine.engine.config

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoRARequest) -> Response:
        if not config.enable_lora:
            return error(400, "this server was started without LoRA (--enable_lora)")
        if req.lora_name in lora_modules or req.lora_name == model_name:
            return error(400, f"the name {req.lora_name!r} is already served")
        model = engine.engine.model_config
        try:  # read and checked off the event loop; the engine reads it again when used
            await asyncio.to_thread(load_adapter, req.lora_path, model, config.max_lora_rank)
        except (ValueError, OSError) as e:
            return error(400, str(e))
        lora_modules[req.lora_name] = LoRARequest(req.lora_name, next(ids), req.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoRARequest) -> Response:
        if lora_modules.pop(req.lora_name, None) is None:
            return error(404, f"no LoRA adapter named {req.lora_name!r}", "not_found_error")
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
