"""Triton kernels for ACF (installed as acf_fast.kernels)."""
