"""The paper's experiment: median normalized latency against throughput, per policy.

  python experiments/bench_serving.py --model=tiny-gpt --rates=2,4,8,16 \
      --policies=orca,static:8,paged --num_requests=100 --plot=/tmp/latency.png
  python experiments/bench_serving.py --trace=AzureLLMInferenceTrace_conv.csv --time_scale=4
  python experiments/bench_serving.py --simulate --model=gpt3-175b --dtype=bfloat16 --tp=8 \
      --pp=2 --n_workers=2 --policies=orca,static:8,static:32 --rates=0.5,1,2,4,8 \
      --prompt_len=32,512 --output_len=1,128 --max_model_len=2048 --num_requests=500

Each (policy, rate) point serves a fresh workload in real time on a fresh, warmed-up engine
(`orca_jax.replay`): Poisson arrivals, prompts U[--prompt_len], outputs U[--output_len],
EOS ignored (the paper's setting), or a replayed Azure trace (lengths clipped to the
context; the counts are printed). A policy "static:8" is the request-level baseline at max
batch size 8. Prints a table of `orca_jax.metrics.summarize` figures; --out writes them as
JSON and --plot draws the paper's figure (matplotlib). With --simulate no model runs: the
same schedulers run on a virtual clock with a roofline cost model of --hardware
(`orca_jax.simulate`), for the paper's GPT-3 sizes.
"""

from __future__ import annotations

import json

from absl import app, flags

from models import get_config, init_params
from orca_jax import Engine, EngineConfig
from orca_jax.calibration import Calibration
from orca_jax.metrics import summarize
from orca_jax.plotting import latency_throughput, pyplot
from orca_jax.replay import replay
from orca_jax.simulate import HARDWARE, CostModel, simulate
from orca_jax.workload import azure_trace, poisson

_MODEL = flags.DEFINE_string("model", "tiny-gpt", "Model preset (random weights).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Parameter / cache dtype.")
_KV_DTYPE = flags.DEFINE_enum(
    "kv_cache_dtype",
    "auto",
    ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
    "KV cache element type (fp8: twice bf16's tokens per byte; real runs and --simulate).",
)
_POLICIES = flags.DEFINE_list(
    "policies",
    ["orca", "static:8", "paged"],
    "name[:max_batch]; 'paged+prefix' is paged with prefix caching.",
)
_RATES = flags.DEFINE_list("rates", ["2", "4", "8"], "Poisson arrival rates (req/s).")
_NUM = flags.DEFINE_integer("num_requests", 60, "Requests per point.")
_PROMPT = flags.DEFINE_list("prompt_len", ["32", "128"], "Prompt length range lo,hi.")
_OUTPUT = flags.DEFINE_list("output_len", ["1", "64"], "Output length range lo,hi.")
_MAX_BATCH = flags.DEFINE_integer("max_batch_size", 16, "Default max batch size.")
_MAX_LEN = flags.DEFINE_integer("max_model_len", 256, "Context per request.")
_BATCHED_TOKENS = flags.DEFINE_integer(
    "max_num_batched_tokens",
    None,
    "Token cap per iteration (default: max(512, context) on a model; max_batch x context, "
    "i.e. exactly the paper's Algorithm 1, in simulation).",
)
_KV_BLOCKS = flags.DEFINE_integer("num_kv_blocks", None, "KV blocks (default: from memory).")
_TRACE = flags.DEFINE_string("trace", None, "Replay this Azure trace CSV instead of Poisson.")
_SHARED_PREFIX = flags.DEFINE_integer(
    "shared_prefix", 0, "Every prompt starts with the same this many tokens (a system prompt)."
)
_TIME_SCALE = flags.DEFINE_float("time_scale", 1.0, "Trace replay speed-up.")
_SLO_TTFT = flags.DEFINE_float("slo_ttft", None, "TTFT SLO (s) for goodput.")
_SLO_TPOT = flags.DEFINE_float("slo_tpot", None, "TPOT SLO (s) for goodput.")
_SIMULATE = flags.DEFINE_bool("simulate", False, "Virtual clock and cost model, no model run.")
_HARDWARE = flags.DEFINE_enum("hardware", "a100", list(HARDWARE), "Simulated accelerator.")
_CALIBRATION = flags.DEFINE_string(
    "calibration",
    None,
    "With --simulate: a Calibration JSON (experiments/calibrate_simulator.py) giving the "
    "hardware, efficiencies and overhead instead of --hardware's spec sheet and guesses.",
)
_TP = flags.DEFINE_integer("tp", 1, "Simulated tensor-parallel size.")
_PP = flags.DEFINE_integer("pp", 1, "Simulated pipeline stages.")
_N_WORKERS = flags.DEFINE_integer("n_workers", 1, "Batches in flight (orca, paged).")
_PAD_STATIC = flags.DEFINE_bool(
    "pad_static", True, "Simulated static batches cost FasterTransformer's padded shapes."
)
_OUT = flags.DEFINE_string("out", None, "Write the rows as JSON.")
_PLOT = flags.DEFINE_string("plot", None, "Draw normalized latency vs throughput (PNG).")

