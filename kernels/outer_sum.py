"""Weight gradients as sums of outer products over rows, split-K, without atomics.

Every weight gradient of ACF's training step has the form

    dW[a, b] = sum over rows of A[row, a] * X(row)[b]

with A a dense gradient ([rows, D]: dr, dxr, dz, dut, duu) and X(row) a row of an
activation (the autograd backend's dW_red, kernels.reduce.reduce_weight_grad, is the
same sum), possibly gathered: a feature-table row table[id[row // M], row % M] for
dW_red, a profile- or user-embedding row by id for W1p, W1u, W2u, or a dense row (r,
xbar). `_outer_sum_kernel` computes one [BLOCK_A, BLOCK_B] tile of one split's partial
sum; the splits ([S, NA, NB]) are summed in a fixed order by the optimizer kernel
(acf_fast.kernels.adam), so the result is deterministic.

Tensor cores (`LOW`): a 16-bit X (the feature table) multiplies A rounded to bf16, or
to tf32 for an fp16 table, with fp32 sums: the policy of kernels.reduce's weight
gradient, for the same reasons.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import interpreting, next_pow2


@triton.jit
def _outer_sum_kernel(
    a_ptr, x_ptr, ids_ptr, count_ptr, out_ptr,
    n_rows, rows_per_split, NA, NB, GROUP, stride_id, stride_sub,
    BLOCK_R: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    PRECISION: tl.constexpr, LOW: tl.constexpr,
):
    """count_ptr (static-shape batches, see fused_acf.distinct_items; None: every row is
    live and this code is not compiled in): only the first count ids' rows are read (A
    is 0 past them), spread evenly over the splits the grid was sized for."""
    pid_a = tl.program_id(0)
    pid_b = tl.program_id(1)
    split = tl.program_id(2)
    acc_dtype = out_ptr.dtype.element_ty
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    a_ok = offs_a < NA
    b_ok = offs_b < NB
    row_start = split * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, n_rows)
    if count_ptr is not None:
        n_live = tl.load(count_ptr) * GROUP
        per_split = tl.cdiv(tl.cdiv(n_live, tl.num_programs(2)), BLOCK_R) * BLOCK_R
        row_start = split * per_split
        row_stop = tl.minimum(row_start + per_split, n_live)
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=acc_dtype)
    for r0 in range(row_start, row_stop, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < row_stop
        if ids_ptr is not None:   # X(row) = x[ids[row // GROUP], row % GROUP]
            ident = tl.load(ids_ptr + rows // GROUP, mask=row_ok, other=0).to(tl.int64)
            base = ident * stride_id + (rows % GROUP).to(tl.int64) * stride_sub
        else:                     # X(row) = x[row]
            base = rows.to(tl.int64) * stride_id
        x = tl.load(x_ptr + base[:, None] + offs_b[None, :],
                    mask=row_ok[:, None] & b_ok[None, :], other=0.0)
        # A is [n_rows, NA]: read its transpose tile [BLOCK_A, BLOCK_R]
        g = tl.load(a_ptr + rows[None, :].to(tl.int64) * NA + offs_a[:, None],
                    mask=a_ok[:, None] & row_ok[None, :], other=0.0)
        if LOW:
            if x_ptr.dtype.element_ty == tl.float16:
                acc = tl.dot(g, x.to(tl.float32), acc, input_precision="tf32", out_dtype=tl.float32)
            else:
                acc = tl.dot(g.to(tl.bfloat16), x.to(tl.bfloat16), acc, out_dtype=tl.float32)
        else:
            acc = tl.dot(g, x.to(acc_dtype), acc, input_precision=PRECISION, out_dtype=acc_dtype)
    out = (out_ptr + split.to(tl.int64) * NA * NB + offs_a[:, None].to(tl.int64) * NB
           + offs_b[None, :])
    tl.store(out, acc, mask=a_ok[:, None] & b_ok[None, :])


def blocks(NA: int, NB: int, low: bool, cap: int = 90) -> dict:
    """Tiles of `_outer_sum_kernel` (shared with the compile test); as kernels.reduce's
    weight gradient: [128, 128] fp32 accumulators over 8 warps on tensor cores."""
    if interpreting():
        return dict(BLOCK_R=16, BLOCK_A=max(16, min(64, next_pow2(NA))),
                    BLOCK_B=max(16, min(64, next_pow2(NB))))
    block_a = min(128, max(16, next_pow2(NA)))
    if low:
        return dict(BLOCK_R=64, BLOCK_A=block_a, BLOCK_B=min(128, max(16, next_pow2(NB))),
                    num_warps=8, num_stages=3 if cap >= 80 else 1)
    return dict(BLOCK_R=32, BLOCK_A=block_a, BLOCK_B=min(64, max(16, next_pow2(NB))),
                num_warps=8, num_stages=3 if cap >= 80 else 2)


def splits_for(n_rows: int, NA: int, NB: int, bl: dict, sm_count: int) -> int:
    """Split-K factor: about two waves over the SMs, each split at least 512 rows."""
    if interpreting():
        return 1 if n_rows < 64 else 2     # 2 keeps the optimizer's split sum under test
    tiles = triton.cdiv(NA, bl["BLOCK_A"]) * triton.cdiv(NB, bl["BLOCK_B"])
    return max(1, min(32, (2 * sm_count) // max(1, tiles), n_rows // 512))


def split_plan(n_rows: int, NA: int, NB: int, bl: dict, sm_count: int) -> tuple[int, int]:
    """(splits, rows per split): splits_for's factor, each split a whole number of
    BLOCK_R row blocks, and no split left empty."""
    block_r = bl["BLOCK_R"]
    per = triton.cdiv(triton.cdiv(max(n_rows, 1), splits_for(n_rows, NA, NB, bl, sm_count)),
                      block_r) * block_r
    return max(1, triton.cdiv(n_rows, per)), per


class OuterSum:
    """One weight gradient's launch, planned once for a fixed batch shape.

    a: [n_rows, NA] dense; x: the tensor X(row) reads from; ids (or None), group,
    stride_id, stride_sub: how a row finds its X row (see the module docstring); count:
    the live-id count of a static-shape batch (see _outer_sum_kernel), or None.
    `out` ([S, NA, NB], a view into the optimizer's partial buffer) comes from
    `partial_shape` so that the caller can place it."""

    def __init__(self, a, x, ids, group: int, stride_id: int, stride_sub: int, NB: int,
                 sm_count: int = 132, cap: int = 90, low: bool = False, precision: str = "ieee",
                 count=None):
        self.a, self.x, self.ids, self.count = a, x, ids, count
        self.group, self.stride_id, self.stride_sub = group, stride_id, stride_sub
        self.n_rows, self.NA = a.shape
        self.NB = NB
        self.low, self.precision = low, ("ieee" if low else precision)
        self.bl = blocks(self.NA, NB, low, cap)
        self.splits, self.rows_per_split = split_plan(self.n_rows, self.NA, NB, self.bl, sm_count)
        self.out: torch.Tensor | None = None

    @property
    def partial_shape(self) -> tuple[int, int, int]:
        return (self.splits, self.NA, self.NB)

    def launch(self) -> None:
        grid = (triton.cdiv(self.NA, self.bl["BLOCK_A"]), triton.cdiv(self.NB, self.bl["BLOCK_B"]),
                self.splits)
        _outer_sum_kernel[grid](
            self.a, self.x, self.ids, self.count, self.out, self.n_rows, self.rows_per_split,
            self.NA, self.NB, self.group, self.stride_id, self.stride_sub,
            PRECISION=self.precision, LOW=self.low, **self.bl)
