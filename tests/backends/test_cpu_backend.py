"""The native CPU backend against the reference: outputs and every parameter gradient."""

import pytest
import torch

from acf_fast.backends import cpu as cpu_backend
from acf_fast.model.losses import warp_loss
from acf_fast.testing import random_batch, random_features, random_model, same_model

_reason = cpu_backend._load()[1]
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"cpu backend unavailable: {_reason}")

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def run(model, batch):
    """Outputs and the gradient of a loss that reaches every output (attentions included)."""
    model.zero_grad(set_to_none=True)
    pos, neg = model(*batch)
    user, alpha, beta = model.user_vectors(batch.user_ids, batch.profile_ids, return_attentions=True)
    w = torch.linspace(0.5, 1.5, beta.shape[-1], dtype=beta.dtype)
    loss = warp_loss(pos, neg) + 0.1 * user.square().mean() + alpha[:, 0].sum() + (beta * w).sum()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return dict(pos=pos, neg=neg, user=user, alpha=alpha, beta=beta), grads


def assert_same(ref, cpu, batch, dtype, grad_scale=1.0):
    assert ref.resolved_backend() == "reference" and cpu.resolved_backend() == "cpu"
    out_r, grad_r = run(ref, batch)
    out_c, grad_c = run(cpu, batch)
    for k in out_r:
        torch.testing.assert_close(out_c[k], out_r[k], **TOL[dtype], msg=lambda m: f"{k}: {m}")
    assert grad_r.keys() == grad_c.keys()
    for name, g in grad_r.items():
        assert (g is None) == (grad_c[name] is None), name
        if g is None:  # w_v is never used, in either backend
            continue
        tol = dict(TOL[dtype])
        tol["atol"] *= grad_scale
        torch.testing.assert_close(grad_c[name], g, **tol, msg=lambda m: f"grad {name}: {m}")


