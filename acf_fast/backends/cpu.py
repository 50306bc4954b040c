"""The native CPU backend: W_red once per distinct item, then one fused attention pass.

Plan per batch (SPEC "Cost, for orientation"):
1. the distinct real items of the batch's profiles (padding skipped) and, per slot,
   the index of its item among them (-1 for padding);
2. R = W_red x + b_red for those items only (acf_fast::reduce_items: chunked gather +
   GEMM; a 16-bit table is read as 16-bit and widened in cache, or with
   ACF_FAST_BF16_GEMM=1 multiplied in bf16 with fp32 accumulation);
3. the GEMMs that do not depend on the (user, slot) pair, by ATen: [W2x; W1x] R per
   item, W2u u and W1u u per user, W1p p per slot (biases folded where cheapest);
4. acf_fast::acf_attention: both softmaxes and the user vector, fused per user.
Autograd runs through ATen for the GEMMs and through the native backwards for 2 and 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_ops
from ..model.reference import score
from ..model.weights import ACFWeights


def _slot_items(profile_ids: torch.Tensor, profile_mask: torch.Tensor):
    """(distinct real item ids [K], slot -> index into them [B, P], -1 on padding)."""
    items, inverse = torch.unique(profile_ids[profile_mask], sorted=True, return_inverse=True)
    slot_item = torch.full_like(profile_ids, -1)
    slot_item[profile_mask] = inverse
    return items, slot_item


def user_vectors(model, user_ids, profile_ids, profile_mask, return_attentions=False):
    w = ACFWeights.of(model)
    w.require_full_precision("cpu")
    items, slot_item = _slot_items(profile_ids, profile_mask)
    r = cpu_ops.reduce_items(model.feature_table, items, w.red_w, w.red_b)
    # one GEMM for both per-item projections: columns [0, H) W2x r, [H, H+D) W1x r. No
    # bias here (it would cost a copy of the [K, M, H + D] output): b2x only ever appears
    # in W2x r + b2x + W2u u + b2u, so it joins b2u; b1x likewise joins b1p.
    xy = F.linear(r, torch.cat([w.c_wx, w.i_wx]))
    u = F.embedding(user_ids, w.user_emb)
    uc = F.linear(u, w.c_wu, w.c_bu + w.c_bx)
    ut = F.linear(u, w.i_wu, w.i_bu)
    prof = F.embedding(profile_ids, w.profile_emb, padding_idx=model.pad_token)
    pp = F.linear(prof, w.i_wp, w.i_bp + w.i_bx)
    user, alpha, beta = cpu_ops.acf_attention(xy, uc, ut, pp, prof, slot_item,
                                              w.c_w.reshape(-1), w.c_b, w.i_w.reshape(-1), w.i_b)
    if return_attentions:
        return user, alpha, beta
    return user, None, None


def pair_scores(model, user_ids, profile_ids, pos, neg, profile_mask):
    user, _, _ = user_vectors(model, user_ids, profile_ids, profile_mask)
    d = model.model_dim
    return score(user, model.item_model(pos), d), score(user, model.item_model(neg), d)
