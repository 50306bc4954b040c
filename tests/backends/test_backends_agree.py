"""Property tests: every backend agrees with the reference on generated inputs.

Shapes, profile lengths (all-padded rows included), duplicate items and parameter
scales are drawn by hypothesis (derandomized in CI, see conftest.py). Extreme scales
push the attention logits to about +-1e4: softmaxes must stay finite and exact.

Besides a tolerance relative to each tensor's largest entry, every element of every
output and gradient is held to the reference's own rounding error at that place (see
`noise`), so an error confined to small entries cannot hide under the large ones.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from agreement import assert_close_scaled
from conftest import backends_required

from acf_fast.backends import registry as backend_select
from acf_fast.testing import random_batch, random_model, same_model

CPU = torch.device("cpu")
# conftest.py: with ACF_FAST_REQUIRE_BACKENDS set, a backend that cannot run fails here
REQUIRED = backends_required()


def available_backends():
    names = []
    if REQUIRED or backend_select.cpu_extension_available():
        names.append("cpu")
    if REQUIRED or backend_select.triton_supports(CPU):
        names.append("triton")
    return names


BACKENDS = available_backends()
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no fused backend available here")

# Under the Triton interpreter each example costs seconds: few, small examples.
EXAMPLES = {"cpu": 25, "triton": 6}
# Each element's error may be NOISE_FACTOR times the reference's own rounding error
# there (see noise; measured with MC_RUNS randomly rounded runs), plus FLOOR_ULPS units
# in the last place of the tensor's largest entry (for entries that cancel to rounding
# noise of the tensor's scale). Over 300 random problems per dtype the cpu backend needed
# at most 7x, the triton backend at most 12x apart from the case in
# test_triton_component_softmax_recomputed_from_lse.
NOISE_FACTOR = 16.0
FLOOR_ULPS = 64
MC_RUNS = 3
EPS = {dt: torch.finfo(dt).eps for dt in (torch.float32, torch.float64)}
OUTPUTS = ("pos", "neg", "alpha", "beta")


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


def build(pr, dtype, shift=0.0):
    """The problem's model (shift: added to every component logit) and batch."""
    model = random_model(n_users=3, n_items=pr["n_items"], m=pr["m"], f=pr["f"], d=pr["d"],
                         seed=pr["seed"], dtype=dtype)
    with torch.no_grad():  # w1 and w2 set the attention logits' scale directly
        model.user_model.feats.w.weight.mul_(pr["logit_scale"])
        model.user_model.w.weight.mul_(pr["logit_scale"])
        model.user_model.feats.w.bias.add_(shift)
    batch = random_batch(model, batch=pr["b"], lengths=pr["lengths"], seed=pr["seed"],
                         duplicates=pr["duplicates"] or max(pr["lengths"]) > pr["n_items"])
    return model, batch


def outputs_and_grads(model, batch):
    """{pos, neg, alpha, beta, every parameter's gradient}."""
    model.zero_grad(set_to_none=True)
    pos, neg = model(*batch)
    (pos * 1.3 - neg * 0.7).sum().backward()
    _, alpha, beta = model.user_vectors(batch.user_ids, batch.profile_ids, return_attentions=True)
    out = {k: v.detach() for k, v in dict(pos=pos, neg=neg, alpha=alpha, beta=beta).items()}
    for n, p in model.named_parameters():
        out[n] = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
    return out


class RoundingNoise(TorchDispatchMode):
    """Monte Carlo arithmetic: every floating-point result of every op (forward and
    backward) is multiplied by 1 + rel * U(-1, 1), a random rounding error of `rel`."""

    def __init__(self, rel, seed):
        super().__init__()
        self.rel = rel
        self.gen = torch.Generator().manual_seed(seed)

    def _jitter(self, t):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()):
            return t
        u = torch.rand(t.shape, generator=self.gen, dtype=t.dtype, device=t.device)
        return t * (1 + self.rel * (2 * u - 1))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._schema.is_mutable:  # keep aliasing and in-place results
            return out
        return tree_map(self._jitter, out)


def noise(ref, batch, dtype):
    """-> (exact values, per-element rounding noise of the reference in `dtype`).

    "exact" is the reference in float64 on the same parameters. The noise at an element
    is the largest distance from it of
    - the reference run in float32 (on the float32-rounded parameters, compared with a
      float64 run on those): the real rounding of every op, underflow included;
    - MC_RUNS float64 runs in which every intermediate result gets a random relative
      error of one float32 unit roundoff (RoundingNoise): unlike reruns in other
      summation orders or on perturbed inputs, this sees the error of sums that cancel
      by construction (a saturated softmax's 1 - alpha below one ulp; the logits'
      biases, whose gradients are 0 in exact arithmetic), which every order and input
      repeats;
    each scaled from float32's unit roundoff to `dtype`'s (errors are linear in it; a
    float64-sized jitter would drown in float64's own rounding)."""
    f32 = EPS[torch.float32]
    if dtype == torch.float64:
        high = ref
        exact = outputs_and_grads(high, batch)
        low = same_model(ref, "reference").float()
        pairs = [(outputs_and_grads(low, batch),
                  outputs_and_grads(same_model(low, "reference").double(), batch))]
    else:
        high = same_model(ref, "reference").double()
        exact = outputs_and_grads(high, batch)
        pairs = [(outputs_and_grads(ref, batch), exact)]
    for seed in range(MC_RUNS):
        with RoundingNoise(f32, seed):
            pairs.append((outputs_and_grads(high, batch), exact))
    scale = EPS[dtype] / f32
    err = {k: torch.stack([(a[k].double() - b[k]).abs() for a, b in pairs]).amax(0) * scale
           for k in exact}
    return exact, err


