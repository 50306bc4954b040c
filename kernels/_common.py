"""Small helpers shared by the kernel launchers."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """TRITON_INTERPRET=1: programs run one after another on the CPU, so tiles stay small."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dot_precision(compute_dtype: torch.dtype, device: torch.device) -> str:
    """`tl.dot` input precision: IEEE unless fp32 on CUDA with TF32 allowed for matmuls.

    This is the policy of torch's own fp32 matmul (which the reference uses), so both
    backends make the same precision trade-off; fp64 is always IEEE.
    """
    if (compute_dtype == torch.float32 and device.type == "cuda" and not interpreting()
            and torch.backends.cuda.matmul.allow_tf32):
        return "tf32"
    return "ieee"


def chunk(D: int, cap: int = 64) -> int:
    """Column chunk for loops over D (= H): a power of two >= 16, at most `cap`."""
    return max(16, min(cap, next_pow2(D)))


@triton.jit
def segment_row(pid, table_ptr, n_rows, N_FIELDS: tl.constexpr):
    """The row of a launch's segment table (one int64 row per segment, its first program
    in field 0, rows in program order) that program `pid` belongs to."""
    row = 0
    for k in range(1, n_rows):
        row = tl.where(pid >= tl.load(table_ptr + k * N_FIELDS), k, row)
    return table_ptr + row * N_FIELDS
