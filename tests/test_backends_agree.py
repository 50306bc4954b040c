"""Property tests: every backend agrees with the reference on generated inputs.

Shapes, profile lengths (all-padded rows included), duplicate items and parameter
scales are drawn by hypothesis (derandomized in CI, see conftest.py). Extreme scales
push the attention logits to about +-1e4: softmaxes must stay finite and exact.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from acf_fast import backend as backend_select
from acf_fast.testing import random_batch, random_model, same_model


def available_backends():
    names = []
    if backend_select.cpu_extension_available():
        names.append("cpu")
    if backend_select.triton_supports(torch.device("cpu")):
        names.append("triton")
    return names


BACKENDS = available_backends()
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no fused backend available here")

# Under the Triton interpreter each example costs seconds: few, small examples.
EXAMPLES = {"cpu": 25, "triton": 6}


@st.composite
def problems(draw):
    b = draw(st.integers(1, 5))
    p = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(0, p), min_size=b, max_size=b))
    return dict(
        b=b, lengths=lengths,
        m=draw(st.sampled_from([1, 3, 49])),
        f=draw(st.integers(1, 19)),
        d=draw(st.sampled_from([2, 8, 13, 32])),
        n_items=draw(st.integers(max(p, 1), 12)),
        duplicates=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        logit_scale=draw(st.sampled_from([1.0, 1e2, 1e4])),
    )


def build(pr, dtype):
    model = random_model(n_users=3, n_items=pr["n_items"], m=pr["m"], f=pr["f"], d=pr["d"],
                         seed=pr["seed"], dtype=dtype)
    with torch.no_grad():  # w1 and w2 set the attention logits' scale directly
        model.user_model.feats.w.weight.mul_(pr["logit_scale"])
        model.user_model.w.weight.mul_(pr["logit_scale"])
    batch = random_batch(model, batch=pr["b"], lengths=pr["lengths"], seed=pr["seed"],
                         duplicates=pr["duplicates"] or max(pr["lengths"]) > pr["n_items"])
    return model, batch


def outputs_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    pos, neg = model(*batch)
    (pos * 1.3 - neg * 0.7).sum().backward()
    _, alpha, beta = model.user_vectors(batch.user_ids, batch.profile_ids, return_attentions=True)
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
             for n, p in model.named_parameters()}
    return pos.detach(), neg.detach(), alpha, beta, grads


def assert_agree(got, want, rtol, atol, what):
    got, want = got.detach(), want.detach()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = float(want.abs().max().clamp_min(1.0)) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_backend_agrees_with_reference(name, dtype):
    tol = {torch.float64: 1e-9, torch.float32: 2e-4}[dtype]

    @settings(max_examples=EXAMPLES[name])
    @given(pr=problems())
    def check(pr):
        ref, batch = build(pr, dtype)
        fused = same_model(ref, name)
        want = outputs_and_grads(ref, batch)
        got = outputs_and_grads(fused, batch)
        for what, g, w in zip(("pos", "neg", "alpha", "beta"), got[:4], want[:4]):
            assert_agree(g, w, tol, tol, what)
        assert torch.equal(got[2] == 0, want[2] == 0) or pr["logit_scale"] > 1, "alpha support"
        for n in want[4]:
            assert_agree(got[4][n], want[4][n], tol, tol * 10, f"grad {n}")

    check()
