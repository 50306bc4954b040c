"""Steps 4-6 of ACF: item attention over the profile slots, the user vector, the scores.

For user i with slots l (valid where slot_item >= 0):

    z_l    = ut_i + pre_l           pre = W1p p_l + b1p + W1x xbar_l + b1x  (host matmuls)
    a_l    = w1 . relu(z_l) + c1    (-inf on padded slots)
    alpha  = softmax_l(a)           (all zeros for a profile with no real item, never NaN)
    user_i = ut_i + sum_l alpha_l p_l
    s_pos  = user_i . v_pos / D,  s_neg = user_i . v_neg / D

One program per user handles all its slots (P <= BLOCK_P) and reads the profile and
target embeddings by id, so neither [B, P, D] gathers of the embedding tables nor
the user vector make an extra round trip through global memory before scoring.
Backward (`_item_bwd_kernel`) recomputes z from `pre` and uses the saved alpha.

No atomics: one writer per output element, deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import chunk, next_pow2


@triton.jit
def _item_logits(pre_ptr, ut_ptr, w1_ptr, c1_ptr, i, offs_p, p_ok, P, D,
                 BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    acc_dtype = ut_ptr.dtype.element_ty
    a = tl.zeros([BLOCK_P], dtype=acc_dtype)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        pre = tl.load(pre_ptr + (i * P + offs_p[:, None]) * D + offs_d[None, :],
                      mask=p_ok[:, None] & d_ok[None, :], other=0.0)
        ut = tl.load(ut_ptr + i * D + offs_d, mask=d_ok, other=0.0)
        w1 = tl.load(w1_ptr + offs_d, mask=d_ok, other=0.0)
        a += tl.sum(tl.maximum(pre + ut[None, :], 0.0) * w1[None, :], axis=1)
    return a + tl.load(c1_ptr)


@triton.jit
def _item_fwd_kernel(
    pre_ptr, ut_ptr, w1_ptr, c1_ptr, slot_item_ptr, profile_ids_ptr, pemb_ptr,
    iemb_ptr, pos_ptr, neg_ptr,
    alpha_ptr, user_ptr, spos_ptr, sneg_ptr,
    P, D,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, WITH_SCORES: tl.constexpr,
):
    i = tl.program_id(0)
    offs_p = tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    valid = (tl.load(slot_item_ptr + i * P + offs_p, mask=p_ok, other=-1) >= 0) & p_ok

    a = _item_logits(pre_ptr, ut_ptr, w1_ptr, c1_ptr, i, offs_p, p_ok, P, D, BLOCK_P, BLOCK_D)
    a = tl.where(valid, a, float("-inf"))
    a_max = tl.max(a, axis=0)
    a_max = tl.where(a_max == float("-inf"), 0.0, a_max)  # empty profile: keep exp finite
    e = tl.where(valid, tl.exp(a - a_max), 0.0)
    denom = tl.sum(e, axis=0)
    alpha = e / tl.where(denom > 0, denom, 1.0)  # empty profile: alpha = 0, not 0/0
    tl.store(alpha_ptr + i * P + offs_p, alpha, mask=p_ok)

    prof = tl.load(profile_ids_ptr + i * P + offs_p, mask=valid, other=0).to(tl.int64)
    if WITH_SCORES:
        pos = tl.load(pos_ptr + i).to(tl.int64)
        neg = tl.load(neg_ptr + i).to(tl.int64)
    s_pos = tl.zeros([BLOCK_D], dtype=alpha.dtype)
    s_neg = tl.zeros([BLOCK_D], dtype=alpha.dtype)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        p_rows = tl.load(pemb_ptr + prof[:, None] * D + offs_d[None, :],
                         mask=valid[:, None] & d_ok[None, :], other=0.0)
        user = tl.load(ut_ptr + i * D + offs_d, mask=d_ok, other=0.0) \
            + tl.sum(alpha[:, None] * p_rows, axis=0)
        tl.store(user_ptr + i * D + offs_d, user, mask=d_ok)
        if WITH_SCORES:
            s_pos += user * tl.load(iemb_ptr + pos * D + offs_d, mask=d_ok, other=0.0)
            s_neg += user * tl.load(iemb_ptr + neg * D + offs_d, mask=d_ok, other=0.0)
    if WITH_SCORES:
        tl.store(spos_ptr + i, tl.sum(s_pos, axis=0) / D)
        tl.store(sneg_ptr + i, tl.sum(s_neg, axis=0) / D)


@triton.jit
def _user_grad_chunk(guser_ptr, gpos_ptr, gneg_ptr, iemb_ptr, pos, neg, i, offs_d, d_ok, D,
                     WITH_SCORES: tl.constexpr):
    """d loss / d user_i on one column chunk: the direct gradient plus the scores'."""
    g = tl.load(guser_ptr + i * D + offs_d, mask=d_ok, other=0.0)
    if WITH_SCORES:
        g += tl.load(gpos_ptr + i) / D * tl.load(iemb_ptr + pos * D + offs_d, mask=d_ok, other=0.0)
        g += tl.load(gneg_ptr + i) / D * tl.load(iemb_ptr + neg * D + offs_d, mask=d_ok, other=0.0)
    return g


