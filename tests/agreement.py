"""How the tests compare an implementation with the reference: one loss that reaches every
output, and one tolerance rule for outputs and gradients.

The rule (`assert_close_scaled`): |got - want| <= atol * max(1, max|want|) + rtol * |want|.
The absolute part scales with the tensor's own magnitude because gradients of different
parameters differ by orders of magnitude: a floor fit for the embedding gradients would
be meaningless for W_red's. Tolerances themselves stay with each test, next to the
measurement that justifies them.
"""

import torch

OUTPUTS = ("pos", "neg", "user", "alpha", "beta")


def assert_close_scaled(got, want, *, atol, rtol, what):
    got, want = got.detach(), want.detach()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def loss_weights(batch, d, dtype, device, seed=0):
    """Random cotangents, so pos, neg and user gradients all differ."""
    g = torch.Generator().manual_seed(seed)
    b = batch.user_ids.shape[0]
    return [t.to(device, dtype) for t in
            (torch.randn(b, generator=g), torch.randn(b, generator=g), torch.randn(b, d, generator=g))]


def run(model, batch, weights):
    """Scores, user vectors and attentions of one model, plus every parameter gradient."""
    wp, wn, wu = weights
    model.zero_grad(set_to_none=True)
    pos, neg = model(*batch)
    user, alpha, beta = model.user_vectors(batch.user_ids, batch.profile_ids, return_attentions=True)
    ((pos * wp).sum() + (neg * wn).sum() + (user * wu).sum()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return (pos, neg, user, alpha, beta), grads


def assert_grads_close(got: dict, want: dict, *, atol, rtol):
    """Every parameter gradient; w_v (created by the tutorial, never used) has none on
    either side."""
    for name, g_want in want.items():
        if g_want is None:
            assert got[name] is None, name
            continue
        assert got[name] is not None, name
        assert_close_scaled(got[name], g_want, atol=atol, rtol=rtol, what=f"grad of {name}")
