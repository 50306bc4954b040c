"""Python side of the CPU backend's native ops: fake (meta) kernels and autograd.

The ops live in csrc/acf_cpu_*.cpp (added to the acf_fast library with
TORCH_LIBRARY_FRAGMENT). `register_fake` lets torch.compile trace them;
`register_autograd` ties each forward to its native backward:

- acf_fast::reduce_items(table, items, W_red, b_red, bf16_gemm) -> R [K, M, D]:
  W_red once per distinct item; backward gives (dW_red, db_red) (the table is data).
  bf16_gemm multiplies a bfloat16 table in bf16 instead of widening it to the compute
  dtype (see csrc/acf_cpu_reduce.cpp; default from ACF_FAST_BF16_GEMM=1).
- acf_fast::acf_attention(xy, uc, ut, pp, prof, slot_item, w2, c2, w1, c1)
  -> (user [B, D], alpha [B, P], beta [B, P, M]): both attention levels fused;
  backward recomputes from the saved softmaxes alpha and beta.
"""

from __future__ import annotations

import torch

from ..utils import env
from . import cpu_extension as _ext

_REGISTERED = False


def _reduce_setup(ctx, inputs, output):
    table, items, weight, _bias, bf16_gemm = inputs
    ctx.bf16_gemm = bf16_gemm
    ctx.save_for_backward(table, items, weight)


def _reduce_backward(ctx, grad):
    table, items, weight = ctx.saved_tensors
    if not (ctx.needs_input_grad[2] or ctx.needs_input_grad[3]):
        return None, None, None, None, None
    dw, db = torch.ops.acf_fast.reduce_items_backward(grad.contiguous(), table, items, weight,
                                                      ctx.bf16_gemm)
    return None, None, dw, db, None


def _attention_setup(ctx, inputs, output):
    xy, uc, ut, pp, prof, slot_item, w2, c2, w1, c1 = inputs
    _user, alpha, beta = output
    ctx.shapes = (c2.shape, c1.shape)
    ctx.save_for_backward(xy, uc, ut, pp, prof, slot_item, w2, w1, alpha, beta)


def _attention_backward(ctx, g_user, g_alpha, g_beta):
    xy, uc, ut, pp, prof, slot_item, w2, w1, alpha, beta = ctx.saved_tensors
    # outputs nobody used arrive as None: they contribute nothing
    g_user = torch.zeros_like(ut) if g_user is None else g_user
    g_alpha = torch.zeros_like(alpha) if g_alpha is None else g_alpha
    g_beta = torch.zeros_like(beta) if g_beta is None else g_beta
    g_xy, g_uc, g_ut, g_pp, g_prof, g_w2, g_c2, g_w1, g_c1 = torch.ops.acf_fast.acf_attention_backward(
        g_user, g_alpha, g_beta, xy, uc, ut, pp, prof, slot_item, w2, w1, alpha, beta)
    c2_shape, c1_shape = ctx.shapes
    return (g_xy, g_uc, g_ut, g_pp, g_prof, None, g_w2, g_c2.reshape(c2_shape), g_w1,
            g_c1.reshape(c1_shape))


def register() -> None:
    """Load the extension and register fake kernels and autograd (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _ext.load()

    @torch.library.register_fake("acf_fast::reduce_items")
    def _(table, items, weight, bias, bf16_gemm=False):
        return weight.new_empty((items.shape[0], table.shape[1], weight.shape[0]))

    @torch.library.register_fake("acf_fast::reduce_items_backward")
    def _(grad, table, items, weight, bf16_gemm=False):
        return weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))

    @torch.library.register_fake("acf_fast::acf_attention")
    def _(xy, uc, ut, pp, prof, slot_item, w2, c2, w1, c1):
        b, p = slot_item.shape
        return ut.new_empty(ut.shape), ut.new_empty((b, p)), ut.new_empty((b, p, xy.shape[1]))

    @torch.library.register_fake("acf_fast::acf_attention_backward")
    def _(g_user, g_alpha, g_beta, xy, uc, ut, pp, prof, slot_item, w2, w1, alpha, beta):
        return (xy.new_empty(xy.shape), uc.new_empty(uc.shape), ut.new_empty(ut.shape),
                pp.new_empty(pp.shape), prof.new_empty(prof.shape), w2.new_empty(w2.shape),
                xy.new_empty((1,)), w1.new_empty(w1.shape), xy.new_empty((1,)))

    torch.library.register_autograd("acf_fast::reduce_items", _reduce_backward,
                                    setup_context=_reduce_setup)
    torch.library.register_autograd("acf_fast::acf_attention", _attention_backward,
                                    setup_context=_attention_setup)
    _REGISTERED = True


def bf16_gemm_default() -> bool:
    """ACF_FAST_BF16_GEMM=1: bf16 tables multiply in bf16 (faster only with AMX-class units)."""
    return env.bf16_gemm()


def reduce_items(table, items, weight, bias, bf16_gemm: bool | None = None):
    """[K, M, D] = table[items] @ weight.T + bias, in weight's dtype (float32 accumulation)."""
    register()
    if bf16_gemm is None:
        bf16_gemm = bf16_gemm_default()
    return torch.ops.acf_fast.reduce_items(table, items, weight, bias, bf16_gemm)


def acf_attention(xy, uc, ut, pp, prof, slot_item, w2, c2, w1, c1):
    """(user [B, D], alpha [B, P], beta [B, P, M]); see csrc/acf_cpu_attention.cpp."""
    register()
    return torch.ops.acf_fast.acf_attention(xy, uc, ut, pp, prof, slot_item, w2, c2, w1, c1)
