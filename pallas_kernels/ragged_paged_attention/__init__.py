"""Ragged paged attention over a packed token batch: Pallas kernel and its jnp reference."""

from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_ref

__all__ = ["ragged_paged_attention_ref"]
