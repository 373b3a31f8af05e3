"""Request workloads for serving experiments: the paper's synthetic one and real traces.

A workload is a list of `WorkItem(arrival, prompt_len, output_len)`, arrival in seconds from
the start. Every request generates exactly `output_len` tokens (EOS ignored), as in the
paper's evaluation.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import os

import numpy as np


@dataclasses.dataclass(frozen=True)
class WorkItem:
    arrival: float  # seconds after the start
    prompt_len: int
    output_len: int


def poisson(
    rate: float,
    num_requests: int,
    prompt_len: tuple[int, int] = (32, 512),
    output_len: tuple[int, int] = (1, 128),
    seed: int = 0,
) -> list[WorkItem]:
    """The paper's workload: Poisson arrivals at `rate` req/s, lengths uniform on the closed
    ranges (prompts U[32, 512], outputs U[1, 128] by default)."""
    if rate <= 0 or num_requests < 1:
        raise ValueError(f"need rate > 0 and num_requests >= 1; got {rate}, {num_requests}")
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, num_requests))
    prompts = rng.integers(prompt_len[0], prompt_len[1] + 1, num_requests)
    outputs = rng.integers(output_len[0], output_len[1] + 1, num_requests)
    return [
        WorkItem(float(a), int(p), int(o))
        for a, p, o in zip(arrivals, prompts, outputs, strict=True)
    ]


@dataclasses.dataclass(frozen=True)
class TraceStats:
    """What loading a trace changed, to state in a report."""

    requests: int
    clipped_prompts: int
    clipped_outputs: int


def azure_trace(
    path: str | os.PathLike,
    *,
    max_model_len: int,
    time_scale: float = 1.0,
    limit: int | None = None,
) -> tuple[list[WorkItem], TraceStats]:
    """Replay an Azure LLM inference trace (`TIMESTAMP, ContextTokens, GeneratedTokens`).

    Arrivals are relative to the first request and divided by `time_scale` (2 replays twice
    as fast). Lengths are clipped to the model's context: a prompt to `max_model_len - 1`,
    its output to what remains; how many were clipped is returned beside the workload.
    """
    items, clipped_p, clipped_o, t0 = [], 0, 0, None
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            t = _timestamp(row["TIMESTAMP"])
            t0 = t if t0 is None else t0
            prompt, output = int(row["ContextTokens"]), max(1, int(row["GeneratedTokens"]))
            if prompt > max_model_len - 1:
                prompt, clipped_p = max_model_len - 1, clipped_p + 1
            if prompt + output > max_model_len:
                output, clipped_o = max_model_len - prompt, clipped_o + 1
            items.append(WorkItem((t - t0) / time_scale, max(1, prompt), output))
            if limit is not None and len(items) >= limit:
                break
    return items, TraceStats(len(items), clipped_p, clipped_o)


def _timestamp(text: str) -> float:
    """Seconds since the epoch of the trace's timestamps (`2023-11-16 18:15:46.6805900`)."""
    date, _, frac = text.strip().partition(".")
    base = datetime.datetime.fromisoformat(date).replace(tzinfo=datetime.UTC).timestamp()
    return base + (float("0." + frac) if frac else 0.0)
