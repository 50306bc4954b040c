"""ACF's training step, forward and backward, in three Triton launches.

Why this split: everything ACF computes for a triplet (i, pos, neg) depends only on
user i's profile, except WARP's batch-global weight log(V + 1) + 1. That weight
multiplies every gradient of the batch alike, so the step computes the gradients
*unweighted* (each example's own coefficient dL_i/ds_neg) and the optimizer kernel
(acf_fast.kernels.adam) applies the weight and the mean's 1/B when it sums the
partial gradients: no grid-wide barrier is needed. Within a user, the item attention
needs every slot's xbar and each slot's backward needs the item attention's dz, so a
user's work is three phases, one launch each:

    _slot_forward_kernel   one program per profile slot (B * P)
    _user_step_kernel      one program per user (B)
    _slot_backward_kernel  one program per profile slot (B * P)

A slot's [49, 128] activations are the bulk of the work. One program per user, looping
over its slots, kept a slot's r, its hidden layer and their gradients in registers
beside the user's item-attention tiles and spilled on sm_90 (4.7 KB with an fp32
table, 3.2 KB with bf16); a program per slot holds one slot's tiles only, and B * P
programs (1,152 at B = 128) fill the GPU where B did one program per SM.

For user i with triplet t = order[cursor * order_stride + i] (the epoch's order stays
on the device, order_stride is the run's batch size, and `cursor` advances on the
device after each step, see kernels.adam), per profile slot l holding item s (id 0
is padding):

    r      = x_s W_red^T + b_red                   [M, D]  tensor cores (tl.dot)
    h      = r W2x^T + b2x + uu,  uu = W2u u + b2u
    beta   = softmax_m(w2 . relu(h) + c2),  xbar_l = beta^T r          (slot forward)
    z      = p W1p^T + b1p + xbar W1x^T + b1x + ut,  ut = W1u u + b1u
    alpha  = softmax_l(w1 . relu(z) + c1)           (0 for an empty profile)
    user   = ut + alpha^T p,   s = user . v / D                         (user step)

and the backward from c = dL_i/ds_neg = -dL_i/ds_pos (all three losses are functions
of s_neg - s_pos): the user step down to dz and dxbar_l = dz_l W1x, the slot backward
from there to dr and dxr.

Written (no atomics: one writer per element, so the step is deterministic): r, dr and
dxr per (slot, component) row for the weight-gradient GEMMs (kernels.outer_sum); xbar,
dz, dut and per-slot duu for the small ones; the embedding-row gradients with their
ids (summed per row by the optimizer kernel: a user's row comes as one piece from the
user step and one from each of its slots); per-user and per-slot partial sums of the
vector parameters' gradients; the loss term and violation flag. Padding slots write
zeros, so the row-wise weight-gradient GEMMs may sum over every row without a mask.

Products with a [D, D] weight read their left operand back from memory in column
chunks (_rows_dot), after a `tl.debug_barrier()` that makes this program's stores of
it visible to all its threads.
"""


from __future__ import annotations

import triton
import triton.language as tl

from .reduce import gather_gemm

WARP, SIGMOID, BPR = 0, 1, 2
LOSS_CODES = {"warp": WARP, "sigmoid": SIGMOID, "bpr": BPR}


