"""Count JAX traces and backend compiles, to prove a warmed-up run compiles nothing."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import jax

_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_COMPILE = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass
class CompileCounts:
    traces: int = 0
    compiles: int = 0


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileCounts]:
    """Counts every jaxpr trace and XLA backend compile inside the block."""
    counts = CompileCounts()

    def listener(event: str, _duration: float, **_kw) -> None:
        if event == _TRACE:
            counts.traces += 1
        elif event == _COMPILE:
            counts.compiles += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
