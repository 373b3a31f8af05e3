"""The gpt2 decode step's Pallas kernels (and SmolLM2's linear ones) compiled offline for
sm_90, no GPU: registers, spills, shared memory, and so how many programs an H100 / H200 SM
holds and in how many waves a launch runs. Not run in CI.

Two halves in two Pythons: Triton's own pip package (its compiler and the ptxas it ships)
lives in a venv of its own, and is no dependency of ours.

  PYTHONPATH=. python experiments/offline_sm90.py dump --out /tmp/sm90   # our venv: IR
  python3.12 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install triton==3.9.0
  /tmp/tvenv/bin/python experiments/offline_sm90.py compile --out /tmp/sm90

`dump` lowers each kernel for an abstract H100 (`pallas_kernels/sm90.py`) and writes its
Triton IR and launch; `compile` runs Triton's passes for sm_90 on that IR, then ptxas -v on
the PTX, and prints a table (also written to OUT/sm90.md). XLA on the GPU compiles the same
IR with its own Triton, which may allocate differently: these are estimates of occupancy,
and say nothing of time. The `compile` half imports nothing of ours.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess

# An sm_90 SM (H100 and H200): registers, shared memory for blocks (228 KB, 1 KB of it
# reserved per block), threads, blocks, SMs.
SM_REGS, SM_SMEM, BLOCK_SMEM_RESERVED, SM_THREADS, SM_BLOCKS, SMS = (
    65536,
    233472,
    1024,
    2048,
    32,
    132,
)


def dump(out: str) -> None:
    """Triton IR and launch of each kernel of the gpt2 bf16 decode step at 128 x 512."""
    import functools  # noqa: PLC0415

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from pallas_kernels.linear.kernel import linear, linear_group  # noqa: PLC0415
    from pallas_kernels.ragged_paged_attention.kernel import (  # noqa: PLC0415
        ragged_paged_attention,
    )
    from pallas_kernels.sm90 import attention_args, triton_calls, triton_ir_text  # noqa: PLC0415

    sds, bf, i32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.int32
    T, D, F, L, N, H, S, P, MB = 128, 768, 3072, 12, 12, 64, 16, 4200, 32
    x, h, layer = sds((T, D), bf), sds((T, F), bf), sds((), i32)
    w, b = sds((L, D, D), bf), sds((L, D), bf)
    up, up_b, down = sds((L, D, F), bf), sds((L, F), bf), sds((L, F, D), bf)
    kw = dict(interpret=False)
    ln = dict(norm="layernorm", **kw)
    cases = {
        "linear q+k+v": (
            lambda x, *a: linear_group(x, a[:3], a[3:6], a[6], **kw),
            (x, w, w, w, b, b, b, layer),
        ),
        "linear norm + q+k+v": (
            lambda x, *a: linear_group(
                x, a[:3], a[3:6], a[6], norm_scale=a[7], norm_bias=a[8], **ln
            ),
            (x, w, w, w, b, b, b, layer, b, b),
        ),
        "linear o": (lambda *a: linear(*a, **kw), (x, w, b, layer)),
        "linear o + residual": (
            lambda *a: linear(*a[:4], residual=a[4], **kw),
            (x, w, b, layer, x),
        ),
        "linear up + GELU": (
            lambda *a: linear(*a, activation="gelu_tanh", **kw),
            (x, up, up_b, layer),
        ),
        "linear norm + up + GELU": (
            lambda *a: linear(
                *a[:4], norm_scale=a[4], norm_bias=a[5], activation="gelu_tanh", **ln
            ),
            (x, up, up_b, layer, b, b),
        ),
        "linear down (split 4)": (lambda *a: linear(*a, **kw), (h, down, b, layer)),
        "linear down (n16, unsplit)": (
            lambda *a: linear(*a, num_k_splits=1, block_n=16, **kw),
            (h, down, b, layer),
        ),
        # SmolLM2-135M's (D 576, 9 + 3 + 3 heads of 64, F 1536, 30 layers): RMSNorm with q,
        # k, v and the rotary embedding of q and k; RMSNorm with gate and up, silu(gate) * up
        "smollm2 norm + q+k+v + rope": (
            lambda x, q, k, v, layer, g, pos: linear_group(
                x,
                (q, k, v),
                (None,) * 3,
                layer,
                norm="rmsnorm",
                norm_scale=g,
                rope=(True, True, False),
                rope_theta=100000.0,
                positions=pos,
                head_dim=64,
                **kw,
            ),
            (
                sds((T, 576), bf),
                sds((30, 576, 576), bf),
                sds((30, 576, 192), bf),
                sds((30, 576, 192), bf),
                layer,
                sds((30, 576), bf),
                sds((T,), i32),
            ),
        ),
        "smollm2 norm + gate, up gated": (
            lambda x, wg, wu, layer, g: linear_group(
                x,
                (wg, wu),
                (None, None),
                layer,
                norm="rmsnorm",
                norm_scale=g,
                gated=True,
                activation="silu",
                **kw,
            ),
            (
                sds((T, 576), bf),
                sds((30, 576, 1536), bf),
                sds((30, 576, 1536), bf),
                layer,
                sds((30, 576), bf),
            ),
        ),
    }
    args = attention_args(T, N, N, H, L, P, S, T, MB, bf)
    new = sds((T, N, H), bf)
    for name, tuning in [
        ("attention (GPU default)", {}),
        ("attention one_loop", dict(one_loop=True)),
        ("attention stages=4", dict(num_stages=4)),
        ("attention block_kv=64", dict(block_kv=64)),
        ("attention block_kv=64 stages=4", dict(block_kv=64, num_stages=4)),
        ("attention warps=8", dict(num_warps=8)),
    ]:
        call = functools.partial(ragged_paged_attention, sm_scale=H**-0.5, **tuning, **kw)
        cases[name] = (lambda *a, call=call: call(*a[:8], new_kv=a[8:]), (*args, new, new))
    os.makedirs(out, exist_ok=True)
    launches = {}
    for name, (fn, fn_args) in cases.items():
        for i, (_, launch, ir) in enumerate(triton_calls(fn, fn_args)):
            key = f"{name} [{i}]" if i else name  # attention: [1] is the prefill-class launch
            stem = f"k{len(launches):02d}"
            with open(os.path.join(out, stem + ".ttir"), "w") as f:
                f.write(triton_ir_text(ir))
            launches[stem] = dict(name=key, **launch)
    with open(os.path.join(out, "launches.json"), "w") as f:
        json.dump(launches, f, indent=1)
    print(f"{len(launches)} kernels' Triton IR in {out}")


def programs_per_sm(regs: int, smem: int, warps: int) -> int:
    """Blocks one SM holds: registers (allocated per warp in units of 256), shared memory,
    threads and blocks, whichever runs out first."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = SM_REGS // per_warp // warps
    by_smem = SM_SMEM // (smem + BLOCK_SMEM_RESERVED)
    return min(by_regs, by_smem, SM_THREADS // (32 * warps), SM_BLOCKS)


def compile_all(out: str) -> None:
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas-blackwell")
    with open(os.path.join(out, "launches.json")) as f:
        launches = json.load(f)
    lines = [
        f"Compiled offline for sm_90 with Triton {triton.__version__} and its ptxas; "
        f"programs per SM of {SMS} (registers, shared memory, threads), waves = programs / "
        "(SMs x programs per SM).",
        "",
        "| kernel | grid | warps, stages | registers | spills (B) | shared (KB) | per SM | waves |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(glob.glob(os.path.join(out, "k*.ttir"))):
        launch = launches[os.path.basename(path)[:-5]]
        warps, stages = launch["num_warps"], launch["num_stages"]
        kernel = triton.compile(
            path, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages)
        )
        ptx = path[:-5] + ".ptx"
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        report = subprocess.run(
            [ptxas, "-v", "-arch=sm_90a", ptx, "-o", os.devnull], capture_output=True, text=True
        ).stderr
        regs = int(report.split("Used ")[1].split(" registers")[0])
        spills = int(report.split("bytes stack frame, ")[1].split(" bytes spill stores")[0])
        smem = kernel.metadata.shared
        grid = launch["grid_x"] * launch["grid_y"] * launch["grid_z"]
        per_sm = programs_per_sm(regs, smem, warps)
        lines.append(
            f"| {launch['name']} | {launch['grid_x']}x{launch['grid_y']}x{launch['grid_z']} "
            f"| {warps}, {stages} | {regs} | {spills} | {smem / 1024:.1f} | {per_sm} "
            f"| {grid / (SMS * per_sm):.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out, "sm90.md"), "w") as f:
        f.write(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["dump", "compile"])
    parser.add_argument("--out", default="/tmp/sm90")
    args = parser.parse_args()
    if args.mode == "dump":
        dump(args.out)
    else:
        compile_all(args.out)


if __name__ == "__main__":
    main()
