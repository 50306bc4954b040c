"""ACF's whole hot path, forward and backward, composed from the Triton kernels.

Host code only: it launches the kernels of `reduce`, `component_attention` and
`item_attention` and does the small dense projections with torch matmuls (cuBLAS on
a GPU), which are per distinct item or per (user, slot), never per component and
user at once:

    r   = reduce_items(table, ids)            [U, M, D]  Triton gather-GEMM
    xr  = r W2x^T + b2x                       [U, M, D]  matmul, per distinct item
    uu  = u W2u^T + b2u,  ut = u W1u^T + b1u  [B, D]     matmul, per user
    xbar = component_forward(...)             [B, P, D]  Triton, per (user, slot)
    pre = p W1p^T + b1p + xbar W1x^T + b1x    [B, P, D]  matmul, per (user, slot)
    alpha, user, scores = item_forward(...)              Triton, per user

`Batch` carries the batch's distinct items, built once by the caller with plain torch
ops (`distinct_items`, from acf_fast.backends.planning, shared with the cpu backend):
exactly U of them (torch.unique, one host sync for its size), or a static capacity with
the live count in device memory (no sync: a CUDA graph can hold it).
Gradients of the embedding tables are scatter-adds done here with torch; see
`scatter_rows` for determinism.

Host cost: with the reduction on tensor cores, a B = 128 step is a few hundred
microseconds of GPU work, less than the host needs to issue it (an H200 run measured
~9 ms of host time per step under the profiler), so every launch counts: the
backward fuses products with their sums (addmm), and the autograd wiring does not
zero-fill gradients for outputs that never get one (see acf_fast.backends.triton).
A host-resident table (`compact_table`) adds one gather and one copy of the batch's
distinct items.

CUDA graphs (acf_fast.training.cuda_graph): with `distinct_items(..., capacity=C)` every shape
is fixed by (B, P, C) and nothing is read back, so the whole step can be captured and
replayed for the cost of one launch. The price of the static shape is small: the two
reduction kernels read the live count and skip the dead items' rows (their r is 0,
their dr is 0), and only the per-item projections (xr and its two backward GEMMs,
[C*M, D] x [D, D]) run over all C items.
"""

from __future__ import annotations

import os

import torch

# the batch's plan, shared with the cpu backend; re-exported here as fused_acf.Batch and
# fused_acf.distinct_items
from acf_fast.backends.planning import Batch, distinct_items  # noqa: F401
from .component_attention import component_backward, component_forward
from .item_attention import item_backward, item_forward
from .reduce import reduce_items, reduce_weight_grad


def compact_table(table: torch.Tensor, batch: Batch, device: torch.device):
    """A host-resident feature table (`ACF(features_on_host=True)`): copy only the batch's
    distinct items to `device`. -> (compact table [U, M, F] on device, batch whose
    item_ids are 0..U-1 into it).

    The rows are gathered on the host into pinned memory and copied without blocking
    (PyTorch's pinned-memory cache records the copy's event, so the buffer is not
    reused before the copy finishes): U*M*F values cross the bus instead of the
    tutorial's B*P*M*F (462 distinct items instead of 1152 slots at B = 128). Row k of
    the compact table is item item_ids[k], so the kernels compute exactly what they
    compute on the full table (same rows, same order). The copy of item_ids to the
    host waits for torch.unique, which has synchronised already.
    """
    ids = batch.item_ids.to(table.device)
    U = ids.numel()
    pin = table.device.type == "cpu" and device.type == "cuda"
    if table.device.type == "cpu":
        rows = torch.empty((U,) + tuple(table.shape[1:]), dtype=table.dtype, pin_memory=pin)
        torch.index_select(table, 0, ids, out=rows)
    else:  # a table on another GPU
        rows = table.index_select(0, ids)
    local = torch.arange(U, device=device, dtype=batch.item_ids.dtype)
    return rows.to(device, non_blocking=pin), batch._replace(item_ids=local)


def deterministic() -> bool:
    return (os.environ.get("ACF_FAST_DETERMINISTIC", "0") not in ("", "0")
            or torch.are_deterministic_algorithms_enabled())


