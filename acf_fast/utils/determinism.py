"""Deterministic mode: same seed, same inputs -> bit-identical parameters.

What is deterministic, and where:
- CPU, every backend: yes, for a fixed thread count. The native CPU ops give every
  output element one writer and sum in a fixed order; ATen's CPU GEMMs are
  deterministic for fixed shapes and threads. (Changing torch.set_num_threads may
  change the last bits of GEMM results; the CPU backend's own ops do not depend on it.)
- GPU, triton backend: the Triton kernels use no atomics. The embedding-table
  gradients are row scatter-adds: by default torch's index_add_ (atomics, so the
  order of float additions, and the last bits, can vary run to run); in deterministic
  mode a sorted, atomic-free accumulation is used instead.
- GPU, reference backend: nn.Embedding's backward and some cuBLAS paths are
  nondeterministic unless torch.use_deterministic_algorithms(True), which this mode sets
  (with CUBLAS_WORKSPACE_CONFIG, which cuBLAS then requires).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from . import env


def enable(seed: int | None = 0) -> None:
    """Turn deterministic mode on for this process (and seed every RNG when seed is given)."""
    env.set_deterministic(True)
    torch.use_deterministic_algorithms(True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False
    if seed is not None:
        seed_everything(seed)


def disable() -> None:
    env.set_deterministic(False)
    torch.use_deterministic_algorithms(False)


def enabled() -> bool:
    return env.deterministic() or torch.are_deterministic_algorithms_enabled()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
