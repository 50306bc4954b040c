"""The Triton backend: ACF's forward and backward as two torch.library custom ops.

    acf_fast::triton_forward   -> user, scores, attentions, and what backward needs
    acf_fast::triton_backward  -> the gradient of every parameter (ACFWeights order)

Why `torch.library.custom_op` (with `register_fake` and `register_autograd`) rather
than `triton_op` or a bare autograd.Function: each op is a pipeline of several
Triton kernels *and* cuBLAS matmuls, so Inductor could not fuse it further anyway;
an opaque custom op keeps that pipeline in one piece under torch.compile (the fake
implementations give the output shapes, all derivable from the inputs) and needs no
Triton-specific tracing, so it also runs unchanged under TRITON_INTERPRET=1 on CPU
tensors. The data-dependent part (the batch's distinct items, `torch.unique`)
happens before the op, in plain torch, so no op has a data-dependent output shape.

Saved for backward (flash-attention style): the reduced features r of the distinct
items [U, M, D], the pooled xbar and pre-activations [B, P, D] and alpha [B, P];
backward recomputes the component logits and their softmax beta from them (a full
softmax in registers: more accurate than exp(e - lse) from a saved log-sum-exp) and
never stores anything per (user, slot, component).

Kernels launch on torch's current CUDA stream (Triton's launcher asks torch for it).
The returned attentions (alpha, beta) are detached: gradients flow through the user
vectors and the scores, which is what training uses.

Determinism: the Triton kernels use no atomics (one writer per output element, sums
in a fixed order). The only scatter-adds are the embedding-table gradients, done
with torch; see `acf_fast.kernels.fused_acf.scatter_rows` and ACF_FAST_DETERMINISTIC.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import torch

from ..model.weights import ACFWeights

try:
    import triton  # noqa: F401
except ImportError as exc:  # fail with the fix, not a bare ModuleNotFoundError
    raise RuntimeError("the triton backend needs the triton package: pip install triton "
                       "(or use backend='reference' / 'cpu')") from exc


def _import_kernels():
    """`acf_fast.kernels` (the repo's kernels/ folder, mapped there by setup.py).

    With only PYTHONPATH=<repo> (no editable install, e.g. on a bare GPU machine) the
    mapping does not exist; load the folder under that name directly.
    """
    try:
        return importlib.import_module("acf_fast.kernels.fused_acf")
    except ModuleNotFoundError as exc:
        if exc.name not in ("acf_fast.kernels", "acf_fast.kernels.fused_acf"):
            raise
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "kernels")
    spec = importlib.util.spec_from_file_location(
        "acf_fast.kernels", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
    if spec is None:
        raise ModuleNotFoundError("acf_fast.kernels not found: install acf_fast (pip install -e .)")
    module = importlib.util.module_from_spec(spec)
    sys.modules["acf_fast.kernels"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("acf_fast.kernels.fused_acf")


fused = _import_kernels()
N_WEIGHTS = len(ACFWeights._fields)


# ------------------------------------------------------------------ custom ops

@torch.library.custom_op("acf_fast::triton_forward", mutates_args=())
def triton_forward(
    table: torch.Tensor, item_ids: torch.Tensor, slot_item: torch.Tensor,
    item_start: torch.Tensor, slot_order: torch.Tensor, item_count: torch.Tensor | None,
    user_ids: torch.Tensor, profile_ids: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
    weights: list[torch.Tensor], with_scores: bool, store_beta: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> user, s_pos, s_neg, alpha, beta ([B, P, M] or [0]), r, xbar, pre."""
    w = ACFWeights(*weights)
    batch = fused.Batch(item_ids, slot_item, item_start, slot_order, item_count)
    user, spos, sneg, alpha, beta, saved = fused.acf_forward(
        table, batch, user_ids, profile_ids, pos, neg, w, with_scores, store_beta)
    if not with_scores:
        spos, sneg = spos.zero_(), sneg.zero_()
    if beta is None:
        beta = user.new_empty((0,))
    return (user, spos, sneg, alpha, beta, *saved)


@triton_forward.register_fake
def _(table, item_ids, slot_item, item_start, slot_order, item_count, user_ids, profile_ids,
      pos, neg, weights, with_scores, store_beta):
    w = ACFWeights(*weights)
    B, P = profile_ids.shape
    D = w.user_emb.shape[1]
    U, M = item_ids.shape[0], table.shape[1]
    new = w.user_emb.new_empty
    beta = new((B, P, M)) if store_beta else new((0,))
    return (new((B, D)), new((B,)), new((B,)), new((B, P)), beta,
            new((U, M, D)), new((B, P, D)), new((B, P, D)))


@torch.library.custom_op("acf_fast::triton_backward", mutates_args=())
def triton_backward(
    grad_user: torch.Tensor, grad_pos: torch.Tensor, grad_neg: torch.Tensor,
    table: torch.Tensor, item_ids: torch.Tensor, slot_item: torch.Tensor,
    item_start: torch.Tensor, slot_order: torch.Tensor, item_count: torch.Tensor | None,
    user_ids: torch.Tensor, profile_ids: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
    weights: list[torch.Tensor], user: torch.Tensor, alpha: torch.Tensor, r: torch.Tensor,
    xbar: torch.Tensor, pre: torch.Tensor, with_scores: bool,
) -> list[torch.Tensor]:
    batch = fused.Batch(item_ids, slot_item, item_start, slot_order, item_count)
    grads = fused.acf_backward(grad_user, grad_pos, grad_neg, table, batch, user_ids, profile_ids,
                               pos, neg, ACFWeights(*weights), user, alpha,
                               (r, xbar, pre), with_scores)
    return [g.contiguous() for g in grads]


@triton_backward.register_fake
def _(grad_user, grad_pos, grad_neg, table, item_ids, slot_item, item_start, slot_order,
      item_count, user_ids, profile_ids, pos, neg, weights, user, alpha, r, xbar, pre,
      with_scores):
    return [torch.empty_like(t) for t in weights]


def _setup_context(ctx, inputs, output):
    (table, item_ids, slot_item, item_start, slot_order, item_count, user_ids, profile_ids,
     pos, neg, weights, with_scores, store_beta) = inputs
    user, _, _, alpha, _, r, xbar, pre = output
    ctx.with_scores = with_scores
    # the saved-for-backward outputs (r, xbar, ...) and the attentions never receive a
    # gradient: without this autograd would allocate and zero-fill one per step (seven
    # launches, an r-sized [U, M, D] memset among them)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(table, item_ids, slot_item, item_start, slot_order, item_count,
                          user_ids, profile_ids, pos, neg, user, alpha, r, xbar, pre, *weights)