@triton.jit
def _matvec(w_ptr, x_ptr, offs_d, d_ok, D, acc, TRANSPOSED: tl.constexpr, BLOCK_KD: tl.constexpr):
    """acc + W x (or acc + W^T x, TRANSPOSED) for a row-major [D, D] W, with x read from
    memory in chunks of BLOCK_KD: a whole [D, D] tile would take 32 registers a thread."""
    for k0 in range(0, D, BLOCK_KD):
        offs_k = k0 + tl.arange(0, BLOCK_KD)
        k_ok = offs_k < D
        x = tl.load(x_ptr + offs_k, mask=k_ok, other=0.0)
        if TRANSPOSED:   # sum_k W[k, j] x[k]
            w = tl.load(w_ptr + offs_k[:, None] * D + offs_d[None, :],
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            acc += tl.sum(w * x[:, None], axis=0)
        else:            # sum_k W[j, k] x[k]
            w = tl.load(w_ptr + offs_d[:, None] * D + offs_k[None, :],
                        mask=d_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.sum(w * x[None, :], axis=1)
    return acc


@triton.jit
def _rows_dot(a_rows, a_ok, w_ptr, offs_d, d_ok, D, acc,
              TRANSPOSED: tl.constexpr, BLOCK_KD: tl.constexpr, PRECISION: tl.constexpr):
    """acc + A W^T (TRANSPOSED) or acc + A W: A's rows start at the pointers `a_rows`
    (D contiguous values each, rows with a_ok False read as 0), W a row-major [D, D].

    The contraction runs over chunks of BLOCK_KD columns of A read from memory (an
    activation this program has just stored, so L1/L2), never over a whole [rows, D]
    operand held in registers: on CUDA cores (fp32 "ieee") a dot keeps each thread's
    rows and columns of both operands over the full K, and with K = D = 128 that
    spilled kilobytes on sm_90."""
    for k0 in range(0, D, BLOCK_KD):
        offs_k = k0 + tl.arange(0, BLOCK_KD)
        k_ok = offs_k < D
        a = tl.load(a_rows[:, None] + offs_k[None, :], mask=a_ok[:, None] & k_ok[None, :],
                    other=0.0)
        if TRANSPOSED:   # W^T[k, j] = W[j, k]
            w = tl.load(w_ptr + offs_d[None, :] * D + offs_k[:, None],
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            w = tl.load(w_ptr + offs_k[:, None] * D + offs_d[None, :],
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return acc


@triton.jit
def _reduce_rows(table_ptr, item, stride_item, stride_comp, redw_ptr, redb_ptr,
                 offs_m, m_ok, offs_d, d_ok, F, D,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr, LOW: tl.constexpr):
    """r = x W_red^T + b_red for one item's M rows: a [BLOCK_M, BLOCK_D] tile, rows past M 0."""
    rows = table_ptr + item * stride_item + offs_m.to(tl.int64) * stride_comp
    acc = gather_gemm(rows, m_ok, redw_ptr + offs_d[None, :].to(tl.int64) * F, d_ok, F, F,
                      tl.zeros([BLOCK_M, BLOCK_D], dtype=redb_ptr.dtype.element_ty), BLOCK_K,
                      PRECISION, LOW)   # LOW: W_red (fp32) rounded to the table's dtype there
    acc += tl.load(redb_ptr + offs_d, mask=d_ok, other=0.0)[None, :]
    return tl.where(m_ok[:, None], acc, 0.0)


@triton.jit
def _component_scores(r_rows, m_ok, uu, cwx_ptr, cbx_ptr, cw_ptr, cb_ptr, offs_d, d_ok, D,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KD: tl.constexpr,
                      PRECISION: tl.constexpr):
    """(h, beta) of one slot: h = r W2x^T + b2x + uu before the relu, [BLOCK_M, BLOCK_D],
    and beta = softmax_m(w2 . relu(h) + c2), with r read from memory at `r_rows`."""
    h = tl.zeros([BLOCK_M, BLOCK_D], dtype=uu.dtype)
    h = _rows_dot(r_rows, m_ok, cwx_ptr, offs_d, d_ok, D, h, True, BLOCK_KD, PRECISION)
    h += (tl.load(cbx_ptr + offs_d, mask=d_ok, other=0.0) + uu)[None, :]
    cw = tl.load(cw_ptr + offs_d, mask=d_ok, other=0.0)
    e = tl.sum(tl.maximum(h, 0.0) * cw[None, :], axis=1)
    e = tl.where(m_ok, e + tl.load(cb_ptr), float("-inf"))
    p = tl.where(m_ok, tl.exp(e - tl.max(e, axis=0)), 0.0)
    return h, p / tl.sum(p, axis=0)


@triton.jit
def _slot_of(order_ptr, cursor_ptr, order_stride, users_ptr, profiles_ptr, profile_stride, slot,
             P, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """A slot program's (user row, item, component and model-dim offsets and masks, and
    their [BLOCK_M, BLOCK_D] tile's mask): slot = i * P + l is slot l of batch user i."""
    cursor = tl.load(cursor_ptr).to(tl.int64)
    t = tl.load(order_ptr + cursor * order_stride + slot // P).to(tl.int64)
    uid = tl.load(users_ptr + t).to(tl.int64)
    item = tl.load(profiles_ptr + t * profile_stride + slot % P).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    d_ok = offs_d < D
    return uid, item, offs_m, m_ok, offs_d, d_ok, m_ok[:, None] & d_ok[None, :]


@triton.jit
def _slot_forward_kernel(
    order_ptr, cursor_ptr, order_stride, users_ptr, profiles_ptr, profile_stride,
    table_ptr, stride_item, stride_comp, user_emb_ptr, redw_ptr, redb_ptr,
    cwx_ptr, cbx_ptr, cwu_ptr, cbu_ptr, cw_ptr, cb_ptr,
    r_ptr, xbar_ptr,                                # [B*P*M, D], [B*P, D]
    P, M, F, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_KD: tl.constexpr, PRECISION: tl.constexpr, LOW: tl.constexpr,
):
    slot = tl.program_id(0).to(tl.int64)
    acc_dtype = redb_ptr.dtype.element_ty
    uid, item, offs_m, m_ok, offs_d, d_ok, tile_ok = _slot_of(
        order_ptr, cursor_ptr, order_stride, users_ptr, profiles_ptr, profile_stride, slot,
        P, M, D, BLOCK_M, BLOCK_D)
    r_rows = r_ptr + slot * M * D + offs_m * D
    if item > 0:
        r = _reduce_rows(table_ptr, item, stride_item, stride_comp, redw_ptr, redb_ptr,
                         offs_m, m_ok, offs_d, d_ok, F, D, BLOCK_M, BLOCK_D, BLOCK_K,
                         PRECISION, LOW)
        tl.store(r_rows[:, None] + offs_d[None, :], r, mask=tile_ok)
        tl.debug_barrier()   # r is read back in chunks for its hidden layer
        uu = _matvec(cwu_ptr, user_emb_ptr + uid * D, offs_d, d_ok, D,
                     tl.load(cbu_ptr + offs_d, mask=d_ok, other=0.0), False, BLOCK_KD)
        h, beta = _component_scores(r_rows, m_ok, uu, cwx_ptr, cbx_ptr, cw_ptr, cb_ptr,
                                    offs_d, d_ok, D, BLOCK_M, BLOCK_D, BLOCK_KD, PRECISION)
        xbar = tl.sum(beta[:, None] * r, axis=0)
    else:
        tl.store(r_rows[:, None] + offs_d[None, :], tl.zeros([BLOCK_M, BLOCK_D], acc_dtype),
                 mask=tile_ok)
        xbar = tl.zeros([BLOCK_D], acc_dtype)
    tl.store(xbar_ptr + slot * D + offs_d, xbar, mask=d_ok)


@triton.jit
def _user_step_kernel(
    order_ptr, cursor_ptr, order_stride, users_ptr, pos_ptr, neg_ptr, profiles_ptr, profile_stride,
    item_emb_ptr, prof_emb_ptr, user_emb_ptr,
    iwu_ptr, ibu_ptr, iwp_ptr, ibp_ptr, iwx_ptr, ibx_ptr, iw_ptr, ib_ptr,
    xbar_ptr,                                       # [B*P, D] from the slot forward
    user_ids_ptr, item_ids_ptr, prof_ids_ptr,       # [B (+ B*P)], [2B], [B*P] row ids
    duser_ptr, ditem_ptr, dprof_ptr,                # [B (+ B*P), D], [2B, D], [B*P, D]
    dz_ptr, dut_ptr, vec_ptr,                       # [B*P, D], [B, D], [B, VEC]
    terms_ptr, flags_ptr, scores_ptr, step_ptr,     # [B], [B], [B, 2], Adam's step count
    B, P, D, VEC,
    LOSS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_KD: tl.constexpr, PRECISION: tl.constexpr,
):
    i = tl.program_id(0)
    acc_dtype = ibu_ptr.dtype.element_ty
    if step_ptr is not None:
        # Adam's step count advances here, before the optimizer kernel reads it: a write
        # in the kernel that reads it would race with its other programs
        if i == 0:
            tl.store(step_ptr, tl.load(step_ptr) + 1)
    offs_p = tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
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

    # ---------------------------------------------------------------- item attention
    ut = _matvec(iwu_ptr, user_emb_ptr + uid * D, offs_d, d_ok, D,
                 tl.load(ibu_ptr + offs_d, mask=d_ok, other=0.0), False, BLOCK_KD)
    prof_rows = prof_emb_ptr + prof * D
    xbar_rows = xbar_ptr + (i * P + offs_p) * D
    p_rows = tl.load(prof_rows[:, None] + offs_d[None, :], mask=valid[:, None] & d_ok[None, :],
                     other=0.0)
    z = tl.zeros([BLOCK_P, BLOCK_D], dtype=acc_dtype) + (
        tl.load(ibp_ptr + offs_d, mask=d_ok, other=0.0)
        + tl.load(ibx_ptr + offs_d, mask=d_ok, other=0.0) + ut)[None, :]
    z = _rows_dot(prof_rows, valid, iwp_ptr, offs_d, d_ok, D, z, True, BLOCK_KD, PRECISION)
    z = _rows_dot(xbar_rows, p_ok, iwx_ptr, offs_d, d_ok, D, z, True, BLOCK_KD, PRECISION)
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

    # ---------------------------------------------------------------- backward
    duser = coef * (v_neg - v_pos) / D
    tl.store(ditem_ptr + i * D + offs_d, -coef * user / D, mask=d_ok)
    tl.store(ditem_ptr + (B + i) * D + offs_d, coef * user / D, mask=d_ok)
    dalpha = tl.sum(p_rows * duser[None, :], axis=1)
    da = alpha * (dalpha - tl.sum(alpha * dalpha, axis=0))
    dz = tl.where(z > 0, da[:, None] * w1[None, :], 0.0)
    dz_rows = dz_ptr + (i * P + offs_p) * D
    tl.store(dz_rows[:, None] + offs_d[None, :], dz, mask=pd_ok)
    dut = duser + tl.sum(dz, axis=0)
    tl.store(dut_ptr + i * D + offs_d, dut, mask=d_ok)
    vec = vec_ptr + i * VEC
    tl.store(vec + offs_d, tl.sum(da[:, None] * tl.maximum(z, 0.0), axis=0), mask=d_ok)  # w1
    tl.store(vec + D + offs_d, tl.sum(dz, axis=0), mask=d_ok)                          # b1p, b1x
    tl.store(vec + 2 * D, tl.sum(da, axis=0))                                          # c1
    tl.debug_barrier()   # dz and dut, stored above by every thread, are read back in chunks
    dp = _rows_dot(dz_rows, p_ok, iwp_ptr, offs_d, d_ok, D, alpha[:, None] * duser[None, :],
                   False, BLOCK_KD, PRECISION)
    tl.store(dprof_ptr + (i * P + offs_p[:, None]) * D + offs_d[None, :], dp, mask=pd_ok)
    # the user row's gradient through ut (through uu: one piece per slot, see below)
    du = _matvec(iwu_ptr, dut_ptr + i * D, offs_d, d_ok, D, tl.zeros([BLOCK_D], dtype=acc_dtype),
                 True, BLOCK_KD)
    tl.store(duser_ptr + i * D + offs_d, du, mask=d_ok)


@triton.jit
def _slot_backward_kernel(
    order_ptr, cursor_ptr, order_stride, users_ptr, profiles_ptr, profile_stride,
    user_emb_ptr, cwx_ptr, cbx_ptr, cwu_ptr, cbu_ptr, cw_ptr, cb_ptr, iwx_ptr,
    r_ptr, dz_ptr,                                  # from the slot forward, the user step
    dr_ptr, dxr_ptr, duu_ptr, svec_ptr,             # [B*P*M, D] x 2, [B*P, D], [B*P, VEC]
    user_ids_ptr, duser_ptr,                        # rows B + slot: this slot's piece
    B, P, M, D, VEC,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    slot = tl.program_id(0).to(tl.int64)
    acc_dtype = cbx_ptr.dtype.element_ty
    uid, item, offs_m, m_ok, offs_d, d_ok, tile_ok = _slot_of(
        order_ptr, cursor_ptr, order_stride, users_ptr, profiles_ptr, profile_stride, slot,
        P, M, D, BLOCK_M, BLOCK_D)
    r_rows = r_ptr + slot * M * D + offs_m * D
    dxr_rows = dxr_ptr + slot * M * D + offs_m * D
    dr_tile = dr_ptr + slot * M * D + offs_m[:, None] * D + offs_d[None, :]
    svec = svec_ptr + slot * VEC
    tl.store(user_ids_ptr + B + slot, uid)
    if item > 0:
        g = _matvec(iwx_ptr, dz_ptr + slot * D, offs_d, d_ok, D,   # dxbar_l = dz_l W1x
                    tl.zeros([BLOCK_D], dtype=acc_dtype), True, BLOCK_KD)
        uu = _matvec(cwu_ptr, user_emb_ptr + uid * D, offs_d, d_ok, D,
                     tl.load(cbu_ptr + offs_d, mask=d_ok, other=0.0), False, BLOCK_KD)
        h, beta = _component_scores(r_rows, m_ok, uu, cwx_ptr, cbx_ptr, cw_ptr, cb_ptr,
                                    offs_d, d_ok, D, BLOCK_M, BLOCK_D, BLOCK_KD, PRECISION)
        r = tl.load(r_rows[:, None] + offs_d[None, :], mask=tile_ok, other=0.0)
        dbeta = tl.sum(r * g[None, :], axis=1)
        de = beta * (dbeta - tl.sum(beta * dbeta, axis=0))
        cw = tl.load(cw_ptr + offs_d, mask=d_ok, other=0.0)
        dxr = tl.where(h > 0, de[:, None] * cw[None, :], 0.0)
        tl.store(dxr_rows[:, None] + offs_d[None, :], dxr, mask=tile_ok)
        tl.store(duu_ptr + slot * D + offs_d, tl.sum(dxr, axis=0), mask=d_ok)
        tl.store(svec + offs_d, tl.sum(de[:, None] * tl.maximum(h, 0.0), axis=0), mask=d_ok)  # w2
        tl.store(svec + 2 * D, tl.sum(de, axis=0))                                          # c2
        tl.debug_barrier()   # dxr and duu are read back in chunks
        dr = _rows_dot(dxr_rows, m_ok, cwx_ptr, offs_d, d_ok, D, beta[:, None] * g[None, :],
                       False, BLOCK_KD, PRECISION)
        dr = tl.where(tile_ok, dr, 0.0)
        tl.store(dr_tile, dr, mask=tile_ok)
        tl.store(svec + D + offs_d, tl.sum(dr, axis=0), mask=d_ok)                         # b_red
        du = _matvec(cwu_ptr, duu_ptr + slot * D, offs_d, d_ok, D,   # the user row, via uu
                     tl.zeros([BLOCK_D], dtype=acc_dtype), True, BLOCK_KD)
    else:
        zero = tl.zeros([BLOCK_M, BLOCK_D], acc_dtype)
        tl.store(dr_tile, zero, mask=tile_ok)
        tl.store(dxr_rows[:, None] + offs_d[None, :], zero, mask=tile_ok)
        du = tl.zeros([BLOCK_D], dtype=acc_dtype)
        tl.store(duu_ptr + slot * D + offs_d, du, mask=d_ok)
        tl.store(svec + offs_d, du, mask=d_ok)
        tl.store(svec + D + offs_d, du, mask=d_ok)
        tl.store(svec + 2 * D, tl.sum(du, axis=0))
    tl.store(duser_ptr + (B + slot) * D + offs_d, du, mask=d_ok)


def blocks(P: int, M: int, D: int, low: bool, cap: int = 90) -> dict:
    """Tiles and launch options of the three kernels, by name (shared with the compile
    test). The whole model dimension is one tile (BLOCK_D >= D); products with a [D, D]
    weight read their left operand in chunks of BLOCK_KD columns (see _rows_dot)."""
    from ._common import interpreting, next_pow2

    tiles = dict(BLOCK_D=max(16, next_pow2(D)))
    slot = dict(tiles, BLOCK_M=max(16, next_pow2(M)))
    user = dict(tiles, BLOCK_P=max(16, next_pow2(P)))
    if interpreting():   # BLOCK_KD 32: a D of 16 or 48 leaves a chunk partly masked
        return dict(slot_forward=dict(slot, BLOCK_K=16, BLOCK_KD=32),
                    user=dict(user, BLOCK_KD=32), slot_backward=dict(slot, BLOCK_KD=32))
    stages = 2 if cap >= 80 else 1
    # 8 warps a slot: [64, 128] fp32 tiles are 32 registers a thread, and sm_90 compiles
    # both slot kernels without spills (16 chunk columns: 226 registers at most). At
    # D = 256 they spill 24-300 bytes on 8 warps and 32-212 on 16 (the compile test's
    # KNOWN_SPILLS); the user program takes 8 warps there, which removes its spill. 3 or 4
    # stages compile without spills too, 16 warps at D = 128 only with a 16-bit table, 4
    # warps spill; which is fastest is for a GPU to say (benchmarks/fused_bench.py's A/B)
    wide = tiles["BLOCK_D"] > 128
    return dict(slot_forward=dict(slot, BLOCK_K=64 if low else 32, BLOCK_KD=16, num_warps=8,
                                  num_stages=stages),
                user=dict(user, BLOCK_KD=16, num_warps=8 if wide else 4, num_stages=stages),
                slot_backward=dict(slot, BLOCK_KD=16, num_warps=8, num_stages=stages))
