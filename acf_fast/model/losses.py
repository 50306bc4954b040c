"""The tutorial's training losses (trainers/loss.py) and the paper's BPR."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_loss(pos, neg, b=0.0, collapse=True):
    """The tutorial's `bpr_loss`: mean(sigmoid(neg - pos + b))."""
    res = torch.sigmoid(neg - pos + b)
    return res.mean() if collapse else res


def warp_loss(pos, neg, b=1.0, collapse=True):
    """The tutorial's WARP-like loss: violations weighted by log(#violations + 1) + 1."""
    loss = sigmoid_loss(pos, neg, b, collapse=False)
    m = (loss > 0.5).to(loss.dtype)
    m = m * (torch.log(m.sum() + 1) + 1)
    res = m * loss
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
