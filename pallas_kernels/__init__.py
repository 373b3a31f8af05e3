"""Pallas kernels (Triton backend on GPU, interpret mode on CPU), each beside its reference."""
