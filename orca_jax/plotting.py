"""The paper's figure: median normalized latency against throughput, one curve per policy.

Rows are `orca_jax.metrics.summarize` dicts with a "policy" key, as the serving experiments
write them. matplotlib is imported on first use, with the file-only Agg backend.
"""

from __future__ import annotations

from collections.abc import Sequence


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_throughput(ax, rows: Sequence[dict], title: str, slo: float | None = None) -> None:
    """Draw one curve per policy on `ax`: throughput (req/s) against median normalized
    latency (ms/token), points joined in row order (rising arrival rate, as the paper draws
    them); `slo` (seconds per token) as a dashed line."""
    for policy in dict.fromkeys(r["policy"] for r in rows):
        pts = [
            (r["throughput_req_s"], 1e3 * r["normalized_latency_median"])
            for r in rows
            if r["policy"] == policy
        ]
        ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=policy)
    if slo is not None:
        ax.axhline(1e3 * slo, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("throughput (req/s)")
    ax.set_ylabel("median normalized latency (ms/token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