def assert_within_noise(got, exact, err, rtol, dtype, what):
    """|got - exact| <= rtol |exact| + NOISE_FACTOR * (the reference's rounding noise, the
    largest along the element's last dimension) + FLOOR_ULPS eps max|exact|."""
    if not got.numel():
        return
    got = got.double()
    row_noise = err.amax(-1, keepdim=True) if err.dim() else err
    bound = (rtol * exact.abs() + NOISE_FACTOR * row_noise
             + FLOOR_ULPS * EPS[dtype] * float(exact.abs().max()))
    excess = (got - exact).abs() - bound
    if excess.max() > 0:
        at = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())} of {excess.numel()} elements outside the "
            f"reference's rounding noise; worst at {at}: got {got[at].item():.9g}, exact "
            f"{exact[at].item():.9g}, allowed error {bound[at].item():.3g}, reference noise "
            f"{err[at].item():.3g} (row {row_noise.expand_as(err)[at].item():.3g})")


def assert_same_support(got, want, mask, dtype):
    """alpha is exactly 0 on padded slots (and on empty profiles), in both; elsewhere a
    normal (> tiny) alpha in either has a nonzero partner. Between 0 and tiny the two
    may differ: where exp underflows depends on how the softmax is written."""
    assert torch.all(want[~mask] == 0), "reference alpha on padding"
    assert torch.all(got[~mask] == 0), "alpha on padding"
    tiny = torch.finfo(dtype).tiny
    normal = (got.abs() > tiny) | (want.abs() > tiny)
    assert torch.all((got != 0)[normal] & (want != 0)[normal]), "alpha support"


def check_problem(pr, name, dtype, shift=0.0):
    tol = {torch.float64: 1e-9, torch.float32: 2e-4}[dtype]
    ref, batch = build(pr, dtype, shift)
    fused = same_model(ref, name)
    assert ref.resolved_backend() == "reference" and fused.resolved_backend() == name
    want = outputs_and_grads(ref, batch)
    got = outputs_and_grads(fused, batch)
    exact, err = noise(ref, batch, dtype)
    for what in want:
        grad = what not in OUTPUTS
        label = f"grad {what}" if grad else what
        assert_close_scaled(got[what], want[what], rtol=tol, atol=tol * 10 if grad else tol, what=label)
        assert_within_noise(got[what], exact[what], err[what], tol, dtype, label)
    assert_same_support(got["alpha"], want["alpha"], batch.profile_ids != 0, dtype)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_backend_agrees_with_reference(name, dtype):
    if name == "triton" and not backend_select.triton_supports(CPU):
        pytest.fail("ACF_FAST_REQUIRE_BACKENDS is set but the triton backend cannot run on "
                    "CPU tensors here: set TRITON_INTERPRET=1", pytrace=False)

    @settings(max_examples=EXAMPLES[name])
    @given(pr=problems())
    def check(pr):
        check_problem(pr, name, dtype)

    check()


@pytest.mark.parametrize("name", BACKENDS)
def test_component_logits_shifted_by_a_constant(name):
    """A softmax ignores a constant added to all its logits: with the component logits'
    bias (feats.w.bias) raised by 500, every output and gradient is the same in exact
    arithmetic and must stay within the reference's rounding noise. The gradient of that
    bias, 0 in exact arithmetic, is where an unnormalised beta shows: the triton backward
    once rebuilt beta as exp(e - lse) from the saved log-sum-exp and came out at 113x the
    reference's noise (5.9e-6 against 5.2e-8); it now renormalises (cpu: 0.5x)."""
    pr = dict(b=3, lengths=[3, 2, 3], m=4, f=6, d=8, n_items=5, duplicates=False, seed=7,
              logit_scale=1.0)
    check_problem(pr, name, torch.float32, shift=500.0)


@pytest.mark.parametrize("name", BACKENDS)
def test_environment_sets_what_auto_means_and_never_beats_an_explicit_backend(name, monkeypatch):
    """ACF_FAST_BACKEND (which conftest.py clears for every other test) chooses for
    backend="auto" only; an explicit backend= is what runs."""
    other = "reference" if name != "reference" else "cpu"
    monkeypatch.setenv("ACF_FAST_BACKEND", other)
    explicit = random_model(n_users=2, n_items=4, m=1, f=3, d=2, backend=name)
    assert explicit.resolved_backend() == name
    auto = random_model(n_users=2, n_items=4, m=1, f=3, d=2, backend="auto")
    monkeypatch.setenv("ACF_FAST_BACKEND", name)
    assert auto.resolved_backend() == name
    monkeypatch.setenv("ACF_FAST_BACKEND", "gpu")
    with pytest.raises(ValueError, match="ACF_FAST_BACKEND='gpu'"):
        auto.resolved_backend()
