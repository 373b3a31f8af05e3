"""Residual add fused with the LayerNorm / RMSNorm that follows it: Pallas kernel and its
jnp reference."""

from pallas_kernels.add_norm.reference import add_norm_ref

__all__ = ["add_norm_ref"]