def _backward(ctx, g_user, g_pos, g_neg, *_unused):
    (table, item_ids, slot_item, item_start, slot_order, item_count, user_ids, profile_ids,
     pos, neg, user, alpha, r, xbar, pre, *weights) = ctx.saved_tensors
    g_user = torch.zeros_like(user) if g_user is None else g_user
    g_pos = user.new_zeros(user.shape[:1]) if g_pos is None else g_pos
    g_neg = user.new_zeros(user.shape[:1]) if g_neg is None else g_neg
    grads = triton_backward(g_user, g_pos, g_neg, table, item_ids, slot_item, item_start,
                            slot_order, item_count, user_ids, profile_ids, pos, neg,
                            list(weights), user, alpha, r, xbar, pre, ctx.with_scores)
    return (None,) * 10 + (list(grads), None, None)


triton_forward.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------ backend contract

def _check_device(device: torch.device) -> None:
    from .registry import triton_interpreter_on

    if device.type != "cuda" and not triton_interpreter_on():
        raise RuntimeError("the triton backend runs on CUDA tensors, or on CPU tensors with "
                           "TRITON_INTERPRET=1 set before triton is imported")


def _table_elsewhere(table: torch.Tensor, device: torch.device) -> bool:
    """The feature table lives on another device than the parameters (host-resident)."""
    return table.device != device


