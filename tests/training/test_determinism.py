"""Deterministic mode: two training runs with the same seed give bit-identical parameters."""

import pytest
import torch

from acf_fast.backends import registry as backend_select
from acf_fast.utils import determinism
from acf_fast.model.losses import warp_loss
from acf_fast.testing import random_batch, random_model

BACKENDS = ["reference"] + (["cpu"] if backend_select.cpu_extension_available() else [])


def train(backend, steps=4):
    determinism.seed_everything(7)
    model = random_model(n_users=6, n_items=20, m=5, f=12, d=8, backend=backend, seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-5)
    for s in range(steps):
        batch = random_batch(model, batch=6, seed=s, duplicates=True)
        opt.zero_grad()
        warp_loss(*model(*batch)).backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_gives_bit_identical_parameters(backend):
    determinism.enable(seed=0)
    try:
        first, second = train(backend), train(backend)
    finally:
        determinism.disable()
    for k in first:
        assert torch.equal(first[k], second[k]), k
    assert not torch.equal(first["item_model.weight"], train(backend, steps=5)["item_model.weight"])


def test_enable_and_disable():
    determinism.enable(seed=None)
    assert determinism.enabled() and torch.are_deterministic_algorithms_enabled()
    determinism.disable()
    assert not determinism.enabled()
