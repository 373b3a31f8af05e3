"""orca-jax: iteration-level scheduling and selective batching for transformer serving on JAX.

    from orca_jax import LLM, SamplingParams

Names are imported lazily, so `orca_jax.scheduler` (pure Python) can be used without JAX.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING

try:
    __version__ = importlib.metadata.version("orca-jax")
except importlib.metadata.PackageNotFoundError:  # run from a source tree (PYTHONPATH=.)
    __version__ = "0+unknown"

_EXPORTS = {
    "LLM": "orca_jax.llm",
    "BeamSearchParams": "orca_jax.beam_search",
    "Logprob": "orca_jax.engine.outputs",
    "Engine": "orca_jax.engine.engine",
    "EngineConfig": "orca_jax.engine.config",
    "LoRARequest": "orca_jax.engine.lora",
    "CompletionOutput": "orca_jax.engine.outputs",
    "RequestOutput": "orca_jax.engine.outputs",
    "SamplingParams": "orca_jax.scheduler",
    "StructuredOutputs": "orca_jax.scheduler",
}

__all__ = [
    "LLM",
    "BeamSearchParams",
    "Logprob",
    "CompletionOutput",
    "Engine",
    "EngineConfig",
    "LoRARequest",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputs",
]

if TYPE_CHECKING:
    from orca_jax.beam_search import BeamSearchParams
    from orca_jax.engine.config import EngineConfig
    from orca_jax.engine.engine import Engine
    from orca_jax.engine.lora import LoRARequest
    from orca_jax.engine.outputs import CompletionOutput, Logprob, RequestOutput
    from orca_jax.llm import LLM
    from orca_jax.scheduler import SamplingParams, StructuredOutputs


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'orca_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