COLUMNS = [
    ("policy", "{}"),
    ("rate", "{:g}"),
    ("throughput_req_s", "{:.2f}"),
    ("output_tok_s", "{:.0f}"),
    ("normalized_latency_median", "{:.4f}"),
    ("normalized_latency_p90", "{:.4f}"),
    ("ttft_median", "{:.3f}"),
    ("ttft_p99", "{:.3f}"),
    ("tpot_median", "{:.4f}"),
    ("e2e_p99", "{:.2f}"),
]


def run_point(model, params, policy: str, workload) -> dict:
    name, _, bs = policy.partition(":")
    name, prefix_caching = name.removesuffix("+prefix"), name.endswith("+prefix")
    cost = None
    num_kv_blocks = _KV_BLOCKS.value
    if _SIMULATE.value:
        if _CALIBRATION.value:
            with open(_CALIBRATION.value) as f:
                cost = Calibration.from_json(f.read()).cost_model(model, _TP.value, _PP.value)
        else:
            cost = CostModel(model, HARDWARE[_HARDWARE.value], tp=_TP.value, pp=_PP.value)
        num_kv_blocks = num_kv_blocks or cost.kv_capacity_tokens() // 16
    max_batch = int(bs) if bs else _MAX_BATCH.value
    default_cap = max_batch * _MAX_LEN.value if cost else max(512, _MAX_LEN.value)
    config = EngineConfig(
        policy=name,
        max_batch_size=max_batch,
        max_model_len=_MAX_LEN.value,
        max_num_batched_tokens=_BATCHED_TOKENS.value or default_cap,
        num_kv_blocks=num_kv_blocks,
        n_workers=_N_WORKERS.value if name != "static" else 1,
        enable_prefix_caching=prefix_caching,
        warmup=True,  # compile every bucket first: no compile inside the timed run
    )
    if cost is not None:
        timings, duration = simulate(workload, config.resolve(model)[0], cost, _PAD_STATIC.value)
    else:
        engine = Engine(model, params, None, config)
        timings, duration = replay(engine, workload, shared_prefix=_SHARED_PREFIX.value)
    return summarize(timings, duration, _SLO_TTFT.value, _SLO_TPOT.value)


def main(argv):
    del argv
    model = get_config(_MODEL.value, dtype=_DTYPE.value, kv_cache_dtype=_KV_DTYPE.value)
    params = None if _SIMULATE.value else init_params(model, seed=0)
    lo_p, hi_p = map(int, _PROMPT.value)
    lo_o, hi_o = map(int, _OUTPUT.value)
    if _TRACE.value:
        workload, stats = azure_trace(
            _TRACE.value,
            max_model_len=_MAX_LEN.value,
            time_scale=_TIME_SCALE.value,
            limit=_NUM.value,
        )
        print(f"trace: {stats}")
        points = [(f"trace x{_TIME_SCALE.value:g}", workload)]
    else:
        points = [
            (float(r), poisson(float(r), _NUM.value, (lo_p, hi_p), (lo_o, hi_o), seed=1))
            for r in _RATES.value
        ]
    rows = []
    print("| " + " | ".join(c for c, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for policy in _POLICIES.value:
        for rate, workload in points:
            row = {"policy": policy, "rate": rate, **run_point(model, params, policy, workload)}
            rows.append(row)
            cells = [
                fmt.format(row[c]) if not isinstance(row[c], str) else row[c] for c, fmt in COLUMNS
            ]
            print("| " + " | ".join(cells) + " |", flush=True)
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(rows, f, indent=1)
    if _PLOT.value:
        plot(rows, _PLOT.value)


def plot(rows: list[dict], path: str) -> None:
    """The paper's figure for this sweep, as a PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    where = f"simulated {_HARDWARE.value} tp={_TP.value} pp={_PP.value}" if _SIMULATE.value else ""
    latency_throughput(ax, rows, f"{_MODEL.value}, {_DTYPE.value} {where}".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    print(f"plot: {path}")


if __name__ == "__main__":
    app.run(main)
