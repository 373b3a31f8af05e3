"""The decode step as XLA compiles it for an H100, on a machine with no GPU: its kernels.

  python3.12 -m venv /tmp/cuda-venv && /tmp/cuda-venv/bin/pip install 'jax[cuda13]==0.11.2'
  echo "$PWD/.venv/lib/python3.12/site-packages" \
      > /tmp/cuda-venv/lib/python3.12/site-packages/project.pth   # flax etc. from our venv
  JAX_PLATFORMS=cpu PYTHONPATH=. /tmp/cuda-venv/bin/python experiments/offline_gpu_hlo.py \
      --model=gpt2 --fused_linear --hlo_out=/tmp/step.hlo

JAX's CUDA plugin compiles for a GPU described by a target config (XLA's deviceless
compilation: `jax.experimental.topologies.get_topology_desc(..., target_config=...)`), no
device needed; XLA runs its whole GPU pipeline, fusion and Triton's compile of our Pallas
kernels to sm_90 included. What it cannot do without the device is autotune, so its GEMM
tilings (and split-K) are its heuristics' choice, which on the GPU may differ; which ops
become kernels, and which bytes are copied, is what this shows. Prints the step's launches
per name, one layer's in order, and every kernel that only moves bytes (a slice or copy).

The project's defaults pick their GPU settings by `jax.default_backend()`, which is the CPU
here: this script answers "gpu" for the whole run, so the step is built as on the GPU.
"""

from __future__ import annotations

import jax
import step_flags
from absl import app, flags
from hlo_launches import Launch, counts, launches, one_period
from step_shapes import decode_batch

from models import init_kv_cache, init_params, step

_MODEL = flags.DEFINE_string("model", "gpt2", "Preset.")
step_flags.define(dtype="bfloat16", attention_impl="pallas")
_REQS = flags.DEFINE_integer("reqs", 128, "Decoding requests.")
_CONTEXT = flags.DEFINE_integer("context", 512, "Cached tokens per request.")
_HLO = flags.DEFINE_string("hlo_out", None, "Write the optimized HLO here.")
_OUT = flags.DEFINE_string("out", None, "Write the report to this file too.")

# An H100 SXM (80 GB HBM3) as XLA's GpuTargetConfig text: NVIDIA's published figures.
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84978434048
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability { major: 9 minor: 0 }
}
runtime_version { major: 13 }
dnn_version_info { major: 9 minor: 10 }
platform_name: "CUDA"
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def h100() -> jax.Device:
    """A compile-only H100 (no GPU needed), also made the default device: Pallas's Triton
    lowering reads the target's compute capability from it."""
    from jax.experimental import topologies  # noqa: PLC0415

    topology = topologies.get_topology_desc(
        "h100", "cuda", target_config=H100_TARGET, topology="1x1x1"
    )
    device = topology.devices[0]
    jax.config.update("jax_default_device", device)
    return device


def compiled_step_hlo(device: jax.Device, cfg, reqs: int, context: int, page: int) -> str:
    """The optimized HLO of `step` for `reqs` decodes of `context` cached tokens each."""
    sharding = jax.sharding.SingleDeviceSharding(device)

    def on_device(tree):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree
        )

    batch, num_pages = decode_batch(reqs, context, page)
    params = jax.eval_shape(lambda: init_params(cfg, seed=0))
    cache = jax.eval_shape(lambda: init_kv_cache(cfg, num_pages, page))
    traced = step.trace(on_device(params), on_device(cache), on_device(batch), cfg)
    return traced.lower().compile().as_text()


def report(items: list[Launch]) -> list[str]:
    """Launches a step per name, one layer's in order (from one attention launch to the
    next), and the kernels that only move bytes."""
    marker = next((x.family for x in items if x.family.startswith("ragged_paged_attention")), "")
    layer = one_period(items, marker)
    per_step = sum(x.repeat for x in items)
    lines = [f"{per_step} launches a step", "", "| kernel | per step |", "|---|---|"]
    lines += [f"| {name} | {n} |" for name, n in counts(items)]
    lines += [
        "",
        f"one layer ({len(layer)} launches):",
        "",
        "| # | kernel | kind | grid | out KB |",
    ]
    lines += ["|---|---|---|---|---|"]
    lines += [
        f"| {i} | {x.family} | {x.kind} | {x.grid or ''} | {x.out_bytes / 1e3:.0f} |"
        for i, x in enumerate(layer)
    ]
    moves = [x for x in items if x.moves_only]
    moved = sum(x.out_bytes * x.repeat for x in moves)
    n_moves = sum(x.repeat for x in moves)
    lines += ["", f"kernels that only move bytes: {n_moves} a step, {moved / 1e6:.2f} MB"]
    by_family: dict[str, list[Launch]] = {}
    for x in moves:
        by_family.setdefault(x.family, []).append(x)
    lines += [
        f"- {name}: {sum(x.repeat for x in xs)} a step, "
        f"{sum(x.out_bytes * x.repeat for x in xs) / 1e6:.2f} MB"
        for name, xs in by_family.items()
    ]
    return lines


def main(argv):
    del argv
    jax.default_backend = lambda: "gpu"  # the defaults of a GPU run (see the docstring)
    device = h100()
    cfg = step_flags.model_config(_MODEL.value)
    hlo = compiled_step_hlo(device, cfg, _REQS.value, _CONTEXT.value, step_flags.value("page_size"))
    if _HLO.value:
        with open(_HLO.value, "w") as f:
            f.write(hlo)
    lines = [
        f"{device.device_kind} (compiled offline, no autotuning): "
        f"{step_flags.describe(_MODEL.value, cfg)}, decode {_REQS.value} x {_CONTEXT.value}",
        *report(launches(hlo)),
    ]
    step_flags.print_report(lines, _OUT.value)


if __name__ == "__main__":
    app.run(main)
