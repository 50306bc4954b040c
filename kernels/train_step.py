"""ACF's training step, forward and backward of one user, in one Triton program.

Why one program per user: everything ACF computes for a triplet (i, pos, neg) depends
only on user i's profile, except WARP's batch-global weight log(V + 1) + 1. That
weight multiplies every gradient of the batch alike, so the step computes the
gradients *unweighted* (each example's own coefficient dL_i/ds_neg) and the optimizer
kernel (acf_fast.kernels.adam) applies the weight and the mean's 1/B when it sums the
partial gradients. So no grid-wide barrier is needed, and forward, loss and backward
of a user run back to back while its activations are still in registers or in L2.

For user i with triplet t = order[cursor * order_stride + i] (the epoch's order stays
on the device, order_stride is the run's batch size, and `cursor` advances on the
device after each step, see kernels.adam):

    forward, per profile slot l holding item s (slots with id 0 are padding):
        r      = x_s W_red^T + b_red                  [M, D]  tensor cores (tl.dot)
        beta   = softmax_m(w2 . relu(r W2x^T + b2x + uu) + c2),  uu = W2u u + b2u
        xbar_l = beta^T r                             [D]
    then over the slots:
        z      = p W1p^T + b1p + xbar W1x^T + b1x + ut,  ut = W1u u + b1u
        alpha  = softmax_l(w1 . relu(z) + c1)          (0 for an empty profile)
        user   = ut + alpha^T p,   s = user . v / D
    backward from c = dL_i/ds_neg = -dL_i/ds_pos (all three losses are functions of
    s_neg - s_pos), unweighted.

Written per user (no atomics: one writer per element, so the step is deterministic):
r, dr and dxr per (slot, component) row for the weight-gradient GEMMs
(kernels.outer_sum), xbar, dz, dut, duu for the small ones, the embedding-row
gradients with their ids (summed per row by the optimizer kernel), per-user partial
sums of the vector parameters' gradients, and the loss term and violation flag.

Padding slots write zeros, so the row-wise weight-gradient GEMMs may sum over every
row without a mask. r is written by the forward loop and read back by the backward
loop of the same program: `tl.debug_barrier()` orders those accesses across threads.
"""

from __future__ import annotations

import triton
import triton.language as tl

WARP, SIGMOID, BPR = 0, 1, 2
LOSS_CODES = {"warp": WARP, "sigmoid": SIGMOID, "bpr": BPR}


@triton.jit
def _pick(vec, offs, k):
    """vec[k] as a scalar (a masked sum: Triton has no scalar indexing of a block)."""
    return tl.sum(tl.where(offs == k, vec, 0), axis=0)


@triton.jit
def _pick_row(tile, offs, k):
    """tile[k, :] of a [BLOCK_P, BLOCK_D] block."""
    return tl.sum(tl.where((offs == k)[:, None], tile, 0.0), axis=0)


@triton.jit
def _matvec(w_ptr, b_ptr, x, offs_o, o_ok, offs_i, i_ok, D):
    """W x + b for a row-major [D, D] W: indexed by output along axis 0 of W's tile."""
    w = tl.load(w_ptr + offs_o[:, None] * D + offs_i[None, :],
                mask=o_ok[:, None] & i_ok[None, :], other=0.0)
    return tl.sum(w * x[None, :], axis=1) + tl.load(b_ptr + offs_o, mask=o_ok, other=0.0)


@triton.jit
def _vecmat(w_ptr, g, offs_o, o_ok, offs_i, i_ok, D):
    """g^T W for a row-major [D, D] W (the gradient of W x with respect to x)."""
    w = tl.load(w_ptr + offs_o[:, None] * D + offs_i[None, :],
                mask=o_ok[:, None] & i_ok[None, :], other=0.0)
    return tl.sum(w * g[:, None], axis=0)


@triton.jit
def _transposed(w_ptr, offs_in, in_ok, offs_out, out_ok, D):
    """W^T of a row-major [D, D] W as a [in, out] tile: x @ W^T through tl.dot."""
    return tl.load(w_ptr + offs_out[None, :] * D + offs_in[:, None],
                   mask=in_ok[:, None] & out_ok[None, :], other=0.0)