CASES = {
    # name: (model kwargs, batch kwargs)
    "random": (dict(n_users=11, n_items=30, m=7, f=40, d=16), dict(batch=9, seed=1)),
    "odd sizes": (dict(n_users=5, n_items=23, m=5, f=37, d=13), dict(batch=7, seed=2)),
    "duplicates": (dict(n_users=4, n_items=6, m=4, f=16, d=8),
                   dict(batch=5, seed=3, lengths=[6, 4, 0, 7, 3], duplicates=True)),
    "P=1": (dict(n_users=6, n_items=10, m=3, f=12, d=6), dict(batch=4, seed=4, lengths=[1, 0, 1, 1])),
    "all empty": (dict(n_users=6, n_items=10, m=3, f=12, d=6), dict(batch=3, seed=5, lengths=[0, 0, 0])),
    "M=49": (dict(n_users=8, n_items=40, m=49, f=96, d=24), dict(batch=16, seed=6)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype):
    model_kw, batch_kw = CASES[case]
    ref = random_model(**model_kw, dtype=dtype, seed=len(case))
    cpu = same_model(ref, "cpu")
    assert cpu.resolved_backend() == "cpu"
    assert_same(ref, cpu, random_batch(ref, **batch_kw), dtype)


def test_large_logits_stay_finite():
    """Parameters scaled up: both softmaxes see large logits; no NaN/inf, same numbers."""
    ref = random_model(n_users=6, n_items=15, m=6, f=20, d=10, dtype=torch.float64, scale=6.0)
    cpu = same_model(ref, "cpu")
    batch = random_batch(ref, batch=6, seed=7, lengths=[3, 0, 5, 1, 2, 4])
    assert_same(ref, cpu, batch, torch.float64, grad_scale=1e3)


def test_auto_picks_cpu_backend():
    model = random_model(backend="auto")
    assert model.resolved_backend() == "cpu"


def test_recommend_all_matches_reference():
    ref = random_model(n_users=9, n_items=50, m=5, f=20, d=12)
    cpu = same_model(ref, "cpu")
    assert ref.resolved_backend() == "reference" and cpu.resolved_backend() == "cpu"
    batch = random_batch(ref, batch=9, seed=8)
    s_r, a_r, b_r = ref.recommend_all(batch.user_ids, batch.profile_ids, return_attentions=True)
    s_c, a_c, b_c = cpu.recommend_all(batch.user_ids, batch.profile_ids, return_attentions=True)
    for x, y in ((s_c, s_r), (a_c, a_r), (b_c, b_r)):
        torch.testing.assert_close(x, y, **TOL[torch.float32])
    top_r = ref.recommend_batch(batch.user_ids, batch.profile_ids, k=5, exclude=batch.profile_ids)
    top_c = cpu.recommend_batch(batch.user_ids, batch.profile_ids, k=5, exclude=batch.profile_ids)
    torch.testing.assert_close(top_c[0], top_r[0], **TOL[torch.float32])


def _errors(out, grads, out64, grads64):
    """Largest error of each output and gradient relative to that tensor's fp64 scale."""
    errs = {}
    for k, v in out.items():
        errs[k] = ((v.double() - out64[k]).abs().max() / out64[k].abs().max().clamp_min(1e-12)).item()
    for k, g in grads.items():
        if g is None or k.endswith("feats.w.bias") or k.endswith("user_model.w.bias"):
            continue  # w.bias gradients are exactly 0 in exact arithmetic: pure rounding noise
        g64 = grads64[k]
        errs[k] = ((g.double() - g64).abs().max() / g64.abs().max().clamp_min(1e-12)).item()
    return errs


# (table dtype, ACF_FAST_GEMM, bound as a multiple of the reference's own error)
SIXTEEN_BIT = [(torch.bfloat16, "fp32", 2.0), (torch.bfloat16, "bf16", 8.0),
               (torch.bfloat16, "mkl-bf16", 6.0), (torch.float16, "bf16", 2.0)]


@pytest.mark.parametrize("feature_dtype,gemm,factor", SIXTEEN_BIT,
                         ids=["bf16-fp32gemm", "bf16-bf16gemm", "bf16-mklgemm", "fp16"])
def test_16bit_features_error_bounded_by_reference(feature_dtype, gemm, factor, monkeypatch):
    """Both backends in 16-bit features against an fp64 reference on the fp32 features: the
    cpu backend may lose at most a few times what the reference itself loses, outputs and
    every gradient, whichever GEMM the machine would choose (each is forced here).

    The fp32 GEMM widens a 16-bit table: the reference's own error (bound 2x). MKL's bf16
    GEMM also rounds W_red (forward) and dL/dR (W_red's gradient) to bf16: three roundings
    of the same size instead of one, measured at up to ~4x (bound 6x). oneDNN's bf16 GEMM
    rounds its output too (R, and each chunk's share of dW): bound 8x. An fp16 table never
    multiplies in 16 bits (its range is not fp32's): a forced bf16 changes nothing."""
    from acf_fast.backends import gemm_choice

    if not torch.ops.acf_fast.reduce_gemm_available(gemm_choice.KINDS.index(gemm)):
        pytest.skip(f"this torch has no {gemm} GEMM")
    monkeypatch.setenv("ACF_FAST_GEMM", gemm)
    feats = random_features(40, 49, 256, seed=11)
    kw = dict(n_users=10, n_items=40, m=49, f=256, d=32, features=feats, seed=12)
    exact = random_model(**kw, dtype=torch.float64)
    ref16 = random_model(**kw, feature_dtype=feature_dtype)
    cpu16 = same_model(ref16, "cpu")
    assert exact.resolved_backend() == ref16.resolved_backend() == "reference"
    assert cpu16.resolved_backend() == "cpu"
    batch = random_batch(exact, batch=16, seed=13)
    out64, grads64 = run(exact, batch)
    err_ref = _errors(*run(ref16, batch), out64, grads64)
    err_cpu = _errors(*run(cpu16, batch), out64, grads64)
    worst = max(e / (err_ref[k] + 1e-7) for k, e in err_cpu.items())
    for k, e in err_cpu.items():
        assert e <= factor * err_ref[k] + 1e-5, f"{k}: cpu {e:.2e} vs reference {err_ref[k]:.2e}"
    print(f"{gemm}: worst error ratio to the reference {worst:.2f}")


def test_fp32_medium_precision_error_bound(monkeypatch):
    """An fp32 table under torch.set_float32_matmul_precision("medium") may multiply in bf16
    (as torch's own CPU matmul then does): the table's rows, W_red and dL/dR are rounded to
    bf16 (relative 2^-9 each), the GEMM output once more. Against the fp64 reference, every
    output and gradient stays within the error of the reference run on a bf16 table times
    8 (docs/performance.md#gemm-choice), and the default precision stays exact."""
    monkeypatch.setenv("ACF_FAST_GEMM", "bf16")
    feats = random_features(40, 49, 256, seed=11)
    kw = dict(n_users=10, n_items=40, m=49, f=256, d=32, features=feats, seed=12)
    exact = random_model(**kw, dtype=torch.float64)
    ref16 = random_model(**kw, feature_dtype=torch.bfloat16)
    cpu32 = same_model(random_model(**kw), "cpu")
    batch = random_batch(exact, batch=16, seed=13)
    out64, grads64 = run(exact, batch)
    err_ref16 = _errors(*run(ref16, batch), out64, grads64)
    err_highest = _errors(*run(cpu32, batch), out64, grads64)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        err_medium = _errors(*run(cpu32, batch), out64, grads64)
    finally:
        torch.set_float32_matmul_precision(saved)
    for k, e in err_medium.items():
        assert e <= 8 * err_ref16[k] + 1e-5, f"{k}: medium {e:.2e} vs bf16 reference {err_ref16[k]:.2e}"
        assert err_highest[k] <= 1e-5, f"{k}: default precision not exact ({err_highest[k]:.2e})"
    # the bf16 path really ran under "medium": its error is well above fp32 rounding
    assert max(err_medium.values()) > 100 * max(max(err_highest.values()), 1e-7)


def _with_threads(threads, fn):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(saved)


def test_thread_counts_fused_attention_bitwise():
    """The fused pass sums shared gradients in a fixed order: 1 and 2 threads agree bit for bit."""
    g = torch.Generator().manual_seed(20)
    b, p, k, m, h, d = 33, 9, 50, 49, 24, 24
    slot_item = torch.randint(-1, k, (b, p), generator=g)
    inputs = [torch.randn(k, m, h + d, generator=g), torch.randn(b, h, generator=g),
              torch.randn(b, d, generator=g), torch.randn(b, p, d, generator=g),
              torch.randn(b, p, d, generator=g), slot_item, torch.randn(h, generator=g),
              torch.randn(1, generator=g), torch.randn(d, generator=g), torch.randn(1, generator=g)]
    grads_out = [torch.randn(b, d, generator=g), torch.randn(b, p, generator=g),
                 torch.randn(b, p, m, generator=g)]

    def once():
        leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        outs = cpu_backend.acf_attention(*leaves)
        torch.autograd.backward(outs, grads_out)
        return list(outs) + [t.grad for t in leaves if t.is_floating_point()]

    for x, y in zip(_with_threads(1, once), _with_threads(2, once)):
        assert torch.equal(x, y)


def test_thread_counts_agree():
    """End to end, 1 and 2 threads: the outputs and everything the native ops produce
    (W_red's gradient included) agree bit for bit; the Linear weight gradients that ATen's
    GEMMs reduce over the batch (MKL splits them by thread count) to float32 rounding."""
    ref = random_model(n_users=20, n_items=60, m=49, f=128, d=24)
    assert same_model(ref, "cpu").resolved_backend() == "cpu"
    batch = random_batch(ref, batch=32, seed=14)
    o1, g1 = _with_threads(1, lambda: run(same_model(ref, "cpu"), batch))
    o2, g2 = _with_threads(2, lambda: run(same_model(ref, "cpu"), batch))
    for k in o1:
        assert torch.equal(o1[k], o2[k]), k
    for k in g1:
        if g1[k] is None:
            continue
        if "dim_reductor" in k:
            assert torch.equal(g1[k], g2[k]), k
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-5, atol=1e-6)


