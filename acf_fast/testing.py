"""Random models and batches shared by the tests and the benchmarks.

Keeping them in the package means every backend's tests and every benchmark build
their inputs the same way, and benchmarks import baselines instead of rewriting them.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch

from .model.acf import ACF


class Batch(NamedTuple):
    user_ids: torch.Tensor
    profile_ids: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor
    profile_mask: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in self))


def random_features(n_items: int, m: int = 49, f: int = 2048, dtype=torch.float32,
                    seed: int = 0, nonneg: bool = True) -> torch.Tensor:
    """[n_items, M, F] features; ReLU outputs (nonneg) like ResNet layer4 by default."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_items, m, f, generator=g)
    if nonneg:
        x = x.relu_()
    return x.to(dtype)


def random_model(n_users: int = 16, n_items: int = 40, m: int = 49, f: int = 64, d: int = 32,
                 backend: str = "reference", feature_dtype=torch.float32, seed: int = 0,
                 dtype=torch.float32, features: torch.Tensor | None = None,
                 scale: float = 1.0) -> ACF:
    """An ACF with random parameters. `scale` multiplies every parameter (extreme logits)."""
    torch.manual_seed(seed)
    feats = features if features is not None else random_features(n_items, m, f, seed=seed + 1)
    model = ACF(n_users, n_items, features=feats, model_dim=d, feature_dtype=feature_dtype,
                backend=backend)
    if scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
    return model.to(dtype) if dtype != torch.float32 else model


def same_model(model: ACF, backend: str) -> ACF:
    """A second ACF with the same parameters, features and dtype, on another backend."""
    twin = copy.deepcopy(model)
    twin.backend = backend
    return twin


def random_batch(model: ACF, batch: int = 8, max_profile: int = 9, seed: int = 0,
                 lengths: list[int] | None = None, duplicates: bool = False) -> Batch:
    """Right-padded profiles with lengths drawn from 0..max_profile (or given)."""
    g = torch.Generator().manual_seed(seed)
    n_items, n_users = model.num_items, model.num_users
    if lengths is None:
        if not duplicates:
            max_profile = min(max_profile, n_items)
        lengths = torch.randint(0, max_profile + 1, (batch,), generator=g).tolist()
    elif not duplicates and max(lengths) > n_items:
        raise ValueError(f"a profile of {max(lengths)} distinct items needs more than {n_items} items")
    p = max(max(lengths), 1)
    profile = torch.zeros(batch, p, dtype=torch.long)
    for b, n in enumerate(lengths):
        if n:
            pool = torch.randint(1, n_items + 1, (n,), generator=g) if duplicates else \
                torch.randperm(n_items, generator=g)[:n] + 1
            profile[b, :n] = pool
    users = torch.randint(0, n_users, (batch,), generator=g)
    pos = torch.randint(1, n_items + 1, (batch,), generator=g)
    neg = torch.randint(1, n_items + 1, (batch,), generator=g)
    device = model.item_model.weight.device
    return Batch(users, profile, pos, neg, profile != 0).to(device)


def wikimedia_batch(model: ACF, batch: int = 128, seed: int = 0) -> Batch:
    """The benchmark shape: B users, P <= 9 with lengths uniform in 0..9."""
    return random_batch(model, batch=batch, max_profile=9, seed=seed)
