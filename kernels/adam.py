"""torch.optim.Adam over every parameter of the model in one launch.

The parameters, Adam's two moments and the step's partial gradients live in flat
buffers (acf_fast.training.fused_step places the module's parameters as views into
the parameter buffer). The gradient of each parameter arrives in pieces that this
kernel sums in a fixed order (no atomics anywhere, so the step is deterministic):

- dense partials: the splits of a split-K weight gradient (kernels.outer_sum) or the
  per-user partial sums of a vector parameter (kernels.train_step), `n_parts` slabs
  `part_stride` apart;
- embedding rows: the per-id sums of kernels.embedding_grad, a dense buffer shaped like
  the embedding tables (zero where the batch has no id), which this kernel clears as
  it reads it, ready for the next step.

The batch-global loss scale is applied here: the mean's 1/B, and for WARP the weight
log(V + 1) + 1 of the batch's V violations (kernels.train_step computes every
gradient unweighted, see there). Program 0 also writes the batch's loss and advances
the epoch cursor.

The arithmetic is torch.optim.Adam's (foreach/fused, amsgrad=False): g += wd * p;
m = lerp(m, g, 1 - beta1); v = beta2 v + (1 - beta2) g^2; p -= lr / (1 - beta1^t) *
m / (sqrt(v) / sqrt(1 - beta2^t) + eps), with t the step count after this step
(advanced by kernels.train_step, which runs first). Hyper-parameters: `hyper_ptr` =
[lr, beta1, beta2, eps, weight_decay] in the parameters' dtype.

Segment table, one int64 row per parameter (`SEG_FIELDS`): the first program of the
segment, its numel, its offset in the flat buffers, where its dense partials start,
their stride and count, and where its rows start in the embedding-gradient buffer (-1:
not an embedding table).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import segment_row

SEG_FIELDS = ("first_block", "numel", "offset", "part_offset", "part_stride", "n_parts",
              "emb_offset")
N_FIELDS = len(SEG_FIELDS)


@triton.jit
def _adam_kernel(
    p_ptr, m_ptr, v_ptr, part_ptr, seg_ptr, n_seg, emb_ptr,
    terms_ptr, flags_ptr, B, loss_ptr, step_ptr, cursor_ptr, hyper_ptr,
    WARP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr,
    N_FIELDS: tl.constexpr,
):
    pid = tl.program_id(0)
    dtype = p_ptr.dtype.element_ty
    row_ptr = segment_row(pid, seg_ptr, n_seg, N_FIELDS)   # the parameter it updates
    first = tl.load(row_ptr)
    numel = tl.load(row_ptr + 1)
    offset = tl.load(row_ptr + 2)
    part_offset = tl.load(row_ptr + 3)
    part_stride = tl.load(row_ptr + 4)
    n_parts = tl.load(row_ptr + 5)
    emb_offset = tl.load(row_ptr + 6)

    local = (pid - first) * BLOCK + tl.arange(0, BLOCK)
    ok = local < numel
    g = tl.zeros([BLOCK], dtype=dtype)
    for k in range(0, n_parts):
        g += tl.load(part_ptr + part_offset + k * part_stride + local, mask=ok, other=0.0)
    if emb_offset >= 0:
        rows = emb_ptr + emb_offset + local
        summed = tl.load(rows, mask=ok, other=0.0)
        g += summed
        # zero again for the next step, written only where it is not (a -0.0 left behind
        # adds nothing); NaN != 0, so a diverged step's rows are cleared too
        tl.store(rows, tl.zeros([BLOCK], dtype=dtype), mask=ok & (summed != 0))

    # the loss scale: the mean's 1 / B, times WARP's weight of the batch's violations
    offs_b = tl.arange(0, BLOCK_B)
    terms = tl.zeros([BLOCK_B], dtype=dtype)
    violations = tl.zeros([BLOCK_B], dtype=dtype)
    for b0 in range(0, B, BLOCK_B):
        b_ok = b0 + offs_b < B
        if WARP:
            violations += tl.load(flags_ptr + b0 + offs_b, mask=b_ok, other=0.0)
        terms += tl.load(terms_ptr + b0 + offs_b, mask=b_ok, other=0.0)
    zero = tl.sum(terms, axis=0) * 0.0          # 0 in the parameters' dtype
    scale = (zero + 1.0) / (zero + B)
    if WARP:
        scale = scale * (tl.log(tl.sum(violations, axis=0) + 1.0) + 1.0)
    if pid == 0:
        tl.store(loss_ptr, scale * tl.sum(terms, axis=0))
        if cursor_ptr is not None:
            tl.store(cursor_ptr, tl.load(cursor_ptr) + 1)

    # hyper-parameters from device memory, in the parameters' dtype: exact for float64
    # models (a Python float argument would be rounded to float32), and a schedule may
    # change the learning rate between replays of a captured step
    lr = tl.load(hyper_ptr)
    beta1 = tl.load(hyper_ptr + 1)
    beta2 = tl.load(hyper_ptr + 2)
    eps = tl.load(hyper_ptr + 3)
    weight_decay = tl.load(hyper_ptr + 4)
    p = tl.load(p_ptr + offset + local, mask=ok, other=0.0)
    m = tl.load(m_ptr + offset + local, mask=ok, other=0.0)
    v = tl.load(v_ptr + offset + local, mask=ok, other=0.0)
    g = g * scale + weight_decay * p
    m = m + (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * g * g
    t = tl.load(step_ptr).to(dtype)
    correction1 = 1.0 - tl.exp(t * tl.log(beta1))
    correction2 = 1.0 - tl.exp(t * tl.log(beta2))
    denom = tl.sqrt(v) / tl.sqrt(correction2) + eps
    p = p - (lr / correction1) * m / denom
    tl.store(p_ptr + offset + local, p, mask=ok)
    tl.store(m_ptr + offset + local, m, mask=ok)
    tl.store(v_ptr + offset + local, v, mask=ok)


def blocks(cap: int = 90) -> dict:
    """Constexprs and launch options of `_adam_kernel` (shared with the compile test):
    512 elements a program, 2 per thread on 8 warps."""
    from ._common import interpreting

    out = dict(BLOCK=512, BLOCK_B=128)
    return out if interpreting() else dict(out, num_warps=8)
