"""A flat view of ACF's parameters for the fused backends.

The module tree keeps the tutorial's names (so its checkpoints load); kernels want
plain tensors. `ACFWeights.of(model)` hands out the very Parameter objects, so
autograd through a backend reaches the model's parameters.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ACFWeights(NamedTuple):
    item_emb: torch.Tensor      # [N+1, D] target items v_j (row 0 = padding)
    profile_emb: torch.Tensor   # [N+1, D] profile items p_l (the same tensor when tied)
    user_emb: torch.Tensor      # [U, D]   raw users u_i
    red_w: torch.Tensor         # [D, F]   W_red (dim_reductor)
    red_b: torch.Tensor         # [D]
    c_wx: torch.Tensor          # [H, D]   component attention W2x
    c_bx: torch.Tensor          # [H]
    c_wu: torch.Tensor          # [H, D]   component attention W2u
    c_bu: torch.Tensor          # [H]
    c_w: torch.Tensor           # [1, H]   w2
    c_b: torch.Tensor           # [1]      c2
    i_wu: torch.Tensor          # [D, D]   item attention W1u (also projects the user)
    i_bu: torch.Tensor          # [D]
    i_wp: torch.Tensor          # [D, D]   W1p
    i_bp: torch.Tensor          # [D]
    i_wx: torch.Tensor          # [D, D]   W1x
    i_bx: torch.Tensor          # [D]
    i_w: torch.Tensor           # [1, D]   w1
    i_b: torch.Tensor           # [1]      c1

    @classmethod
    def of(cls, model) -> "ACFWeights":
        um = model.user_model
        fe = um.feats
        return cls(
            item_emb=model.item_model.weight,
            profile_emb=um.profile_embedding.weight,
            user_emb=um.user_embedding.weight,
            red_w=fe.dim_reductor.weight, red_b=fe.dim_reductor.bias,
            c_wx=fe.w_x.weight, c_bx=fe.w_x.bias,
            c_wu=fe.w_u.weight, c_bu=fe.w_u.bias,
            c_w=fe.w.weight, c_b=fe.w.bias,
            i_wu=um.w_u.weight, i_bu=um.w_u.bias,
            i_wp=um.w_p.weight, i_bp=um.w_p.bias,
            i_wx=um.w_x.weight, i_bx=um.w_x.bias,
            i_w=um.w.weight, i_b=um.w.bias,
        )

    def require_full_precision(self, backend: str) -> None:
        """The fused backends compute in the parameters' dtype: 16-bit parameters would
        accumulate in 16 bits. A 16-bit feature table (feature_dtype=) is the supported
        way to halve memory."""
        dtypes = {t.dtype for t in self}
        if not dtypes <= {torch.float32, torch.float64} or len(dtypes) != 1:
            raise ValueError(f"the {backend} backend needs float32 or float64 parameters (all "
                             f"the same), got {sorted(map(str, dtypes))}; keep the module in "
                             "float32 and pass feature_dtype=torch.bfloat16 for a 16-bit "
                             "feature table")
