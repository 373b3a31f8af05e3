"""orca-jax: iteration-level scheduling and selective batching for transformer serving on JAX.

from orca_jax import LLM, SamplingParams
"""

from orca_jax.engine.config import EngineConfig
from orca_jax.engine.engine import Engine
from orca_jax.engine.outputs import CompletionOutput, RequestOutput
from orca_jax.llm import LLM
from orca_jax.scheduler import SamplingParams

__all__ = ["LLM", "CompletionOutput", "Engine", "EngineConfig", "RequestOutput", "SamplingParams"]
