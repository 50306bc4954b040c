"""Step 1 of ACF: r = W_red x + b_red, once per *distinct* item of a batch.

Two gather-GEMM kernels read the feature table [N+1, M, F] directly through the
batch's distinct item ids, in the table's stored dtype (fp32, fp16, bf16 or fp64):

- `_reduce_fwd_kernel`:   r[u*M + m, :] = table[ids[u], m, :] @ W_red^T + b_red
- `reduce_weight_grad`:   dW_red = sum over rows of dr[row, :]^T table[row, :], by
                          kernels.outer_sum (split-K over row ranges; the splits are
                          summed by the host in a fixed order: deterministic, no atomics)

Precision (the `LOW` constexpr):
- 16-bit table, fp32 parameters, sm_80+: tensor cores. The forward multiplies the
  16-bit rows by W_red rounded to the table's dtype; dW_red multiplies dr rounded to
  bf16 by bf16 rows, and for an fp16 table dr rounded to tf32 by the fp16 rows (exact
  in tf32). dr never goes to fp16: that would flush the tiny per-component gradients,
  ~1e-7 at B = 128, to subnormals or zero, which is why mixed-precision training keeps
  gradients in bf16 or scales the loss; and widening fp16 rows to bf16 would cost them
  3 mantissa bits (an emulation put that at 7x the fp16 reference's error). All
  accumulate in fp32. This is standard mixed precision: one extra rounding of W_red
  and of dr, each of the same size as the table's own rounding, so the error stays a
  small multiple of the reference's (which widens the 16-bit rows to fp32);
  tests/backends/test_triton_backend.py bounds it against an fp64 model.
- fp32 table (or fp64 parameters): exact fp32 (fp64) dots, IEEE unless the caller
  allows TF32 (the backend follows `torch.backends.cuda.matmul.allow_tf32`, the same
  policy as the reference's cuBLAS matmul).
- Under TRITON_INTERPRET=1 `LOW` is always off: the interpreter's bf16 `tl.dot`
  returns garbage, so 16-bit rows are widened to fp32 before the dot there. The
  tensor-core variants are covered by tests/backends/test_triton_compile.py (sm_80, sm_90)
  and by GPU runs.

Why a Triton gather-GEMM and not "gather, then cuBLAS" (measured on an H200 for the
462 distinct items of a B = 128 batch, forward + dW_red): with the old fp32-CUDA-core
kernels, gather + cuBLAS won everywhere (bf16: 0.79 vs 2.78 ms; fp32: 0.70 vs 1.23
ms). Both losses came from the kernels, not from the approach: 16-bit rows were
widened to fp32 and multiplied on CUDA cores (cuBLAS's bf16 GEMM uses tensor cores),
and the weight-gradient kernel spilled 444 registers. The gather itself costs a
write and two reads of U*M*F values (92 MB in bf16, the largest buffer of the step
and more bytes than the two GEMMs need to read), plus two launches; the gather-GEMM
reads each row once per GEMM, straight into its tile. So the kernels now use tensor
cores for 16-bit tables and tiles that do not spill (8 warps for the 128-wide
accumulators); at these sizes both GEMMs are bound by reading the rows, where a
Triton kernel with cp.async pipelining is as good as cuBLAS. benchmarks/gpu_bench.py
keeps the A/B measurement (`reduction_ab`) to re-check the choice on each GPU run.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from . import outer_sum
from ._common import dot_precision, interpreting, next_pow2


@triton.jit
def gather_gemm(row_base, row_ok, w_base, d_ok, k_stop, F, acc,
                BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, LOW: tl.constexpr):
    """acc + X W_red^T over the feature columns [0, k_stop): X's rows start at the
    pointers `row_base` (F contiguous values each; rows with row_ok False read as 0),
    W_red's rows (one per output column) at `w_base`, a [1, BLOCK_D] block of pointers.

    LOW: 16-bit x 16-bit products on tensor cores (W_red rounded to the table's dtype
    when it is not already), fp32 sums; else the rows widened to acc's dtype, PRECISION
    as the caller asks. Shared by this module's forward and the fused training step
    (kernels.train_step), which gather the same table the same way."""
    for k0 in range(0, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < F
        x = tl.load(row_base[:, None] + offs_k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # W_red is [D, F]; read its transpose tile [BLOCK_K, BLOCK_D]
        w = tl.load(w_base + offs_k[:, None], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        if LOW:
            acc = tl.dot(x, w.to(x.dtype), acc, out_dtype=tl.float32)
        else:
            acc = tl.dot(x.to(acc.dtype), w.to(acc.dtype), acc, input_precision=PRECISION,
                         out_dtype=acc.dtype)
    return acc


@triton.jit
def _reduce_fwd_kernel(
    table_ptr, ids_ptr, count_ptr, w_ptr, b_ptr, out_ptr,
    n_rows, M, F, D,
    stride_item, stride_comp,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, LOW: tl.constexpr,
):
    """One [BLOCK_R, BLOCK_D] tile of r; rows are (distinct item, component) pairs.

    count_ptr (static-shape batches, see fused_acf.distinct_items): the number of live
    items, read from device memory; rows past them are written as 0 without reading the
    table (None: every row is live, and this code is not compiled in)."""
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    acc_dtype = out_ptr.dtype.element_ty

    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    k_stop = F
    if count_ptr is not None:
        n_live = tl.load(count_ptr) * M
        k_stop = tl.where(pid_r * BLOCK_R < n_live, F, 0)
    item = tl.load(ids_ptr + rows // M, mask=row_ok, other=0).to(tl.int64)
    comp = (rows % M).to(tl.int64)
    # int64 offsets: a 33k x 49 x 2048 table has more than 2^31 elements
    row_base = table_ptr + item * stride_item + comp * stride_comp

    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    w_base = w_ptr + offs_d[None, :].to(tl.int64) * F   # LOW: W_red cast by the host
    acc = gather_gemm(row_base, row_ok, w_base, d_ok, k_stop, F,
                      tl.zeros([BLOCK_R, BLOCK_D], dtype=acc_dtype), BLOCK_K, PRECISION, LOW)
    bias = tl.load(b_ptr + offs_d, mask=d_ok, other=0.0).to(acc_dtype)
    acc += bias[None, :]
    if count_ptr is not None:
        acc = tl.where((rows < n_live)[:, None], acc, 0.0)
    out = out_ptr + rows[:, None].to(tl.int64) * D + offs_d[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------- launchers

def use_tensor_cores(table_dtype: torch.dtype, compute_dtype: torch.dtype,
                     device: torch.device, cap: int | None = None) -> bool:
    """`LOW`: 16-bit table, fp32 parameters, a real sm_80+ GPU (bf16 MMA needs Ampere;
    never under the interpreter, whose bf16 dot is wrong)."""
    if table_dtype not in (torch.float16, torch.bfloat16) or compute_dtype != torch.float32:
        return False
    if cap is None:
        if device.type != "cuda" or interpreting():
            return False
        cap = _capability(device)
    return cap >= 80


@lru_cache(maxsize=None)
def _capability(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def fwd_blocks(D: int, low: bool = False, cap: int = 90) -> dict:
    """Constexprs and launch options of `_reduce_fwd_kernel` (shared with the compile test).

    fp32 dots on CUDA cores keep their [64, 128] accumulator over 8 warps, which keeps
    the old 4-warp variant's ~254 registers and spills away. Tensor-core tiles are
    [64 rows, 128] with 64-wide K slices through 3 shared-memory stages of 16-bit rows
    and 16-bit W_red (24 KB each, 72 KB a program): three programs fit an SM, so the
    ~350 programs of a B = 128 batch (U = 462 items, 22.6k rows) run in one wave on
    132 SMs instead of two with a tail. sm_75 has 64 KB of shared memory per block."""
    if interpreting():  # the interpreter runs programs one by one: few, small tiles
        return dict(BLOCK_R=16, BLOCK_D=max(16, min(64, next_pow2(D))), BLOCK_K=16)
    block_d = min(128, max(16, next_pow2(D)))
    if low:
        return dict(BLOCK_R=64, BLOCK_D=block_d, BLOCK_K=64, num_warps=4,
                    num_stages=3 if cap >= 80 else 1)
    return dict(BLOCK_R=64, BLOCK_D=block_d, BLOCK_K=32, num_warps=8,
                num_stages=3 if cap >= 80 else 2)


def _precision(low: bool, compute_dtype: torch.dtype, device: torch.device) -> str:
    """fp32-dot precision; unused by tensor-core variants, so fixed there (toggling TF32
    then does not compile a second, identical kernel)."""
    return "ieee" if low else dot_precision(compute_dtype, device)


def _launch_info(table: torch.Tensor, compute_dtype: torch.dtype):
    low = use_tensor_cores(table.dtype, compute_dtype, table.device)
    cap = _capability(table.device) if table.device.type == "cuda" else 90
    return low, cap


def reduce_items(table: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """r [U, M, D] = table[ids] @ weight^T + bias, without gathering table[ids].

    count: an int32 [1] device tensor for static-shape batches: only ids[:count] are
    live, the rows of the others are 0 (so that products with them stay finite)."""
    _, M, F = table.shape
    D = weight.shape[0]
    U = ids.numel()
    out = torch.empty((U, M, D), device=table.device, dtype=weight.dtype)
    if U == 0:
        return out
    assert table.stride(2) == 1, "the feature table's last dimension must be contiguous"
    low, cap = _launch_info(table, weight.dtype)
    blocks = fwd_blocks(D, low, cap)
    grid = (triton.cdiv(U * M, blocks["BLOCK_R"]), triton.cdiv(D, blocks["BLOCK_D"]))
    # tensor cores: W_red rounded to the table's dtype once here (0.5 MB), rather than in
    # every program, which would also double the shared memory its tiles take
    w_op = weight.to(table.dtype) if low else weight
    _reduce_fwd_kernel[grid](
        table, ids, count, w_op, bias, out, U * M, M, F, D, table.stride(0), table.stride(1),
        PRECISION=_precision(low, weight.dtype, table.device), LOW=low, **blocks)
    return out


def reduce_weight_grad(table: torch.Tensor, ids: torch.Tensor, dr: torch.Tensor,
                       count: torch.Tensor | None = None) -> torch.Tensor:
    """dW_red [D, F] = sum over (distinct item, component) rows of dr^T x; with `count`
    (see reduce_items) over the live items' rows only. The split-K gather-GEMM of
    kernels.outer_sum (the fused training step's dW_red too); its splits are summed here."""
    _, M, F = table.shape
    U, _, D = dr.shape
    n_rows = U * M
    if n_rows == 0:
        return dr.new_zeros((D, F))
    low, cap = _launch_info(table, dr.dtype)
    sms = _sm_count(dr.device) if dr.device.type == "cuda" else 132
    plan = outer_sum.OuterSum(dr.contiguous().view(n_rows, D), table, ids, M, table.stride(0),
                              table.stride(1), F, sms, cap, low,
                              _precision(low, dr.dtype, table.device), count)
    plan.out = torch.empty(plan.partial_shape, device=dr.device, dtype=dr.dtype)
    plan.launch()
    return plan.out[0] if plan.splits == 1 else plan.out.sum(0)