def test_compiles():
    """The custom ops trace under torch.compile (fake kernels) and give the eager numbers:
    scores, and the gradient of every parameter through the ops' registered backwards.
    (A bf16 table's fake kernel is covered by test_cpu_ops' opcheck.)"""
    model = random_model(n_users=6, n_items=20, m=5, f=16, d=8, backend="cpu")
    assert model.resolved_backend() == "cpu"
    batch = random_batch(model, batch=5, seed=15)
    cot = torch.linspace(-1.0, 2.0, 2 * batch.user_ids.numel()).view(2, -1)

    def scores_and_grads(fn):
        model.zero_grad(set_to_none=True)
        pos, neg = fn(*batch)
        ((pos * cot[0]).sum() + (neg * cot[1]).sum()).backward()
        return (pos.detach(), neg.detach()), {n: p.grad for n, p in model.named_parameters()}

    eager, eager_grads = scores_and_grads(model)
    compiled, compiled_grads = scores_and_grads(torch.compile(model, fullgraph=False))
    for x, y in zip(compiled, eager):
        torch.testing.assert_close(x, y)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, g in eager_grads.items():
        if g is None:  # w_v: never used
            assert compiled_grads[name] is None, name
            continue
        assert compiled_grads[name] is not None, name
        torch.testing.assert_close(compiled_grads[name], g, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"grad {name}: {m}")
