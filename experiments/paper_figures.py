"""The paper's evaluation, rerun in simulation: four GPT-3 sizes on A100s, Orca against the
request-level baseline, median normalized latency against throughput.

  python experiments/paper_figures.py --out=/tmp/paper            # all four setups, ~1 min
  python experiments/paper_figures.py --setups=gpt3-13b --num_requests=100

The setups are the paper's (PAPER.md, Evaluation): GPT-3 13B on 1 GPU, 101B on 8 (8-way
tensor parallel), 175B on 16 (2 pipeline stages x 8), 341B on 32 (4 x 8), A100-40GB, bf16,
context 2048. Workload: Poisson arrivals, prompts U[32, 512], outputs U[1, 128], every
request generating exactly its length; a second panel serves requests that all have the same
lengths (`--same_lengths`). Policies: `orca` (Algorithm 1, `n_workers` = pipeline stages)
at several max batch sizes, and `static` (FasterTransformer behind a request-level batcher,
its batches padded as FasterTransformer pads them) at several max batch sizes.

No model runs: the engine's own schedulers on the virtual clock of `orca_jax.simulate`'s
roofline cost model (not calibrated against a measured step yet). So the figures show the
shape of the paper's result, not its absolute values.

Writes `paper_figures.md` (a table per setup, and the headline: throughput at the paper's
190 ms/token), `paper_figures.json` and `paper_figures.png` (one panel per setup) to --out.
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags

from models import get_config
from orca_jax.metrics import summarize, throughput_at_latency
from orca_jax.plotting import latency_throughput, pyplot
from orca_jax.scheduler import SchedulerConfig
from orca_jax.simulate import A100_40GB, CostModel, simulate
from orca_jax.workload import poisson


@dataclasses.dataclass(frozen=True)
class Setup:
    model: str
    tp: int
    pp: int


SETUPS = {
    s.model: s
    for s in (
        Setup("gpt3-13b", 1, 1),
        Setup("gpt3-101b", 8, 1),
        Setup("gpt3-175b", 8, 2),
        Setup("gpt3-341b", 8, 4),
    )
}

_SETUPS = flags.DEFINE_list("setups", list(SETUPS), "Which of the paper's setups to run.")
_POLICIES = flags.DEFINE_list(
    "policies", ["orca:8", "orca:32", "static:1", "static:8", "static:32"], "name:max_batch."
)
_NUM = flags.DEFINE_integer("num_requests", 400, "Requests per point.")
_SAME = flags.DEFINE_list(
    "same_lengths", ["128", "64"], "prompt,output of the same-length panel (175B); empty: none."
)
_SLO = flags.DEFINE_float("slo", 0.19, "Normalized latency (s/token) of the headline figure.")
_SEED = flags.DEFINE_integer("seed", 1, "Workload seed.")
_OUT = flags.DEFINE_string("out", None, "Output folder (default $OUT, else the working dir).")

MAX_LEN = 2048


def scheduler_config(policy: str, setup: Setup, cost: CostModel) -> SchedulerConfig:
    name, _, bs = policy.partition(":")
    max_bs = int(bs)
    return SchedulerConfig(
        policy=name,
        max_batch_size=max_bs,
        num_blocks=cost.kv_capacity_tokens() // 16,
        block_size=16,
        max_num_batched_tokens=max_bs * MAX_LEN,  # no token cap: exactly Algorithm 1
        n_workers=setup.pp if name == "orca" else 1,
        max_model_len=MAX_LEN,
    )


def sweep(setup: Setup, policies: list[str], lengths: dict, slo: float) -> list[dict]:
    """One row of `summarize` figures per (policy, rate).

    Each policy's rates grow by 1.5x from 0.1 req/s until its median normalized latency
    passes twice the SLO, so every curve crosses the SLO line (up to 64 req/s).
    """
    cost = CostModel(get_config(setup.model, dtype="bfloat16"), A100_40GB, setup.tp, setup.pp)
    rows = []
    for policy in policies:
        config = scheduler_config(policy, setup, cost)
        rate = 0.1
        while rate <= 64:
            work = poisson(rate, _NUM.value, seed=_SEED.value, **lengths)
            timings, end = simulate(work, config, cost)
            rows.append({"policy": policy, "rate": rate, **summarize(timings, end)})
            if rows[-1]["normalized_latency_median"] > 2 * slo:
                break
            rate = round(rate * 1.5, 3)
    return rows


def headline(rows: list[dict], slo: float) -> dict[str, float]:
    """Throughput at `slo` per policy, and Orca's best over the baseline's best."""
    out = {}
    for policy in dict.fromkeys(r["policy"] for r in rows):
        pts = [
            (r["throughput_req_s"], r["normalized_latency_median"])
            for r in rows
            if r["policy"] == policy
        ]
        out[policy] = throughput_at_latency(pts, slo)
    best = {k: max(v for p, v in out.items() if p.startswith(k)) for k in ("orca", "static")}
    out["orca / static"] = best["orca"] / best["static"] if best["static"] else float("inf")
    return out


def markdown(title: str, rows: list[dict], head: dict[str, float], slo: float) -> str:
    lines = [
        f"### {title}",
        "",
        "| policy | rate | req/s | median norm. latency (ms/token) | p90 | TTFT median (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['rate']:g} | {r['throughput_req_s']:.2f} | "
            f"{1e3 * r['normalized_latency_median']:.0f} | "
            f"{1e3 * r['normalized_latency_p90']:.0f} | {r['ttft_median']:.2f} |"
        )
    cells = ", ".join(f"{p} {v:.2f}" for p, v in head.items() if p != "orca / static")
    lines += [
        "",
        f"Throughput (req/s) at {1e3 * slo:.0f} ms/token: {cells}; "
        f"best orca / best static = **{head['orca / static']:.1f}x**.",
        "",
    ]
    return "\n".join(lines)


def main(argv):
    del argv
    out_dir = _OUT.value or os.environ.get("OUT") or "."
    os.makedirs(out_dir, exist_ok=True)
    policies, slo = _POLICIES.value, _SLO.value
    panels = []  # (title, rows, headline)
    for name in _SETUPS.value:
        if name not in SETUPS:
            raise SystemExit(f"unknown setup {name!r}; choose from {list(SETUPS)}")
        s = SETUPS[name]
        rows = sweep(s, policies, {}, slo)
        title = f"{name}, {s.tp * s.pp} A100-40GB (tp={s.tp}, pp={s.pp})"
        panels.append((title, rows, headline(rows, slo)))
        print(markdown(title, rows, panels[-1][2], slo), flush=True)
    if _SAME.value:
        p, o = map(int, _SAME.value)
        rows = sweep(SETUPS["gpt3-175b"], policies, dict(prompt_len=(p, p), output_len=(o, o)), slo)
        title = f"gpt3-175b, every request {p} prompt + {o} output tokens"
        panels.append((title, rows, headline(rows, slo)))
        print(markdown(title, rows, panels[-1][2], slo), flush=True)

    with open(os.path.join(out_dir, "paper_figures.md"), "w") as f:
        f.write("\n".join(markdown(t, rows, h, slo) for t, rows, h in panels))
    with open(os.path.join(out_dir, "paper_figures.json"), "w") as f:
        json.dump([{"setup": t, "rows": rows, "headline": h} for t, rows, h in panels], f)
    plt = pyplot()
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, (title, rows, _) in zip(axes.flat, panels, strict=False):
        latency_throughput(ax, rows, title, slo)
        ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("Simulated (roofline cost model, not measured): median normalized latency")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "paper_figures.png"), dpi=120)
    print(f"wrote paper_figures.md/.json/.png to {out_dir}")


if __name__ == "__main__":
    app.run(main)
