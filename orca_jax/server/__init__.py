"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn)."""

from orca_jax.server.app import build_app
from orca_jax.server.async_engine import AsyncEngine

__all__ = ["AsyncEngine", "build_app"]
