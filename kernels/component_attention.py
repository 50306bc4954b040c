"""Steps 2-3 of ACF: component attention over the M grid cells of each profile item.

For user i and profile slot l holding distinct item s (slot_item = -1 for padding):

    h_lm    = relu(xr[s, m] + uu_i)          xr = r W2x^T + b2x  (per distinct item)
    e_lm    = w2 . h_lm + c2                 uu = u W2u^T + b2u  (per user)
    beta_l  = softmax_m(e_l)
    xbar_l  = sum_m beta_lm r[s, m]          (0 on padded slots)

The two small projections xr and uu are cuBLAS matmuls done by the host (they are
per distinct item / per user, not per (user, slot, component)); everything per
(user, slot, component) happens here, in registers: the [B, P, M, H] hidden
activations are never written to global memory, in either direction.

Kernels:
- `_component_fwd_kernel`        one program per (user, slot): e, softmax, xbar
  (and beta when attentions are asked for).
- `_component_bwd_slot_kernel`   one program per (user, slot): recomputes e and its
  softmax beta (flash-attention style: nothing per component is saved) and writes the
  per-slot beta, de ([B*P, M]) and
  the per-slot partial gradients of uu and w2 ([B*P, H]).
- `_component_bwd_item_kernel`   one program per (distinct item, column block):
  walks the slots that hold that item (a CSR list sorted by item) and sums their
  contributions to dr[s] and dxr[s] in registers.

No atomics: every output element has exactly one writer and every sum runs in a
fixed order, so forward and backward are bitwise deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import chunk, next_pow2


@triton.jit
def _component_logits(xr_item_ptr, uu_row_ptr, w2_ptr, c2_ptr, row_ok, offs_m, m_ok, H,
                      BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """e [BLOCK_M] of one (user, slot); rows past M are -inf. xr_item_ptr -> xr[s, 0, 0];
    row_ok = m_ok on a real slot, all False on a padded one (then xr reads as 0)."""
    acc_dtype = uu_row_ptr.dtype.element_ty
    e = tl.zeros([BLOCK_M], dtype=acc_dtype)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        xr = tl.load(xr_item_ptr + offs_m[:, None] * H + offs_h[None, :],
                     mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        uu = tl.load(uu_row_ptr + offs_h, mask=h_ok, other=0.0)
        w2 = tl.load(w2_ptr + offs_h, mask=h_ok, other=0.0)
        e += tl.sum(tl.maximum(xr + uu[None, :], 0.0) * w2[None, :], axis=1)
    e += tl.load(c2_ptr)
    return tl.where(m_ok, e, float("-inf"))


@triton.jit
def _component_fwd_kernel(
    r_ptr, xr_ptr, uu_ptr, w2_ptr, c2_ptr, slot_item_ptr,
    xbar_ptr, beta_ptr,
    P, M, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, STORE_BETA: tl.constexpr,
):
    slot = tl.program_id(0)  # = i * P + l
    i = slot // P
    s = tl.load(slot_item_ptr + slot)
    valid = s >= 0
    s_safe = tl.maximum(s, 0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    # the slot test broadcast as a vector (the interpreter mishandles scalar & vector masks)
    row_ok = m_ok & ((offs_m * 0 + s) >= 0)
    item_base = s_safe * M * D  # r and xr are both [U, M, D] (H = D)

    e = _component_logits(xr_ptr + item_base, uu_ptr + i * D, w2_ptr, c2_ptr, row_ok,
                          offs_m, m_ok, D, BLOCK_M, BLOCK_D)
    e_max = tl.max(e, axis=0)
    p = tl.exp(e - e_max)
    denom = tl.sum(p, axis=0)
    beta = tl.where(valid, p / denom, 0.0)
    if STORE_BETA:
        tl.store(beta_ptr + slot * M + offs_m, beta, mask=m_ok)

    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        r = tl.load(r_ptr + item_base + offs_m[:, None] * D + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        tl.store(xbar_ptr + slot * D + offs_d, tl.sum(beta[:, None] * r, axis=0), mask=d_ok)


@triton.jit
def _component_bwd_slot_kernel(
    r_ptr, xr_ptr, uu_ptr, w2_ptr, c2_ptr, slot_item_ptr, dxbar_ptr,
    beta_ptr, de_ptr, duu_ptr, dw2_ptr,
    P, M, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    slot = tl.program_id(0)
    i = slot // P
    s = tl.load(slot_item_ptr + slot)
    s_safe = tl.maximum(s, 0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    # the slot test broadcast as a vector (the interpreter mishandles scalar & vector masks)
    row_ok = m_ok & ((offs_m * 0 + s) >= 0)
    item_base = s_safe * M * D

    # beta by a full softmax of the recomputed logits (they are in registers, so the max
    # and the sum cost nothing): exp(e - lse) from a saved log-sum-exp would lose up to
    # ulp(lse) of relative accuracy, 3e-5 in float32 at |lse| ~ 400, and the gradients
    # inherit it; e - max is exact where it matters.
    e = _component_logits(xr_ptr + item_base, uu_ptr + i * D, w2_ptr, c2_ptr, row_ok,
                          offs_m, m_ok, D, BLOCK_M, BLOCK_D)
    e = tl.where(row_ok, e, float("-inf"))
    e_max = tl.max(e, axis=0)
    e_max = tl.where(e_max == float("-inf"), 0.0, e_max)   # a padded slot: every row masked
    p = tl.where(row_ok, tl.exp(e - e_max), 0.0)
    beta = p / tl.maximum(tl.sum(p, axis=0), 1e-30)

    # d beta_m = dxbar . r_m ;  de = beta * (dbeta - sum_m beta dbeta)   (softmax backward)
    dbeta = tl.zeros([BLOCK_M], dtype=beta.dtype)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        r = tl.load(r_ptr + item_base + offs_m[:, None] * D + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        g = tl.load(dxbar_ptr + slot * D + offs_d, mask=d_ok, other=0.0)
        dbeta += tl.sum(r * g[None, :], axis=1)
    de = beta * (dbeta - tl.sum(beta * dbeta, axis=0))
    tl.store(beta_ptr + slot * M + offs_m, beta, mask=m_ok)
    tl.store(de_ptr + slot * M + offs_m, de, mask=m_ok)

    # h = relu(xr + uu): dh = de * w2 * [h > 0];  duu = sum_m dh;  dw2 = sum_m de * h
    for h0 in range(0, D, BLOCK_D):
        offs_h = h0 + tl.arange(0, BLOCK_D)
        h_ok = offs_h < D
        xr = tl.load(xr_ptr + item_base + offs_m[:, None] * D + offs_h[None, :],
                     mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        uu = tl.load(uu_ptr + i * D + offs_h, mask=h_ok, other=0.0)
        w2 = tl.load(w2_ptr + offs_h, mask=h_ok, other=0.0)
        pre = xr + uu[None, :]
        dh = tl.where(pre > 0, de[:, None] * w2[None, :], 0.0)
        tl.store(duu_ptr + slot * D + offs_h, tl.sum(dh, axis=0), mask=h_ok)
        tl.store(dw2_ptr + slot * D + offs_h,
                 tl.sum(de[:, None] * tl.maximum(pre, 0.0), axis=0), mask=h_ok)


@triton.jit
def _component_bwd_item_kernel(
    xr_ptr, uu_ptr, w2_ptr, beta_ptr, de_ptr, dxbar_ptr, item_start_ptr, slot_order_ptr,
    dr_ptr, dxr_ptr,
    P, M, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    tile = s * M * D + offs_m[:, None] * D + offs_d[None, :]
    tile_ok = m_ok[:, None] & d_ok[None, :]

    xr = tl.load(xr_ptr + tile, mask=tile_ok, other=0.0)
    w2 = tl.load(w2_ptr + offs_d, mask=d_ok, other=0.0)
    acc_r = tl.zeros([BLOCK_M, BLOCK_D], dtype=xr.dtype)
    acc_x = tl.zeros([BLOCK_M, BLOCK_D], dtype=xr.dtype)
    start = tl.load(item_start_ptr + s)
    stop = tl.load(item_start_ptr + s + 1)
    for k in range(start, stop):
        slot = tl.load(slot_order_ptr + k)
        i = slot // P
        beta = tl.load(beta_ptr + slot * M + offs_m, mask=m_ok, other=0.0)
        de = tl.load(de_ptr + slot * M + offs_m, mask=m_ok, other=0.0)
        g = tl.load(dxbar_ptr + slot * D + offs_d, mask=d_ok, other=0.0)
        uu = tl.load(uu_ptr + i * D + offs_d, mask=d_ok, other=0.0)
        acc_r += beta[:, None] * g[None, :]
        acc_x += tl.where(xr + uu[None, :] > 0, de[:, None] * w2[None, :], 0.0)
    tl.store(dr_ptr + tile, acc_r, mask=tile_ok)
    tl.store(dxr_ptr + tile, acc_x, mask=tile_ok)


# ---------------------------------------------------------------------- launchers

def blocks(M: int, D: int) -> dict:
    """Tile sizes of all three kernels (shared with the compile test)."""
    return dict(BLOCK_M=max(16, next_pow2(M)), BLOCK_D=chunk(D, 64 if M <= 64 else 32))


def _readable(t: torch.Tensor) -> torch.Tensor:
    """An empty tensor has a null data pointer, which Triton's CUDA launcher rejects even
    when every load is masked (a batch whose profiles are all empty has no items)."""
    return t if t.numel() else t.new_zeros((1,))


def component_forward(r, xr, uu, w2, c2, slot_item, store_beta: bool):
    """-> xbar [B, P, D], beta [B, P, M] (None unless store_beta)."""
    B, P = slot_item.shape
    U, M, D = r.shape
    xbar = r.new_empty((B, P, D))
    beta = r.new_zeros((B, P, M)) if store_beta else r.new_empty((1,))
    if B * P == 0:
        return xbar, (r.new_zeros((B, P, M)) if store_beta else None)
    _component_fwd_kernel[(B * P,)](
        _readable(r), _readable(xr), uu, w2, c2, slot_item, xbar, beta, P, M, D,
        STORE_BETA=store_beta, **blocks(M, D))
    return xbar, (beta if store_beta else None)


def component_backward(r, xr, uu, w2, c2, slot_item, dxbar, item_start, slot_order):
    """-> dr [U, M, D], dxr [U, M, D], duu [B, D], dw2 [D], dc2 [1]."""
    B, P = slot_item.shape
    U, M, D = r.shape
    bl = blocks(M, D)
    dxbar = dxbar.contiguous()
    beta = r.new_empty((B * P, M))
    de = r.new_empty((B * P, M))
    duu_part = r.new_empty((B * P, D))
    dw2_part = r.new_empty((B * P, D))
    if B * P:
        _component_bwd_slot_kernel[(B * P,)](
            _readable(r), _readable(xr), uu, w2, c2, slot_item, dxbar,
            beta, de, duu_part, dw2_part, P, M, D, **bl)
    dr = torch.empty_like(r)
    dxr = torch.empty_like(r)
    if U:
        _component_bwd_item_kernel[(U, triton.cdiv(D, bl["BLOCK_D"]))](
            xr, uu, w2, beta, de, dxbar, item_start, slot_order, dr, dxr, P, M, D, **bl)
    duu = duu_part.view(B, P, D).sum(1)
    return dr, dxr, duu, dw2_part.sum(0), de.sum().reshape(1)
