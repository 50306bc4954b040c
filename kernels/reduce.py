"""Step 1 of ACF: r = W_red x + b_red, once per *distinct* item of a batch.

Two gather-GEMM kernels read the feature table [N+1, M, F] directly through the
batch's distinct item ids, in the table's stored dtype (fp32, fp16, bf16 or fp64),
converting each tile to the compute dtype after the load:

- `_reduce_fwd_kernel`:   r[u*M + m, :] = table[ids[u], m, :] @ W_red^T + b_red
- `_reduce_wgrad_kernel`: dW_red = sum over rows of dr[row, :]^T table[row, :]
                          (split over row ranges; the splits are summed by the host
                          in a fixed order, so the result is deterministic: no atomics)

Why a Triton gather-GEMM and not "gather, then cuBLAS": the gathered copy is
U*M*F values (for 700 distinct items, 49 x 2048 each: 280 MB in fp32), written once
and read once (forward) and again for dW_red (backward). That copy is the largest
allocation of the whole step and roughly doubles its memory traffic; the
gather-GEMM reads each needed row of the table straight into the tile it multiplies
and never materialises it. It also lets a 16-bit table stay 16-bit until it is in
registers. The price is that a hand-written GEMM is slower than cuBLAS per FLOP;
at D = 128 the forward is one pass over the table with the whole W_red column
block resident, which is where Triton is close to cuBLAS anyway.

Precision: accumulation is in the compute dtype of the parameters (fp32 or fp64).
fp32 dots use IEEE fp32 unless the caller asks for TF32 (the backend follows
`torch.backends.cuda.matmul.allow_tf32`, i.e. the same policy as the reference's
cuBLAS matmul).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_precision, interpreting, next_pow2


@triton.jit
def _reduce_fwd_kernel(
    table_ptr, ids_ptr, w_ptr, b_ptr, out_ptr,
    n_rows, M, F, D,
    stride_item, stride_comp,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One [BLOCK_R, BLOCK_D] tile of r; rows are (distinct item, component) pairs."""
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    acc_dtype = out_ptr.dtype.element_ty

    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    item = tl.load(ids_ptr + rows // M, mask=row_ok, other=0).to(tl.int64)
    comp = (rows % M).to(tl.int64)
    # int64 offsets: a 33k x 49 x 2048 table has more than 2^31 elements
    row_base = table_ptr + item * stride_item + comp * stride_comp

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=acc_dtype)
    for k0 in range(0, F, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < F
        x = tl.load(row_base[:, None] + offs_k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(acc_dtype)
        # W_red is [D, F]; read its transpose tile [BLOCK_K, BLOCK_D]
        w = tl.load(w_ptr + offs_d[None, :].to(tl.int64) * F + offs_k[:, None],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(acc_dtype)
        acc += tl.dot(x, w, input_precision=PRECISION, out_dtype=acc_dtype)
    bias = tl.load(b_ptr + offs_d, mask=d_ok, other=0.0).to(acc_dtype)
    acc += bias[None, :]
    out = out_ptr + rows[:, None].to(tl.int64) * D + offs_d[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _reduce_wgrad_kernel(
    table_ptr, ids_ptr, dr_ptr, out_ptr,
    n_rows, rows_per_split, M, F, D,
    stride_item, stride_comp,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """partial[split, d, f] = sum over this split's rows of dr[row, d] * x[row, f]."""
    pid_d = tl.program_id(0)
    pid_f = tl.program_id(1)
    split = tl.program_id(2)
    acc_dtype = out_ptr.dtype.element_ty

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    d_ok = offs_d < D
    f_ok = offs_f < F
    row_start = split * rows_per_split
    row_stop = tl.minimum(row_start + rows_per_split, n_rows)
    acc = tl.zeros([BLOCK_D, BLOCK_F], dtype=acc_dtype)
    for r0 in range(row_start, row_stop, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < row_stop
        item = tl.load(ids_ptr + rows // M, mask=row_ok, other=0).to(tl.int64)
        comp = (rows % M).to(tl.int64)
        x = tl.load(table_ptr + (item * stride_item + comp * stride_comp)[:, None] + offs_f[None, :],
                    mask=row_ok[:, None] & f_ok[None, :], other=0.0).to(acc_dtype)
        # dr is [n_rows, D]; read its transpose tile [BLOCK_D, BLOCK_R]
        g = tl.load(dr_ptr + rows[None, :].to(tl.int64) * D + offs_d[:, None],
                    mask=d_ok[:, None] & row_ok[None, :], other=0.0)
        acc += tl.dot(g, x, input_precision=PRECISION, out_dtype=acc_dtype)
    out = out_ptr + split.to(tl.int64) * D * F + offs_d[:, None].to(tl.int64) * F + offs_f[None, :]
    tl.store(out, acc, mask=d_ok[:, None] & f_ok[None, :])


# ---------------------------------------------------------------------- launchers

def fwd_blocks(D: int) -> dict:
    """Tile sizes of `_reduce_fwd_kernel` (shared with the compile test)."""
    if interpreting():  # the interpreter runs programs one by one: few, small tiles
        return dict(BLOCK_R=16, BLOCK_D=max(16, min(64, next_pow2(D))), BLOCK_K=16)
    return dict(BLOCK_R=64, BLOCK_D=min(128, max(16, next_pow2(D))), BLOCK_K=32)


def wgrad_blocks(D: int) -> dict:
    if interpreting():
        return dict(BLOCK_R=16, BLOCK_D=max(16, min(64, next_pow2(D))), BLOCK_F=16)
    return dict(BLOCK_R=32, BLOCK_D=min(128, max(16, next_pow2(D))), BLOCK_F=64)


def reduce_items(table: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor) -> torch.Tensor:
    """r [U, M, D] = table[ids] @ weight^T + bias, without gathering table[ids]."""
    _, M, F = table.shape
    D = weight.shape[0]
    U = ids.numel()
    out = torch.empty((U, M, D), device=table.device, dtype=weight.dtype)
    if U == 0:
        return out
    assert table.stride(2) == 1, "the feature table's last dimension must be contiguous"
    weight, bias, ids = weight.contiguous(), bias.contiguous(), ids.contiguous()
    blocks = fwd_blocks(D)
    grid = (triton.cdiv(U * M, blocks["BLOCK_R"]), triton.cdiv(D, blocks["BLOCK_D"]))
    _reduce_fwd_kernel[grid](
        table, ids, weight, bias, out, U * M, M, F, D, table.stride(0), table.stride(1),
        PRECISION=dot_precision(weight.dtype, table.device), **blocks)
    return out


def reduce_weight_grad(table: torch.Tensor, ids: torch.Tensor, dr: torch.Tensor) -> torch.Tensor:
    """dW_red [D, F] = sum over (distinct item, component) rows of dr^T x."""
    _, M, F = table.shape
    U, _, D = dr.shape
    n_rows = U * M
    if n_rows == 0:
        return dr.new_zeros((D, F))
    dr = dr.contiguous()
    blocks = wgrad_blocks(D)
    tiles = triton.cdiv(D, blocks["BLOCK_D"]) * triton.cdiv(F, blocks["BLOCK_F"])
    # enough programs to fill a GPU: split the row range, sum the splits on the host
    splits = 1 if interpreting() else max(1, min(16, 264 // max(1, tiles), n_rows // 512))
    rows_per_split = triton.cdiv(triton.cdiv(n_rows, splits), blocks["BLOCK_R"]) * blocks["BLOCK_R"]
    splits = triton.cdiv(n_rows, rows_per_split)
    partial = torch.empty((splits, D, F), device=dr.device, dtype=dr.dtype)
    grid = (triton.cdiv(D, blocks["BLOCK_D"]), triton.cdiv(F, blocks["BLOCK_F"]), splits)
    _reduce_wgrad_kernel[grid](
        table, ids.contiguous(), dr, partial, n_rows, rows_per_split, M, F, D,
        table.stride(0), table.stride(1),
        PRECISION=dot_precision(dr.dtype, table.device), **blocks)
    return partial[0] if splits == 1 else partial.sum(0)
