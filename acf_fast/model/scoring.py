"""Scoring users against the whole catalogue, blocked so memory stays bounded."""

from __future__ import annotations

import torch


def catalogue_columns(all_items: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Catalogue column of each item id (-1 for padding and ids outside the catalogue)."""
    column_of = torch.full((int(all_items.max()) + 1,), -1, dtype=torch.long, device=all_items.device)
    column_of[all_items] = torch.arange(all_items.numel(), device=all_items.device)
    items = items.to(all_items.device).long()
    inside = (items > 0) & (items < column_of.numel())
    return torch.where(inside, column_of[items.clamp(0, column_of.numel() - 1)], -1)


@torch.no_grad()
def rank_targets(scores: torch.Tensor, all_items: torch.Tensor, targets: torch.Tensor,
                 exclude: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each target among the catalogue, excluded items not counted above it.

    scores [B, N] (column c scores item all_items[c]); targets [B, L] item ids (0 = padding,
    rank -1); exclude [B, E] item ids (0 = none) removed from the competition. A pure
    function of its inputs: evaluation and training validation share it.
    """
    scores = scores.clone()
    tcols = catalogue_columns(all_items, targets)
    if (tcols[targets > 0] < 0).any():
        bad = targets[(targets > 0) & (tcols < 0)][0]
        raise ValueError(f"target item id {int(bad)} is not in the model's catalogue")
    tscore = scores.gather(1, tcols.clamp(min=0))
    if exclude is not None:
        ecols = catalogue_columns(all_items, exclude)
        rows = torch.arange(scores.shape[0], device=scores.device)[:, None].expand_as(ecols)
        keep = ecols >= 0
        scores[rows[keep], ecols[keep]] = float("-inf")
    ordered = scores.sort(dim=1).values
    above = scores.shape[1] - torch.searchsorted(ordered, tscore.contiguous(), right=True)
    return torch.where(targets > 0, above, torch.full_like(above, -1))


def as_exclude(exclude, num_rows: int) -> torch.Tensor | None:
    """`exclude` as a [num_rows, E] tensor of item ids (0 = none), checked for shape and
    dtype. Accepts a tensor, a numpy array, or one list of ids per row (lists of different
    lengths are padded with 0); anything else is a TypeError naming the argument."""
    if exclude is None:
        return None
    if not isinstance(exclude, torch.Tensor):
        rows = exclude
        if isinstance(exclude, (list, tuple)) and all(isinstance(r, (list, tuple, range)) for r in exclude):
            width = max((len(r) for r in exclude), default=0)
            rows = [list(r) + [0] * (width - len(r)) for r in exclude]
        try:
            exclude = torch.as_tensor(rows)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise TypeError(f"exclude must be item ids: a [{num_rows}, E] tensor or array, or one "
                            f"list of ids per user; got {type(exclude).__name__} ({exc})") from None
    if exclude.dim() != 2 or exclude.shape[0] != num_rows:
        raise ValueError(f"exclude must be [{num_rows}, E] item ids, got shape {tuple(exclude.shape)}")
    if exclude.is_floating_point() or exclude.is_complex() or exclude.dtype == torch.bool:
        raise TypeError(f"exclude must hold integer item ids, got {exclude.dtype}")
    return exclude


def _excluded_columns(all_items: torch.Tensor, exclude, num_rows: int):
    """(rows, cols) of excluded (user, catalogue column) pairs; id 0 in exclude means none."""
    exclude = as_exclude(exclude, num_rows).to(all_items.device)
    if exclude.numel():
        lo, hi = int(exclude.min()), int(exclude.max())
        top = int(all_items.max())
        if lo < 0 or hi > top:
            raise ValueError(f"exclude contains item id {lo if lo < 0 else hi}, expected ids in "
                             f"[0, {top}] (0 = none)")
    cols = catalogue_columns(all_items, exclude)
    rows = torch.arange(num_rows, device=all_items.device).unsqueeze(1).expand_as(cols)
    keep = cols >= 0
    return rows[keep], cols[keep]


def score_catalogue(user: torch.Tensor, item_emb: torch.Tensor, all_items: torch.Tensor,
                    model_dim: int, k: int | None = None, exclude: torch.Tensor | None = None,
                    block_items: int = 65536):
    """user [B, D] against item_emb[all_items] -> scores [B, N], or top-k (scores, item ids).

    With k, items are scored in blocks of `block_items` and a running top-k is kept, so
    peak memory is O(B * (block_items + k)) whatever the catalogue size.
    `exclude` [B, E] holds item ids (0 = none) that get -inf (they rank last). When
    exclusions leave a user fewer than k items, the missing places hold item id 0 (the
    padding id, no item) with score -inf.
    """
    all_items = all_items.to(item_emb.device)
    user = user.to(item_emb.dtype)
    n = all_items.numel()
    ex_rows, ex_cols = (None, None) if exclude is None else _excluded_columns(all_items, exclude, user.shape[0])
    if k is None:
        scores = user @ item_emb[all_items].T / model_dim
        if ex_rows is not None:
            scores[ex_rows, ex_cols] = float("-inf")
        return scores
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    best_s = user.new_full((user.shape[0], 0), float("-inf"))
    best_i = torch.empty((user.shape[0], 0), dtype=torch.long, device=user.device)
    for start in range(0, n, block_items):
        ids = all_items[start:start + block_items]
        scores = user @ item_emb[ids].T / model_dim
        if ex_rows is not None:
            sel = (ex_cols >= start) & (ex_cols < start + ids.numel())
            scores[ex_rows[sel], ex_cols[sel] - start] = float("-inf")
        cand_s = torch.cat([best_s, scores], dim=1)
        cand_i = torch.cat([best_i, ids.expand(user.shape[0], -1)], dim=1)
        top = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
        best_s, best_i = top.values, cand_i.gather(1, top.indices)
    if ex_rows is not None:
        best_i = best_i.masked_fill(best_s == float("-inf"), 0)
    return best_s, best_i


BLOCK_BYTES = 256 * 2**20   # working memory of one block of users in recommend_batch


def user_block_size(model, profile_width: int, block_items: int, k: int | None = None,
                    budget: int | None = None) -> int:
    """Users per block so that one block's working memory stays near `budget`: the
    reference backend gathers [B, P, M, F] features and [P, M, B, D] activations (the
    fused backends need less), and scoring holds a [B, block_items + k] block."""
    table = model.feature_table
    param = model.item_model.weight
    m, f, d = table.shape[1], table.shape[-1], model.model_dim
    # the fused backends reduce each distinct item once and never hold the gathered features
    gathered = f * param.element_size() if model.resolved_backend() == "reference" else 0
    per_user = (max(profile_width, 1) * m * (gathered + 4 * d * param.element_size())
                + (min(model.all_items.numel(), block_items) + (k or 0)) * 4 * 3)
    return max(1, (BLOCK_BYTES if budget is None else budget) // per_user)


@torch.no_grad()
def recommend_in_blocks(model, user_ids, profile_ids, k=None, exclude=None, return_attentions=False,
                        profile_mask=None, block_items: int = 65536, block_users: int | None = None):
    """`ACF.recommend_batch`, over blocks of users: peak memory is one block's (see
    user_block_size) plus the result, whatever the number of users."""
    user_ids, profile_ids, profile_mask, _, _ = model._check_batch(user_ids, profile_ids, profile_mask)
    n = user_ids.shape[0]
    exclude = as_exclude(exclude, n)
    if exclude is not None:
        _excluded_columns(model.all_items, exclude, n)      # every id checked before any work
    step = block_users or user_block_size(model, profile_ids.shape[1], block_items, k)
    if step < 1:
        raise ValueError(f"block_users must be >= 1, got {block_users}")
    blocks = [(s, min(s + step, n)) for s in range(0, n, step)] or [(0, 0)]
    full, tops, betas, alphas = None, [], [], []
    for s, e in blocks:
        user, alpha, beta = model.user_vectors(user_ids[s:e], profile_ids[s:e], profile_mask[s:e],
                                               return_attentions)
        result = score_catalogue(user, model.item_model.weight, model.all_items, model.model_dim,
                                 k=k, exclude=None if exclude is None else exclude[s:e],
                                 block_items=block_items)
        # NaN (or +inf) scores would rank first and give meaningless metrics downstream.
        # Checked on what is returned (the user vectors and the scores), not on the whole
        # item table: that would cost a pass over N x D per call, per user in a loop.
        scores = result[0] if k is not None else result
        if not (torch.isfinite(user).all() & ~(scores.isnan() | (scores == float("inf"))).any()):
            raise ValueError("the model's user vectors or item embeddings are not finite "
                             "(NaN/inf parameters, e.g. from a diverged training run); no "
                             "ranking is possible")
        if len(blocks) == 1:
            return (result, beta, alpha) if return_attentions else result
        if k is None:      # [B, N] filled in place: no second copy of the largest thing returned
            full = result.new_empty((n, result.shape[1])) if full is None else full
            full[s:e] = result
        else:
            tops.append(result)
        betas.append(beta), alphas.append(alpha)
    result = full if k is None else tuple(torch.cat(col) for col in zip(*tops))
    if return_attentions:
        return result, torch.cat(betas), torch.cat(alphas)
    return result