def scatter_rows(num_rows: int, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Dense [num_rows, D] gradient of an embedding lookup: sum of `rows` by `index`.

    index_add_ uses atomicAdd on CUDA, so float sums there are not bitwise
    reproducible; in deterministic mode (ACF_FAST_DETERMINISTIC=1 or
    torch.use_deterministic_algorithms(True)) index_put_(accumulate=True) is used,
    whose CUDA kernel sorts the indices and sums each row in a fixed order.
    """
    out = rows.new_zeros((num_rows, rows.shape[-1]))
    index = index.reshape(-1)
    rows = rows.reshape(-1, rows.shape[-1])
    if deterministic():
        return out.index_put_((index,), rows, accumulate=True)
    return out.index_add_(0, index, rows)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def acf_forward(table, batch: Batch, user_ids, profile_ids, pos, neg, w, with_scores: bool,
                store_beta: bool):
    """w: ACFWeights. -> (user, s_pos, s_neg, alpha, beta | None, saved), saved for backward."""
    D = w.user_emb.shape[1]
    r = reduce_items(table, batch.item_ids, w.red_w, w.red_b, batch.item_count)
    U, M, _ = r.shape
    xr = _linear(r.view(-1, D), w.c_wx, w.c_bx).view(U, M, D)
    u = w.user_emb[user_ids]
    uu = _linear(u, w.c_wu, w.c_bu)
    xbar, beta = component_forward(r, xr, uu, w.c_w.reshape(-1), w.c_b, batch.slot_item,
                                   store_beta)
    pre = _linear(w.profile_emb[profile_ids], w.i_wp, w.i_bp) + _linear(xbar, w.i_wx, w.i_bx)
    ut = _linear(u, w.i_wu, w.i_bu)
    alpha, user, spos, sneg = item_forward(
        pre, ut, w.i_w.reshape(-1), w.i_b, batch.slot_item, profile_ids,
        w.profile_emb.contiguous(), w.item_emb.contiguous(), pos, neg, with_scores)
    return user, spos, sneg, alpha, beta, (r, xbar, pre)


def acf_backward(grad_user, grad_pos, grad_neg, table, batch: Batch, user_ids, profile_ids,
                 pos, neg, w, user, alpha, saved, with_scores: bool):
    """Gradients of every ACFWeights field (same order, same shapes)."""
    r, xbar, pre = saved
    U, M, D = r.shape
    B, P = profile_ids.shape
    u = w.user_emb[user_ids]
    p_rows = w.profile_emb[profile_ids]
    uu = _linear(u, w.c_wu, w.c_bu)
    ut = _linear(u, w.i_wu, w.i_bu)
    xr = _linear(r.view(-1, D), w.c_wx, w.c_bx).view(U, M, D)

    # item attention, user vector, scores
    dut, dp, dz, dw1, dc1, dvpos, dvneg = item_backward(
        grad_user, grad_pos, grad_neg, pre, ut, w.i_w.reshape(-1), w.i_b, alpha, user,
        batch.slot_item, profile_ids, w.profile_emb.contiguous(), w.item_emb.contiguous(), pos,
        neg, with_scores)
    dz2 = dz.view(-1, D)
    g_i_wp = dz2.T @ p_rows.view(-1, D)
    g_i_bp = dz2.sum(0)
    g_i_wx = dz2.T @ xbar.view(-1, D)
    dxbar = (dz2 @ w.i_wx).view(B, P, D)
    # addmm: the product and the sum in one cuBLAS call (one launch instead of two)
    dp = torch.addmm(dp.view(-1, D), dz2, w.i_wp).view(B, P, D)
    g_i_wu = dut.T @ u
    du = dut @ w.i_wu

    # component attention, then the reduction
    dr, dxr, duu, dw2, dc2 = component_backward(
        r, xr, uu, w.c_w.reshape(-1), w.c_b, batch.slot_item, dxbar,
        batch.item_start, batch.slot_order)
    dxr2 = dxr.view(-1, D)
    g_c_wx = dxr2.T @ r.view(-1, D)
    dr = torch.addmm(dr.view(-1, D), dxr2, w.c_wx).view(U, M, D)
    g_c_wu = duu.T @ u
    du = torch.addmm(du, duu, w.c_wu)
    g_red_w = reduce_weight_grad(table, batch.item_ids, dr, batch.item_count)

    # embedding tables (row 0 is padding_idx: never trained, like nn.Embedding)
    n_items = w.item_emb.shape[0]
    g_user_emb = scatter_rows(w.user_emb.shape[0], user_ids, du)
    g_profile_emb = scatter_rows(w.profile_emb.shape[0], profile_ids, dp)
    g_item_emb = (scatter_rows(n_items, torch.cat([pos, neg]), torch.cat([dvpos, dvneg]))
                  if with_scores else w.item_emb.new_zeros(w.item_emb.shape))
    g_profile_emb[0] = 0
    g_item_emb[0] = 0

    return type(w)(
        item_emb=g_item_emb, profile_emb=g_profile_emb, user_emb=g_user_emb,
        red_w=g_red_w, red_b=dr.sum((0, 1)),
        c_wx=g_c_wx, c_bx=dxr2.sum(0), c_wu=g_c_wu, c_bu=duu.sum(0),
        c_w=dw2.view(1, D), c_b=dc2,
        i_wu=g_i_wu, i_bu=dut.sum(0), i_wp=g_i_wp, i_bp=g_i_bp, i_wx=g_i_wx,
        i_bx=g_i_bp.clone(), i_w=dw1.view(1, D), i_b=dc1,
    )
