"""float64 gradcheck through the Triton path (kernels included), for every parameter."""

import pytest
import torch
from torch.func import functional_call
from torch.nn.utils.stateless import _reparametrize_module

pytest.importorskip("triton")
from conftest import require_triton_runnable  # noqa: E402

from acf_fast.backends.registry import triton_interpreter_on  # noqa: E402

require_triton_runnable()

from acf_fast.testing import random_batch, random_model  # noqa: E402

DEVICE = "cpu" if triton_interpreter_on() else "cuda"


@pytest.fixture(scope="module")
def model():
    # tiny on purpose: full gradcheck perturbs every parameter element twice
    m = random_model(n_users=3, n_items=5, m=3, f=5, d=4, dtype=torch.float64,
                     backend="triton").to(DEVICE)
    assert m.feature_table.dtype == torch.float64 and m.resolved_backend() == "triton"
    return m


def _params(model):
    names = [n for n, _ in model.named_parameters() if not n.startswith("user_model.w_v.")]
    params = tuple(dict(model.named_parameters())[n].detach().clone().requires_grad_(True)
                   for n in names)
    return names, params


def test_gradcheck_pair_scores(model):
    # padding, an empty profile, a single item, duplicates within and across profiles
    batch = random_batch(model, batch=3, seed=1, lengths=[3, 0, 1], duplicates=True)
    batch = batch._replace(profile_ids=torch.tensor([[2, 2, 4], [0, 0, 0], [4, 0, 0]],
                                                    device=DEVICE))
    batch = batch._replace(profile_mask=batch.profile_ids != 0)
    names, params = _params(model)

    def f(*flat):
        return functional_call(model, dict(zip(names, flat)), tuple(batch))

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_gradcheck_user_vectors(model):
    batch = random_batch(model, batch=2, seed=2, lengths=[2, 0])
    names, params = _params(model)

    def f(*flat):
        with _reparametrize_module(model, dict(zip(names, flat))):
            user, _, _ = model.user_vectors(batch.user_ids, batch.profile_ids)
        return user

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
