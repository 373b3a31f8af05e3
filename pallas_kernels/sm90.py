"""Our Pallas kernels lowered for an H100 (sm_90) without a GPU: the Triton calls a jitted
function emits, for the tests' lowering checks and `experiments/offline_sm90.py`.

JAX lowers a `pallas_call` on the Triton backend to an XLA custom call holding the kernel's
Triton IR and its launch (grid, warps, stages); an abstract CUDA device is enough to get
there. What Triton and ptxas then make of that IR needs Triton itself (offline_sm90.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

H100 = jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda"
)
LAUNCH_FIELDS = ("grid_x", "grid_y", "grid_z", "num_warps", "num_stages")


def attention_args(T, N, K, H, L, P, S, R, MB, dtype, cache_dtype=None) -> tuple:
    """`ragged_paged_attention`'s positional inputs as shapes, for lowering: q [T, N, H], the
    K and V caches [L, K, P, S, H], layer, kv_lens [R], block_tables [R, MB], cu_q_lens
    [R + 1], num_reqs."""
    sds, i32 = jax.ShapeDtypeStruct, jnp.int32
    cache = sds((L, K, P, S, H), cache_dtype or dtype)
    return (
        sds((T, N, H), dtype),
        cache,
        cache,
        sds((), i32),
        sds((R,), i32),
        sds((R, MB), i32),
        sds((R + 1,), i32),
        sds((), i32),
    )


def triton_calls(fn, args) -> list[tuple[str, dict[str, int], bytes]]:
    """Lower `fn` for an abstract H100 (no GPU needed); the Triton custom calls it emits, as
    (op text, launch ints, Triton IR bytes), read while the module is alive (an op outlives
    its module only as a dangling pointer)."""
    from jax._src.lib.mlir import ir  # noqa: PLC0415
    from jax.sharding import AbstractMesh, AxisType, use_abstract_mesh  # noqa: PLC0415

    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=H100)
    with use_abstract_mesh(mesh):
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    calls = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    if child.operation.name == "stablehlo.custom_call":
                        target = ir.StringAttr(child.attributes["call_target_name"]).value
                        if target == "__gpu$xla.gpu.triton":
                            config = child.attributes["mhlo.backend_config"]
                            launch = {k: ir.IntegerAttr(config[k]).value for k in LAUNCH_FIELDS}
                            triton_ir = ir.StringAttr(config["ir"]).value_bytes
                            calls.append((str(child), launch, triton_ir))
                    walk(child.operation)

    module = lowered.compiler_ir("stablehlo")
    walk(module.operation)
    return calls


def triton_ir_text(triton_ir: bytes) -> str:
    """A call's Triton IR as MLIR text (what Triton's own compiler reads from a .ttir file),
    verified."""
    from jax._src.lib.mlir import ir  # noqa: PLC0415
    from jax._src.pallas.triton import lowering as triton_lowering  # noqa: PLC0415

    with triton_lowering._new_ir_context():
        module = ir.Module.parse(triton_ir)
        if not module.operation.verify():
            raise ValueError("Triton IR does not verify")
        return str(module)
