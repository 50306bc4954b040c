"""The native CPU backend: the one module that loads the extension acf_fast._C (with a
useful message when it is absent or stale) and registers its fakes and autograd.

Plan per batch (cost model: docs/model.md#cost-per-batch):
1. the distinct real items of the batch's profiles (padding skipped) and, per slot,
   the index of its item among them (-1 for padding): acf_fast.backends.planning, the
   planner the triton backend uses too;
2. R = W_red x + b_red for those items only (acf_fast::reduce_items: chunked gather +
   GEMM on the unit acf_fast.backends.gemm_choice measured fastest where 16-bit GEMMs
   are allowed (a bf16 table; an fp32 one under precision "medium"), exact fp32 else);
3. the GEMMs that do not depend on the (user, slot) pair, by ATen: [W2x; W1x] R per
   item, W2u u and W1u u per user, W1p p per slot (biases folded where cheapest);
4. acf_fast::acf_attention: both softmaxes and the user vector, fused per user.
Autograd runs through ATen for the GEMMs and through the native backwards for 2 and 4.

The ops (schemas in csrc/acf_library.cpp, CPU kernels in csrc/acf_cpu_*.cpp):

- acf_fast::reduce_items(table, items, W_red, b_red, gemm, grad_gemm) -> R [K, M, D]:
  W_red once per distinct item; backward gives (dW_red, db_red) (the table is data).
  gemm / grad_gemm: the GEMM kind of the forward / of W_red's gradient (0 fp32, 1 bf16
  by oneDNN, 2 MKL bf16; csrc/acf_cpu_reduce.cpp).
- acf_fast::acf_attention(xy, uc, ut, pp, prof, slot_item, w2, c2, w1, c1)
  -> (user [B, D], alpha [B, P], beta [B, P, M]): both attention levels fused;
  backward recomputes from the saved softmaxes alpha and beta.

`register_fake` lets torch.compile trace them; `register_autograd` ties each forward to
its native backward. Import of acf_fast never needs the extension: importing this module
loads and registers it where it can, and a call of the backend says why it cannot.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model.reference import score
from ..model.weights import ACFWeights
from ..utils import env
from . import gemm_choice, planning
from .source_hash import source_hash

# ------------------------------------------------------------------ loading the extension

BUILD_HINT = ("build it with `make build` (or `pip install --no-build-isolation -e .` in the "
              "repository), or choose backend='reference'")

_CSRC = Path(__file__).resolve().parents[2] / "csrc"


def _checkout_source_hash() -> str | None:
    """Hash of csrc/ in a source checkout (the recipe setup.py compiles in); None when installed."""
    return source_hash(_CSRC) if _CSRC.is_dir() else None


class ExtensionError(RuntimeError):
    pass


@lru_cache(maxsize=None)
def _load():
    """(ops namespace, None) on success, (None, reason) on failure."""
    try:
        from .. import _C  # noqa: F401  (registers torch.ops.acf_fast.*)
    except ImportError as exc:
        return None, f"the native extension acf_fast._C is not built ({exc})"
    except OSError as exc:  # e.g. undefined symbol after a torch upgrade
        return None, f"the native extension acf_fast._C failed to load ({exc})"
    built = torch.ops.acf_fast.source_hash()
    expected = _checkout_source_hash()
    if expected is not None and built != expected and not env.allow_stale_extension():
        return None, (f"the native extension acf_fast._C is stale (built from csrc/ {built}, "
                      f"sources now {expected})")
    return torch.ops.acf_fast, None


def load(required: bool = True):
    """The `torch.ops.acf_fast` namespace, or None (required=False) / ExtensionError."""
    ops, reason = _load()
    if ops is None and required:
        raise ExtensionError(f"{reason}; {BUILD_HINT}")
    return ops


BF16 = gemm_choice.KINDS.index("bf16")

# ------------------------------------------------------------------ fakes and autograd

_REGISTERED = False


def _reduce_setup(ctx, inputs, output):
    table, items, weight, _bias, _gemm, grad_gemm = inputs
    ctx.grad_gemm = grad_gemm
    ctx.save_for_backward(table, items, weight)


def _reduce_backward(ctx, grad):
    table, items, weight = ctx.saved_tensors
    if not (ctx.needs_input_grad[2] or ctx.needs_input_grad[3]):
        return None, None, None, None, None, None
    dw, db = torch.ops.acf_fast.reduce_items_backward(grad.contiguous(), table, items, weight,
                                                      ctx.grad_gemm)
    return None, None, dw, db, None, None


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
    load()

    @torch.library.register_fake("acf_fast::reduce_items")
    def _(table, items, weight, bias, gemm=0, grad_gemm=0):
        return weight.new_empty((items.shape[0], table.shape[1], weight.shape[0]))

    @torch.library.register_fake("acf_fast::reduce_items_backward")
    def _(grad, table, items, weight, gemm=0):
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


# Done with the module's import where the extension loads (a few ms): a first call under
# torch.compile then finds the fakes in place instead of tracing into the loading (file
# hashing, an op returning a str) and the registrations, which broke the graph. Where it
# does not load, nothing happens here and the first call says why.
if load(required=False) is not None:
    register()


@torch.compiler.assume_constant_result
def _gemm_codes(table_dtype, weight_dtype, m, f, d) -> tuple[int, int]:
    # a constant to torch.compile: the choice reads a file and may time GEMMs once
    return gemm_choice.for_shape(table_dtype, weight_dtype, m, f, d).codes()


def gemm_codes(table, weight, gemm: str | None = None) -> tuple[int, int]:
    """(forward, weight-gradient) GEMM kind codes for reduce_items.

    gemm: None = the measured choice (gemm_choice) where 16-bit GEMMs are allowed, exact
    fp32 else; a kind name (gemm_choice.KINDS) forces it for both directions (a 16-bit
    kind on an exact fp32 table too: that is the caller's explicit decision)."""
    register()
    if gemm is None:
        return _gemm_codes(table.dtype, weight.dtype, int(table.shape[1]), int(table.shape[2]),
                           int(weight.shape[0]))
    if gemm in gemm_choice.KINDS:
        return (gemm_choice.KINDS.index(gemm),) * 2
    raise ValueError(f"gemm must be None or one of {', '.join(gemm_choice.KINDS)}, got {gemm!r}")


def reduce_items(table, items, weight, bias, gemm: str | None = None, codes=None):
    """[K, M, D] = table[items] @ weight.T + bias, in weight's dtype (float32 accumulation);
    gemm as in gemm_codes (or the codes themselves)."""
    codes = codes if codes is not None else gemm_codes(table, weight, gemm)
    return torch.ops.acf_fast.reduce_items(table, items, weight, bias, *codes)


def acf_attention(xy, uc, ut, pp, prof, slot_item, w2, c2, w1, c1):
    """(user [B, D], alpha [B, P], beta [B, P, M]); see csrc/acf_cpu_attention.cpp."""
    register()
    return torch.ops.acf_fast.acf_attention(xy, uc, ut, pp, prof, slot_item, w2, c2, w1, c1)


# ------------------------------------------------------------------ backend contract

def _slot_items(profile_ids: torch.Tensor, profile_mask: torch.Tensor):
    """(distinct real item ids [K], sorted; slot -> index into them [B, P] int64, -1 on
    padding), from the shared planner (its exact layout: no static capacity)."""
    plan = planning.distinct_items(profile_ids, profile_mask)
    return plan.item_ids, plan.slot_item.long()


def user_vectors(model, user_ids, profile_ids, profile_mask, return_attentions=False):
    w = ACFWeights.of(model)
    w.require_full_precision("cpu")
    items, slot_item = _slot_items(profile_ids, profile_mask)
    codes = gemm_codes(model.feature_table, w.red_w)
    r = reduce_items(model.feature_table, items, w.red_w, w.red_b, codes=codes)
    # one GEMM for both per-item projections: columns [0, H) W2x r, [H, H+D) W1x r. No
    # bias here (it would cost a copy of the [K, M, H + D] output): b2x only ever appears
    # in W2x r + b2x + W2u u + b2u, so it joins b2u; b1x likewise joins b1p.
    wxy = torch.cat([w.c_wx, w.i_wx])
    if codes[0] == BF16 and r.dtype == torch.float32:
        # Where W_red runs in bf16 these GEMMs (a third of the rest of the step's FLOPs,
        # over the same K x M rows) do too, forward and backward: R just came out of a bf16
        # GEMM, so one more rounding of it and of W_xy stays within the same bound.
        xy = F.linear(r.to(torch.bfloat16), wxy.to(torch.bfloat16)).float()
    else:
        xy = F.linear(r, wxy)
    u = F.embedding(user_ids, w.user_emb)
    uc = F.linear(u, w.c_wu, w.c_bu + w.c_bx)
    ut = F.linear(u, w.i_wu, w.i_bu)
    prof = F.embedding(profile_ids, w.profile_emb, padding_idx=model.pad_token)
    pp = F.linear(prof, w.i_wp, w.i_bp + w.i_bx)
    user, alpha, beta = acf_attention(xy, uc, ut, pp, prof, slot_item,
                                      w.c_w.reshape(-1), w.c_b, w.i_w.reshape(-1), w.i_b)
    if return_attentions:
        return user, alpha, beta
    return user, None, None


def pair_scores(model, user_ids, profile_ids, pos, neg, profile_mask):
    user, _, _ = user_vectors(model, user_ids, profile_ids, profile_mask)
    d = model.model_dim
    return score(user, model.item_model(pos), d), score(user, model.item_model(neg), d)