@triton.jit
def _item_bwd_kernel(
    guser_ptr, gpos_ptr, gneg_ptr,
    pre_ptr, ut_ptr, w1_ptr, c1_ptr, alpha_ptr, user_ptr, slot_item_ptr, profile_ids_ptr,
    pemb_ptr, iemb_ptr, pos_ptr, neg_ptr,
    dut_ptr, dp_ptr, dz_ptr, dw1_ptr, dc1_ptr, dvpos_ptr, dvneg_ptr,
    P, D,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, WITH_SCORES: tl.constexpr,
):
    i = tl.program_id(0)
    offs_p = tl.arange(0, BLOCK_P)
    p_ok = offs_p < P
    valid = (tl.load(slot_item_ptr + i * P + offs_p, mask=p_ok, other=-1) >= 0) & p_ok
    alpha = tl.load(alpha_ptr + i * P + offs_p, mask=p_ok, other=0.0)
    prof = tl.load(profile_ids_ptr + i * P + offs_p, mask=valid, other=0).to(tl.int64)
    pos = 0
    neg = 0
    if WITH_SCORES:
        pos = tl.load(pos_ptr + i).to(tl.int64)
        neg = tl.load(neg_ptr + i).to(tl.int64)

    # pass 1: dalpha_l = duser . p_l, and the target-embedding gradients
    dalpha = tl.zeros([BLOCK_P], dtype=alpha.dtype)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        g = _user_grad_chunk(guser_ptr, gpos_ptr, gneg_ptr, iemb_ptr, pos, neg, i, offs_d, d_ok,
                             D, WITH_SCORES)
        p_rows = tl.load(pemb_ptr + prof[:, None] * D + offs_d[None, :],
                         mask=valid[:, None] & d_ok[None, :], other=0.0)
        dalpha += tl.sum(p_rows * g[None, :], axis=1)
        if WITH_SCORES:
            user = tl.load(user_ptr + i * D + offs_d, mask=d_ok, other=0.0)
            tl.store(dvpos_ptr + i * D + offs_d, tl.load(gpos_ptr + i) / D * user, mask=d_ok)
            tl.store(dvneg_ptr + i * D + offs_d, tl.load(gneg_ptr + i) / D * user, mask=d_ok)
    da = alpha * (dalpha - tl.sum(alpha * dalpha, axis=0))  # softmax backward; 0 where alpha = 0
    tl.store(dc1_ptr + i, tl.sum(da, axis=0))

    # pass 2: through relu(z), z = ut + pre
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        tile = (i * P + offs_p[:, None]) * D + offs_d[None, :]
        tile_ok = p_ok[:, None] & d_ok[None, :]
        g = _user_grad_chunk(guser_ptr, gpos_ptr, gneg_ptr, iemb_ptr, pos, neg, i, offs_d, d_ok,
                             D, WITH_SCORES)
        z = tl.load(pre_ptr + tile, mask=tile_ok, other=0.0) \
            + tl.load(ut_ptr + i * D + offs_d, mask=d_ok, other=0.0)[None, :]
        w1 = tl.load(w1_ptr + offs_d, mask=d_ok, other=0.0)
        dz = tl.where(z > 0, da[:, None] * w1[None, :], 0.0)
        tl.store(dz_ptr + tile, dz, mask=tile_ok)
        tl.store(dp_ptr + tile, alpha[:, None] * g[None, :], mask=tile_ok)
        tl.store(dut_ptr + i * D + offs_d, g + tl.sum(dz, axis=0), mask=d_ok)
        tl.store(dw1_ptr + i * D + offs_d, tl.sum(da[:, None] * tl.maximum(z, 0.0), axis=0),
                 mask=d_ok)


# ---------------------------------------------------------------------- launchers

def blocks(P: int, D: int) -> dict:
    return dict(BLOCK_P=max(16, next_pow2(P)), BLOCK_D=chunk(D, 64))


def item_forward(pre, ut, w1, c1, slot_item, profile_ids, pemb, iemb, pos, neg,
                 with_scores: bool):
    """-> alpha [B, P], user [B, D], s_pos [B], s_neg [B] (empty unless with_scores)."""
    B, P, D = pre.shape
    alpha = ut.new_empty((B, P))
    user = ut.new_empty((B, D))
    spos = ut.new_empty((B,))
    sneg = ut.new_empty((B,))
    if B:
        _item_fwd_kernel[(B,)](
            pre, ut, w1, c1, slot_item, profile_ids, pemb, iemb, pos, neg,
            alpha, user, spos, sneg, P, D, WITH_SCORES=with_scores, **blocks(P, D))
    return alpha, user, spos, sneg


def item_backward(grad_user, grad_pos, grad_neg, pre, ut, w1, c1, alpha, user, slot_item,
                  profile_ids, pemb, iemb, pos, neg, with_scores: bool):
    """-> dut [B, D], dp [B, P, D], dz [B, P, D], dw1 [D], dc1 [1], dvpos [B, D], dvneg [B, D]."""
    B, P, D = pre.shape
    dut = ut.new_empty((B, D))
    dp = ut.new_empty((B, P, D))
    dz = ut.new_empty((B, P, D))
    dw1 = ut.new_empty((B, D))
    dc1 = ut.new_empty((B,))
    # written in full by the kernel when WITH_SCORES, unused otherwise: no memset needed
    dvpos = ut.new_empty((B, D))
    dvneg = ut.new_empty((B, D))
    if B:
        _item_bwd_kernel[(B,)](
            grad_user.contiguous(), grad_pos.contiguous(), grad_neg.contiguous(),
            pre, ut, w1, c1, alpha, user, slot_item, profile_ids, pemb, iemb, pos, neg,
            dut, dp, dz, dw1, dc1, dvpos, dvneg, P, D, WITH_SCORES=with_scores, **blocks(P, D))
    return dut, dp, dz, dw1.sum(0), dc1.sum().reshape(1), dvpos, dvneg