def fused_acf(weights: ACFWeights, table: torch.Tensor, user_ids, profile_ids, profile_mask,
              pos=None, neg=None, return_attentions: bool = False, static_shapes: bool = False):
    """Functional entry point: (user, s_pos | None, s_neg | None, alpha | None, beta | None).

    A feature table on another device than the parameters (a host-resident table,
    `ACF(features_on_host=True)`) is reduced to the batch's distinct items on the host
    and copied over (`compact_table`); the kernels then run on that compact table.

    static_shapes=True: no value is read back to the host and every shape follows from
    the inputs' shapes (the distinct items padded to min(B * P, N), see
    fused.distinct_items), so the call can be captured in a CUDA graph. The ids are not
    range-checked here: acf_fast.training.cuda_graph checks them on the host before the copy."""
    device = weights.user_emb.device
    _check_device(device)
    D = weights.user_emb.shape[1]
    if weights.c_wx.shape[0] != D:
        raise ValueError("the triton backend needs the attention hidden size H == model_dim")
    weights.require_full_precision("triton")
    B, P = profile_ids.shape
    M = table.shape[1]
    if B * max(P, 1) * max(M, D) >= 2**31:
        # the attention kernels index per-slot rows with 32-bit offsets
        raise ValueError(f"{B} users x {P} profile slots is too large for one triton call "
                         f"(B * P * max(M, D) must stay below 2**31); split the batch")
    if P == 0:  # no slots at all: one padded slot gives the same result (alpha = 0)
        profile_ids = profile_ids.new_zeros((B, 1))
        profile_mask = profile_mask.new_zeros((B, 1))
    if static_shapes:
        if _table_elsewhere(table, device):
            raise ValueError("static_shapes needs the feature table on the parameters' device "
                             f"({device}), not on {table.device} (features_on_host=False)")
        capacity = min(profile_ids.numel(), weights.item_emb.shape[0] - 1)
        batch = fused.distinct_items(profile_ids, profile_mask, capacity)
    else:
        batch = fused.distinct_items(profile_ids, profile_mask)
    if _table_elsewhere(table, device):
        table, batch = fused.compact_table(table, batch, device)
    with_scores = pos is not None
    if not with_scores:
        pos = neg = user_ids.new_zeros(user_ids.shape)
    out = triton_forward(table, *batch, user_ids.long().contiguous(), profile_ids.long().contiguous(),
                         pos.long().contiguous(), neg.long().contiguous(), list(weights),
                         with_scores, return_attentions)
    user, spos, sneg, alpha, beta = out[:5]
    if not return_attentions:
        alpha, beta = None, None
    else:
        alpha, beta = alpha[:, :P].detach(), beta[:, :P].detach()
    return user, (spos if with_scores else None), (sneg if with_scores else None), alpha, beta


def user_vectors(model, user_ids, profile_ids, profile_mask, return_attentions=False):
    user, _, _, alpha, beta = fused_acf(ACFWeights.of(model), model.feature_table, user_ids,
                                        profile_ids, profile_mask,
                                        return_attentions=return_attentions)
    return user, alpha, beta


def pair_scores(model, user_ids, profile_ids, pos, neg, profile_mask):
    _, spos, sneg, _, _ = fused_acf(ACFWeights.of(model), model.feature_table, user_ids,
                                    profile_ids, profile_mask, pos=pos, neg=neg)
    return spos, sneg


def static_pair_scores(model, user_ids, profile_ids, pos, neg, profile_mask):
    """pair_scores with static shapes and no read-back (acf_fast.training.cuda_graph); the caller
    has checked the ids."""
    _, spos, sneg, _, _ = fused_acf(ACFWeights.of(model), model.feature_table, user_ids,
                                    profile_ids, profile_mask, pos=pos, neg=neg,
                                    static_shapes=True)
    return spos, sneg
