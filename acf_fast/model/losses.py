"""The tutorial's training losses (trainers/loss.py) and the paper's BPR.

Each loss is the mean of per-example terms. `per_example_terms` gives those terms for
a piece of a larger batch (docs/distributed.md#loss-equivalence): stand-in rows that
count for nothing, and WARP's violation count totalled over the whole batch.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def sigmoid_loss(pos, neg, b=0.0, collapse=True):
    """The tutorial's `bpr_loss`: mean(sigmoid(neg - pos + b))."""
    res = torch.sigmoid(neg - pos + b)
    return res.mean() if collapse else res


def _warp_terms(pos, neg, b=1.0, real=None, total=None):
    """WARP's per-example terms; `real` masks stand-ins out of the violation count, `total`
    sums the count over a batch larger than this piece (default: this piece's count)."""
    loss = sigmoid_loss(pos, neg, b, collapse=False)
    violating = loss > 0.5
    if real is not None:
        violating = violating & real
    m = violating.to(loss.dtype)
    count = m.sum() if total is None else total(m.sum().detach())
    return m * (torch.log(count + 1) + 1) * loss


def warp_loss(pos, neg, b=1.0, collapse=True):
    """The tutorial's WARP-like loss: violations weighted by log(#violations + 1) + 1."""
    res = _warp_terms(pos, neg, b)
    return res.mean() if collapse else res


def bpr_loss(pos, neg, collapse=True):
    """Rendle et al. 2009: -mean(log sigmoid(pos - neg))."""
    res = -F.logsigmoid(pos - neg)
    return res.mean() if collapse else res


LOSSES = {"warp": warp_loss, "sigmoid": sigmoid_loss, "bpr": bpr_loss}


def get_loss(name: str):
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    return LOSSES[name]


def per_example_terms(name: str, pos: torch.Tensor, neg: torch.Tensor, n_real: int | None = None,
                      total: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The per-example terms of loss `name` for one piece of a batch.

    Rows from `n_real` on are stand-ins: their term is 0 and WARP does not count them as
    violations. `total` turns this piece's (detached) violation count into the whole
    batch's, e.g. an all-reduce over the ranks sharing it; without it the count is the
    piece's own. With neither, the mean of the terms is `get_loss(name)(pos, neg)`.
    """
    loss = get_loss(name)
    n_real = pos.shape[0] if n_real is None else n_real
    real = torch.arange(pos.shape[0], device=pos.device) < n_real
    if loss is warp_loss:
        return _warp_terms(pos, neg, real=real, total=total)
    terms = loss(pos, neg, collapse=False)
    return torch.where(real, terms, torch.zeros_like(terms))
