"""Serving metrics: the paper's normalized latency beside today's TTFT / TPOT / ITL / goodput.

Pure Python (no JAX): a benchmark records, per request, its arrival time and the time each
generated token reached the client, and `summarize` turns those into one row of figures.

- normalized latency (the paper's metric): end-to-end latency / generated tokens;
- TTFT: first token time - arrival; TPOT: (last - first token time) / (tokens - 1);
- ITL: every gap between consecutive tokens of a request (pooled over requests);
- E2E: last token time - arrival;
- throughput: requests (and output tokens) per second of the run;
- goodput: requests per second that met both SLOs (TTFT and TPOT), when SLOs are given.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence


@dataclasses.dataclass
class RequestTiming:
    """One request as a client saw it (seconds on one clock)."""

    arrival: float
    prompt_tokens: int
    # When each generated token arrived; several may share a time (one iteration's delta).
    token_times: list[float] = dataclasses.field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.arrival

    @property
    def normalized_latency(self) -> float:
        return self.e2e / len(self.token_times)

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation, as numpy's default."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(
    timings: Sequence[RequestTiming],
    duration: float,
    slo_ttft: float | None = None,
    slo_tpot: float | None = None,
) -> dict[str, float]:
    """Medians, p90 and p99 of every latency (seconds), plus rates over `duration` seconds."""
    done = [t for t in timings if t.token_times]
    row: dict[str, float] = {
        "requests": len(done),
        "duration_s": duration,
        "throughput_req_s": len(done) / duration,
        "output_tok_s": sum(len(t.token_times) for t in done) / duration,
    }
    series = {
        "normalized_latency": [t.normalized_latency for t in done],
        "ttft": [t.ttft for t in done],
        "tpot": [t.tpot for t in done if t.tpot is not None],
        "itl": [b - a for t in done for a, b in itertools.pairwise(t.token_times)],
        "e2e": [t.e2e for t in done],
    }
    for name, values in series.items():
        for q, label in ((50, "median"), (90, "p90"), (99, "p99")):
            row[f"{name}_{label}"] = percentile(values, q)
        row[f"{name}_mean"] = sum(values) / len(values) if values else math.nan
    if slo_ttft is not None or slo_tpot is not None:
        good = [
            t
            for t in done
            if (slo_ttft is None or t.ttft <= slo_ttft)
            and (slo_tpot is None or t.tpot is None or t.tpot <= slo_tpot)
        ]
        row["goodput_req_s"] = len(good) / duration
    return row


def throughput_at_latency(points: Sequence[tuple[float, float]], slo: float) -> float:
    """The paper's headline figure: throughput reachable at a latency SLO.

    `points` are (throughput, latency) pairs of one policy's sweep over arrival rates. Returns
    the highest throughput whose latency meets `slo`, linearly interpolated towards the next
    point when that one misses it (0 when no point meets it).
    """
    pts = sorted(points)
    best = 0.0
    for i, (tput, lat) in enumerate(pts):
        if math.isnan(lat):
            raise ValueError(f"latency is NaN at throughput {tput}")
        if lat > slo:
            continue
        best = max(best, tput)
        if i + 1 < len(pts) and pts[i + 1][1] > slo:
            (t1, l1) = pts[i + 1]
            best = max(best, tput + (t1 - tput) * (slo - lat) / (l1 - lat))
    return best
