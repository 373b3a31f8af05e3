"""A linear layer with its bias and activation fused (GEMM epilogue): Pallas kernel and its
jnp reference."""

from pallas_kernels.linear.reference import linear_ref

__all__ = ["linear_ref"]