@triton.jit
def _reduce_rows(table_ptr, item, stride_item, stride_comp, redw_ptr, redb_ptr,
                 offs_m, m_ok, offs_d, d_ok, F, D,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr, LOW: tl.constexpr):
    """r = x W_red^T + b_red for one item's M rows: a [BLOCK_M, BLOCK_D] tile, rows past M 0."""
    acc_dtype = redb_ptr.dtype.element_ty
    rows = table_ptr + item * stride_item + offs_m.to(tl.int64) * stride_comp
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc_dtype)
    for k0 in range(0, F, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < F
        x = tl.load(rows[:, None] + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(redw_ptr + offs_d[None, :].to(tl.int64) * F + offs_k[:, None],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        if LOW:  # 16-bit x 16-bit products on tensor cores, fp32 sums (see kernels.reduce)
            acc = tl.dot(x, w.to(x.dtype), acc, out_dtype=tl.float32)
        else:
            acc = tl.dot(x.to(acc_dtype), w, acc, input_precision=PRECISION, out_dtype=acc_dtype)
    acc += tl.load(redb_ptr + offs_d, mask=d_ok, other=0.0)[None, :]
    return tl.where(m_ok[:, None], acc, 0.0)


@triton.jit
def _hidden_chunk(r, u, cwx_ptr, cbx_ptr, cwu_ptr, cbu_ptr, h0, offs_h, offs_d, d_ok, D,
                  PRECISION: tl.constexpr):
    """Columns h0 .. h0 + BLOCK_H of h = r W2x^T + b2x + uu (before the relu). Chunked
    over H so that only a [D, BLOCK_H] slice of W2x is live beside r: a whole [D, D]
    tile next to r spilled (55 KB on sm_90; chunks of 32 units: 5.9 KB, of 16: 4.7 KB). uu's chunk (W2u u + b2u) is recomputed here, a [BLOCK_H, D]
    product, rather than kept as a [D] vector that a chunk could not be sliced from."""
    cols = h0 + offs_h
    h_ok = cols < D
    w_t = tl.load(cwx_ptr + cols[None, :] * D + offs_d[:, None],
                  mask=d_ok[:, None] & h_ok[None, :], other=0.0)
    bias = (tl.load(cbx_ptr + cols, mask=h_ok, other=0.0)
            + _matvec(cwu_ptr, cbu_ptr, u, cols, h_ok, offs_d, d_ok, D))
    return tl.dot(r, w_t, input_precision=PRECISION, out_dtype=r.dtype) + bias[None, :], cols, h_ok


@triton.jit
def _component_softmax(r, u, cwx_ptr, cbx_ptr, cwu_ptr, cbu_ptr, cw_ptr, cb, offs_d, d_ok,
                       m_ok, D,
                       BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, PRECISION: tl.constexpr):
    """beta of one slot: softmax_m(w2 . relu(h_m) + c2), h built chunk by chunk."""
    offs_h = tl.arange(0, BLOCK_H)
    e = tl.zeros([BLOCK_M], dtype=r.dtype)
    for h0 in range(0, D, BLOCK_H):
        h, cols, h_ok = _hidden_chunk(r, u, cwx_ptr, cbx_ptr, cwu_ptr, cbu_ptr, h0, offs_h,
                                      offs_d, d_ok, D, PRECISION)
        cw = tl.load(cw_ptr + cols, mask=h_ok, other=0.0)
        e += tl.sum(tl.maximum(h, 0.0) * cw[None, :], axis=1)
    e = tl.where(m_ok, e + cb, float("-inf"))
    p = tl.where(m_ok, tl.exp(e - tl.max(e, axis=0)), 0.0)
    return p / tl.sum(p, axis=0)


@triton.jit
def _spread(part, cols, offs_d):
    """A [BLOCK_H] chunk as a [BLOCK_D] vector (zeros outside the chunk's columns)."""
    return tl.sum(tl.where(cols[:, None] == offs_d[None, :], part[:, None], 0.0), axis=0)


@triton.jit
def _user_step_kernel(
    # the batch: triplet t = order[cursor * order_stride + i] of the triplet arrays
    order_ptr, cursor_ptr, order_stride, users_ptr, pos_ptr, neg_ptr, profiles_ptr, profile_stride,
    # the feature table and the parameters (ACFWeights order)
    table_ptr, stride_item, stride_comp,
    item_emb_ptr, prof_emb_ptr, user_emb_ptr, redw_ptr, redb_ptr,
    cwx_ptr, cbx_ptr, cwu_ptr, cbu_ptr, cw_ptr, cb_ptr,
    iwu_ptr, ibu_ptr, iwp_ptr, ibp_ptr, iwx_ptr, ibx_ptr, iw_ptr, ib_ptr,
    # outputs
    user_ids_ptr, item_ids_ptr, prof_ids_ptr,       # [B], [2B], [B*P] ids of the rows below
    duser_ptr, ditem_ptr, dprof_ptr,                # [B, D], [2B, D], [B*P, D] embedding grads
    r_ptr, dr_ptr, dxr_ptr,                         # [B*P*M, D] per (slot, component)
    xbar_ptr, dz_ptr, dut_ptr, duu_ptr,             # [B*P, D], [B*P, D], [B, D], [B, D]
    vec_ptr,                                        # [B, VEC] partial vector-parameter grads
    terms_ptr, flags_ptr, scores_ptr, step_ptr,     # [B], [B], [B, 2], Adam's step count
    B, P, M, F, D, VEC,
    LOSS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, LOW: tl.constexpr,
):
    i = tl.program_id(0)
    acc_dtype = redb_ptr.dtype.element_ty
    if step_ptr is not None:
        # Adam's step count advances here, before the optimizer kernel reads it: a write
        # in the kernel that reads it would race with its other programs
        if i == 0:
            tl.store(step_ptr, tl.load(step_ptr) + 1)
    offs_p = tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    pd_ok = p_ok[:, None] & d_ok[None, :]

    cursor = tl.load(cursor_ptr).to(tl.int64)
    t = tl.load(order_ptr + cursor * order_stride + i).to(tl.int64)
    uid = tl.load(users_ptr + t).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    neg = tl.load(neg_ptr + t).to(tl.int64)
    prof = tl.load(profiles_ptr + t * profile_stride + offs_p, mask=p_ok, other=0).to(tl.int64)
    valid = (prof > 0) & p_ok
    prof = tl.where(valid, prof, 0)
    tl.store(user_ids_ptr + i, uid)
    tl.store(item_ids_ptr + i, pos)
    tl.store(item_ids_ptr + B + i, neg)
    tl.store(prof_ids_ptr + i * P + offs_p, prof, mask=p_ok)

    u = tl.load(user_emb_ptr + uid * D + offs_d, mask=d_ok, other=0.0)
    ut = _matvec(iwu_ptr, ibu_ptr, u, offs_d, d_ok, offs_d, d_ok, D)
    cb = tl.load(cb_ptr)
    tile = offs_m[:, None] * D + offs_d[None, :]
    tile_ok = m_ok[:, None] & d_ok[None, :]

    # ---------------------------------------------------------------- forward, per slot
    xbar = tl.zeros([BLOCK_P, BLOCK_D], dtype=acc_dtype)
    for l in range(0, P):
        slot = (i * P + l).to(tl.int64)
        item = _pick(prof, offs_p, l)
        if item > 0:
            r = _reduce_rows(table_ptr, item, stride_item, stride_comp, redw_ptr, redb_ptr,
                             offs_m, m_ok, offs_d, d_ok, F, D, BLOCK_M, BLOCK_D, BLOCK_K,
                             PRECISION, LOW)
            beta = _component_softmax(r, u, cwx_ptr, cbx_ptr, cwu_ptr, cbu_ptr, cw_ptr, cb,
                                      offs_d, d_ok, m_ok, D, BLOCK_M, BLOCK_H, PRECISION)
            xbar = tl.where((offs_p == l)[:, None], tl.sum(beta[:, None] * r, axis=0)[None, :], xbar)
            tl.store(r_ptr + slot * M * D + tile, r, mask=tile_ok)
        else:
            tl.store(r_ptr + slot * M * D + tile, tl.zeros([BLOCK_M, BLOCK_D], acc_dtype), mask=tile_ok)
    tl.store(xbar_ptr + (i * P + offs_p[:, None]) * D + offs_d[None, :], xbar, mask=pd_ok)

    # ---------------------------------------------------------------- item attention
    p_rows = tl.load(prof_emb_ptr + prof[:, None] * D + offs_d[None, :],
                     mask=valid[:, None] & d_ok[None, :], other=0.0)
    z = (tl.dot(p_rows, _transposed(iwp_ptr, offs_d, d_ok, offs_d, d_ok, D),
                input_precision=PRECISION, out_dtype=acc_dtype)
         + tl.dot(xbar, _transposed(iwx_ptr, offs_d, d_ok, offs_d, d_ok, D),
                  input_precision=PRECISION, out_dtype=acc_dtype)
         + (tl.load(ibp_ptr + offs_d, mask=d_ok, other=0.0)
            + tl.load(ibx_ptr + offs_d, mask=d_ok, other=0.0) + ut)[None, :])
    w1 = tl.load(iw_ptr + offs_d, mask=d_ok, other=0.0)
    a = tl.sum(tl.maximum(z, 0.0) * w1[None, :], axis=1) + tl.load(ib_ptr)
    a = tl.where(valid, a, float("-inf"))
    a_max = tl.max(a, axis=0)
    a_max = tl.where(a_max == float("-inf"), 0.0, a_max)   # an empty profile: keep exp finite
    ea = tl.where(valid, tl.exp(a - a_max), 0.0)
    denom = tl.sum(ea, axis=0)
    alpha = ea / tl.where(denom > 0, denom, 1.0)           # an empty profile: alpha = 0
    user = ut + tl.sum(alpha[:, None] * p_rows, axis=0)
    v_pos = tl.load(item_emb_ptr + pos * D + offs_d, mask=d_ok, other=0.0)
    v_neg = tl.load(item_emb_ptr + neg * D + offs_d, mask=d_ok, other=0.0)
    s_pos = tl.sum(user * v_pos, axis=0) / D
    s_neg = tl.sum(user * v_neg, axis=0) / D
    tl.store(scores_ptr + 2 * i, s_pos)
    tl.store(scores_ptr + 2 * i + 1, s_neg)

    # ---------------------------------------------------------------- loss term
    # coef = d term / d s_neg = -d term / d s_pos; flag: WARP's violation indicator
    x = s_neg - s_pos
    if LOSS == 2:    # BPR: softplus(s_neg - s_pos)
        term = tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
        coef = 1.0 / (1.0 + tl.exp(-x))
        flag = coef * 0.0
    elif LOSS == 1:  # the tutorial's sigmoid loss, sigmoid(s_neg - s_pos + 0)
        term = 1.0 / (1.0 + tl.exp(-x))
        coef = term * (1.0 - term)
        flag = coef * 0.0
    else:            # WARP: sigmoid(s_neg - s_pos + 1) where it exceeds 1/2, unweighted
        sig = 1.0 / (1.0 + tl.exp(-(x + 1.0)))
        flag = tl.where(sig > 0.5, 1.0, 0.0).to(sig.dtype)
        term = sig * flag
        coef = term * (1.0 - sig)
    tl.store(terms_ptr + i, term)
    tl.store(flags_ptr + i, flag)

    # ---------------------------------------------------------------- backward, item side
    duser = coef * (v_neg - v_pos) / D
    tl.store(ditem_ptr + i * D + offs_d, -coef * user / D, mask=d_ok)
    tl.store(ditem_ptr + (B + i) * D + offs_d, coef * user / D, mask=d_ok)
    dalpha = tl.sum(p_rows * duser[None, :], axis=1)
    da = alpha * (dalpha - tl.sum(alpha * dalpha, axis=0))
    dz = tl.where(z > 0, da[:, None] * w1[None, :], 0.0)
    tl.store(dz_ptr + (i * P + offs_p[:, None]) * D + offs_d[None, :], dz, mask=pd_ok)
    iwp = tl.load(iwp_ptr + offs_d[:, None] * D + offs_d[None, :],
                  mask=d_ok[:, None] & d_ok[None, :], other=0.0)
    dp = alpha[:, None] * duser[None, :] + tl.dot(dz, iwp, input_precision=PRECISION,
                                                    out_dtype=acc_dtype)
    tl.store(dprof_ptr + (i * P + offs_p[:, None]) * D + offs_d[None, :], dp, mask=pd_ok)
    iwx = tl.load(iwx_ptr + offs_d[:, None] * D + offs_d[None, :],
                  mask=d_ok[:, None] & d_ok[None, :], other=0.0)
    dxbar = tl.dot(dz, iwx, input_precision=PRECISION, out_dtype=acc_dtype)
    dut = duser + tl.sum(dz, axis=0)
    tl.store(dut_ptr + i * D + offs_d, dut, mask=d_ok)
    vec = vec_ptr + i * VEC
    tl.store(vec + offs_d, tl.sum(da[:, None] * tl.maximum(z, 0.0), axis=0), mask=d_ok)  # w1
    tl.store(vec + D + offs_d, tl.sum(dz, axis=0), mask=d_ok)                          # b1p, b1x
    tl.store(vec + 4 * D, tl.sum(da, axis=0))                                          # c1

    # ---------------------------------------------------------------- backward, per slot
    tl.debug_barrier()   # r was stored above by other threads of this program
    offs_h = tl.arange(0, BLOCK_H)
    duu = tl.zeros([BLOCK_D], dtype=acc_dtype)
    dcw = tl.zeros([BLOCK_D], dtype=acc_dtype)
    dredb = tl.zeros([BLOCK_D], dtype=acc_dtype)
    dcb = tl.sum(tl.zeros([BLOCK_D], dtype=acc_dtype), axis=0)
    for l in range(0, P):
        slot = (i * P + l).to(tl.int64)
        item = _pick(prof, offs_p, l)
        if item > 0:
            r = tl.load(r_ptr + slot * M * D + tile, mask=tile_ok, other=0.0)
            beta = _component_softmax(r, u, cwx_ptr, cbx_ptr, cwu_ptr, cbu_ptr, cw_ptr, cb,
                                      offs_d, d_ok, m_ok, D, BLOCK_M, BLOCK_H, PRECISION)
            g = _pick_row(dxbar, offs_p, l)
            dbeta = tl.sum(r * g[None, :], axis=1)
            de = beta * (dbeta - tl.sum(beta * dbeta, axis=0))
            dr = beta[:, None] * g[None, :]
            for h0 in range(0, D, BLOCK_H):
                h, cols, h_ok = _hidden_chunk(r, u, cwx_ptr, cbx_ptr, cwu_ptr, cbu_ptr, h0,
                                              offs_h, offs_d, d_ok, D, PRECISION)
                cw = tl.load(cw_ptr + cols, mask=h_ok, other=0.0)
                dxr = tl.where(h > 0, de[:, None] * cw[None, :], 0.0)
                w = tl.load(cwx_ptr + cols[:, None] * D + offs_d[None, :],
                            mask=h_ok[:, None] & d_ok[None, :], other=0.0)
                dr += tl.dot(dxr, w, input_precision=PRECISION, out_dtype=acc_dtype)
                duu += _spread(tl.sum(dxr, axis=0), cols, offs_d)
                dcw += _spread(tl.sum(de[:, None] * tl.maximum(h, 0.0), axis=0), cols, offs_d)
                tl.store(dxr_ptr + slot * M * D + offs_m[:, None] * D + cols[None, :], dxr,
                         mask=m_ok[:, None] & h_ok[None, :])
            dr = tl.where(tile_ok, dr, 0.0)
            dcb += tl.sum(de, axis=0)
            dredb += tl.sum(dr, axis=0)
            tl.store(dr_ptr + slot * M * D + tile, dr, mask=tile_ok)
        else:
            zero = tl.zeros([BLOCK_M, BLOCK_D], acc_dtype)
            tl.store(dr_ptr + slot * M * D + tile, zero, mask=tile_ok)
            tl.store(dxr_ptr + slot * M * D + tile, zero, mask=tile_ok)
    tl.store(duu_ptr + i * D + offs_d, duu, mask=d_ok)
    tl.store(vec + 2 * D + offs_d, dcw, mask=d_ok)       # w2
    tl.store(vec + 3 * D + offs_d, dredb, mask=d_ok)     # b_red
    tl.store(vec + 4 * D + 1, dcb)                       # c2
    du = (_vecmat(iwu_ptr, dut, offs_d, d_ok, offs_d, d_ok, D)
          + _vecmat(cwu_ptr, duu, offs_d, d_ok, offs_d, d_ok, D))
    tl.store(duser_ptr + i * D + offs_d, du, mask=d_ok)


def blocks(P: int, M: int, D: int, low: bool, cap: int = 90) -> dict:
    """Tiles and launch options of `_user_step_kernel` (shared with the compile test).

    The whole model dimension is one tile (BLOCK_D >= D): the user's vectors, the item
    attention's [BLOCK_P, D] tiles and one slot's [BLOCK_M, D] r stay in registers; the
    [D, D] weights are re-read per use from L2 rather than held."""
    from ._common import interpreting, next_pow2

    block_d = max(16, next_pow2(D))
    out = dict(BLOCK_P=max(16, next_pow2(P)), BLOCK_M=max(16, next_pow2(M)), BLOCK_D=block_d,
               BLOCK_H=16)   # 16 hidden units a chunk: the fewest spills measured on sm_90
    if interpreting():
        return dict(out, BLOCK_K=16)
    return dict(out, BLOCK_K=64 if low else 32, num_warps=16, num_stages=2 if cap >= 80 else 1)
