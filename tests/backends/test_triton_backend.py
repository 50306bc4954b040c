"""The Triton backend against the reference backend: outputs and every parameter gradient.

Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (how CI runs it: the kernels
really execute, in numpy). Shapes are small because the interpreter runs every
program instance one after another.
"""

import pytest
import torch

pytest.importorskip("triton")
import agreement  # noqa: E402
from agreement import run  # noqa: E402
from conftest import require_triton_runnable  # noqa: E402

from acf_fast.backends.registry import triton_interpreter_on  # noqa: E402

require_triton_runnable()

from acf_fast import ACF  # noqa: E402
from acf_fast.backends import triton as triton_backend  # noqa: E402
from acf_fast.testing import random_batch, random_model, same_model  # noqa: E402

DEVICE = "cpu" if triton_interpreter_on() else "cuda"
# (atol, rtol) per parameter dtype; fp32 sums run in another order than the reference's
TOL = {torch.float32: (2e-5, 2e-4), torch.float64: (1e-11, 1e-9)}


def twins(dtype=torch.float32, **shape):
    ref = random_model(dtype=dtype, **shape).to(DEVICE)
    return ref, same_model(ref, "triton")


def loss_weights(batch, d, dtype, seed=0):
    return agreement.loss_weights(batch, d, dtype, DEVICE, seed)


def assert_backends_agree(ref, tri, batch, dtype=torch.float32):
    assert tri.resolved_backend() == "triton" and ref.resolved_backend() == "reference"
    weights = loss_weights(batch, ref.model_dim, dtype)
    out_r, grad_r = run(ref, batch, weights)
    out_t, grad_t = run(tri, batch, weights)
    atol, rtol = TOL[dtype]
    for name, a, b in zip(agreement.OUTPUTS, out_t, out_r):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        assert torch.isfinite(a).all(), name
    agreement.assert_grads_close(grad_t, grad_r, atol=atol, rtol=rtol)


def test_odd_shapes_duplicates_and_empty_profiles():
    # B = 5 and U * M = 30 rows (no block multiples), F = 24 (no power of two), M = 5,
    # duplicates within and across profiles, lengths 0..9 (one empty)
    ref, tri = twins(n_users=6, n_items=6, m=5, f=24, d=32)
    batch = random_batch(ref, batch=5, max_profile=9, seed=4, lengths=[9, 0, 3, 1, 5],
                         duplicates=True)
    assert_backends_agree(ref, tri, batch)


def test_float64_matches_the_reference_to_rounding():
    ref, tri = twins(torch.float64, n_users=4, n_items=6, m=5, f=12, d=16)
    assert tri.feature_table.dtype == torch.float64
    batch = random_batch(ref, batch=3, max_profile=4, seed=5, lengths=[4, 0, 2], duplicates=True)
    assert_backends_agree(ref, tri, batch, torch.float64)


def test_grid_of_49_components_and_d64():
    ref, tri = twins(n_users=5, n_items=9, m=49, f=20, d=64)
    assert_backends_agree(ref, tri, random_batch(ref, batch=5, max_profile=4, seed=1))


def test_d256():
    ref, tri = twins(n_users=4, n_items=8, m=7, f=33, d=256)
    assert_backends_agree(ref, tri, random_batch(ref, batch=3, max_profile=3, seed=2,
                                                 lengths=[3, 1, 2]))


def test_single_slot_profiles():
    ref, tri = twins(n_users=5, n_items=7, m=4, f=16, d=16)
    batch = random_batch(ref, batch=5, seed=3, lengths=[1, 0, 1, 1, 0])
    assert batch.profile_ids.shape[1] == 1
    assert_backends_agree(ref, tri, batch)


def test_all_profiles_empty():
    ref, tri = twins(n_users=4, n_items=5, m=3, f=8, d=16)
    batch = random_batch(ref, batch=3, seed=0, lengths=[0, 0, 0])
    assert_backends_agree(ref, tri, batch)
    _, alpha, _ = tri.user_vectors(batch.user_ids, batch.profile_ids, return_attentions=True)
    assert torch.equal(alpha, torch.zeros_like(alpha))


def test_batch_without_slots():
    ref, tri = twins(n_users=3, n_items=5, m=3, f=8, d=16)
    batch = random_batch(ref, batch=2, seed=1, lengths=[0, 0])
    ids = batch.profile_ids[:, :0]
    assert_backends_agree(ref, tri, batch._replace(profile_ids=ids, profile_mask=ids != 0))


def test_same_item_everywhere():
    ref, tri = twins(n_users=3, n_items=5, m=3, f=12, d=16)
    ids = torch.tensor([[3, 3, 3], [3, 5, 0], [0, 0, 0], [5, 3, 3]], device=DEVICE)
    batch = random_batch(ref, batch=4, seed=5, lengths=[3, 3, 3, 3], duplicates=True)
    batch = batch._replace(profile_ids=ids, profile_mask=ids != 0)
    assert_backends_agree(ref, tri, batch)


def _errors(outs, grads, outs64, grads64):
    """Largest error of each output and gradient relative to that tensor's fp64 scale."""
    errs = {}
    for k, (a, b) in enumerate(zip(outs, outs64)):
        a, b = a.detach().double(), b.detach()
        errs[f"out{k}"] = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
    for name, g in grads.items():
        if g is None or name.endswith("feats.w.bias") or name.endswith("user_model.w.bias"):
            continue  # w.bias gradients are exactly 0 in exact arithmetic: pure rounding noise
        g64 = grads64[name]
        errs[name] = float((g.double() - g64).abs().max() / g64.abs().max().clamp_min(1e-12))
    return errs


@pytest.mark.parametrize("feature_dtype", [torch.float16, torch.bfloat16])
def test_16bit_feature_table_error_bounded_by_reference(feature_dtype):
    """16-bit tables against an fp64 model on the same (fp32) features.

    The reference widens the rounded 16-bit rows to fp32: its error is the table's
    rounding. On sm_80+ GPUs the Triton reduction also rounds W_red to the table's dtype
    (forward) and dL/dR to bf16 (W_red's gradient), each with fp32 accumulation: up to
    three roundings instead of one. The CPU backend's bf16 GEMM, which rounds the same
    three operands, measured up to ~4x the reference's error (tests/backends/test_cpu_backend.py);
    bound 6x the error of the reference with a table of the same 16-bit dtype. Under the
    interpreter the 16-bit rows are widened to fp32 before the dot (bf16 tl.dot is wrong
    there), so the bound holds with room to spare; on a GPU this is the tensor-core
    path's check."""
    from acf_fast.testing import random_features

    feats = random_features(12, 7, 64, seed=11)
    kw = dict(n_users=6, n_items=12, m=7, f=64, d=32, features=feats, seed=12)
    exact = random_model(**kw, dtype=torch.float64).to(DEVICE)
    batch = random_batch(exact, batch=6, max_profile=5, seed=13, duplicates=True)
    weights = loss_weights(batch, 32, torch.float64)
    out64, grads64 = run(exact, batch, weights)
    w32 = [t.float() for t in weights]
    ref16 = random_model(**kw, feature_dtype=feature_dtype).to(DEVICE)
    tri16 = same_model(ref16, "triton")
    assert ref16.feature_table.dtype == tri16.feature_table.dtype == feature_dtype
    assert exact.resolved_backend() == ref16.resolved_backend() == "reference"
    assert tri16.resolved_backend() == "triton"
    err_ref = _errors(*run(ref16, batch, w32), out64, grads64)
    err_tri = _errors(*run(tri16, batch, w32), out64, grads64)
    for k, e in err_tri.items():
        assert e <= 6.0 * err_ref[k] + 1e-5, \
            f"{k}: triton {e:.2e} vs {feature_dtype} reference {err_ref[k]:.2e}"


def test_host_table_is_compacted_to_the_batch_items(monkeypatch):
    """A table on another device than the parameters (ACF(features_on_host=True) on a
    GPU) is gathered to the batch's distinct items and the kernels run on that compact
    table: same outputs and gradients, bit for bit. Here both live on the CPU (the
    interpreter), so the device test is forced."""
    _, tri = twins(n_users=5, n_items=9, m=5, f=24, d=16)
    assert tri.resolved_backend() == "triton"
    batch = random_batch(tri, batch=5, max_profile=6, seed=14, lengths=[6, 0, 3, 1, 5],
                         duplicates=True)
    weights = loss_weights(batch, 16, torch.float32)
    out_full, grads_full = run(tri, batch, weights)

    compacted = []
    real = triton_backend.fused.compact_table

    def spy(table, b, device):
        small, local = real(table, b, device)
        compacted.append((small, b.item_ids, local.item_ids))
        return small, local

    monkeypatch.setattr(triton_backend, "_table_elsewhere", lambda table, device: True)
    monkeypatch.setattr(triton_backend.fused, "compact_table", spy)
    out_host, grads_host = run(tri, batch, weights)
    assert compacted
    for small, ids, local in compacted:
        assert torch.equal(small, tri.feature_table[ids])  # only the distinct real items
        assert torch.equal(local, torch.arange(ids.numel(), device=DEVICE))
    for a, b in zip(out_host, out_full):
        assert torch.equal(a, b)
    for name, g in grads_full.items():
        assert (g is None and grads_host[name] is None) or torch.equal(grads_host[name], g), name

    if DEVICE == "cuda":  # the real case: the table in (pinned) host memory, no forcing
        monkeypatch.undo()
        tri._buffers["feature_table"] = tri.feature_table.cpu()
        out_pinned, grads_pinned = run(tri, batch, weights)
        for a, b in zip(out_pinned, out_full):
            assert torch.equal(a, b)
        for name, g in grads_full.items():
            assert (g is None and grads_pinned[name] is None) or torch.equal(grads_pinned[name], g), name


def test_untied_profile_embedding():
    torch.manual_seed(0)
    feats = torch.rand(6, 4, 12)
    ref = ACF(4, 6, features=feats, model_dim=16, tied_item_embedding=False,
              backend="reference").to(DEVICE)
    tri = same_model(ref, "triton")
    assert ref.user_model.profile_embedding is not ref.item_model
    assert_backends_agree(ref, tri, random_batch(ref, batch=4, seed=7))


def test_attentions_zero_on_padding_and_sum_to_one():
    _, tri = twins(n_users=4, n_items=6, m=5, f=10, d=16)
    batch = random_batch(tri, batch=4, seed=8, lengths=[2, 0, 4, 1])
    _, alpha, beta = tri.user_vectors(batch.user_ids, batch.profile_ids, return_attentions=True)
    mask = batch.profile_mask
    assert torch.all(alpha[~mask] == 0) and torch.all(beta[~mask] == 0)
    sums = alpha.sum(1)
    torch.testing.assert_close(sums[mask.any(1)], torch.ones_like(sums[mask.any(1)]))
    torch.testing.assert_close(beta[mask].sum(-1), torch.ones(int(mask.sum()), device=DEVICE))
    user, a2, b2 = tri.user_vectors(batch.user_ids, batch.profile_ids)
    assert a2 is None and b2 is None


def test_deterministic_mode_matches_and_repeats(monkeypatch):
    ref, tri = twins(n_users=4, n_items=5, m=3, f=8, d=16)
    assert tri.resolved_backend() == "triton"
    batch = random_batch(ref, batch=3, seed=9, lengths=[3, 2, 3], duplicates=True)
    weights = loss_weights(batch, 16, torch.float32)
    _, fast = run(tri, batch, weights)
    monkeypatch.setenv("ACF_FAST_DETERMINISTIC", "1")
    _, det1 = run(tri, batch, weights)
    _, det2 = run(tri, batch, weights)
    for name, g in fast.items():
        if g is None:
            continue
        assert torch.equal(det1[name], det2[name]), name
        torch.testing.assert_close(det1[name], g, atol=1e-6, rtol=1e-5)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    if DEVICE != "cpu":
        pytest.skip("CPU tensors only reach the kernels under the interpreter")
    _, tri = twins(n_users=3, n_items=4, m=2, f=4, d=16)
    batch = random_batch(tri, batch=2, seed=0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tri(*batch)


def test_scores_flow_into_training():
    """A few SGD steps of the fused path follow the reference's trajectory.

    (SGD, not Adam: Adam turns rounding noise in a near-zero gradient into a full step.)"""
    ref, tri = twins(n_users=4, n_items=6, m=4, f=8, d=16)
    assert ref.resolved_backend() == "reference" and tri.resolved_backend() == "triton"
    batch = random_batch(ref, batch=5, seed=10)
    losses = []
    for model in (ref, tri):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            pos, neg = model(*batch)
            loss = torch.sigmoid(neg - pos).mean()
            loss.backward()
            opt.step()
        losses.append(float(loss.detach()))
    assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-6)
    for (n, a), b in zip(ref.named_parameters(), tri.parameters()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("capacity", [None, 4])   # exact batch; static (CUDA-graph) batch
def test_custom_ops_pass_opcheck(capacity):
    """Schema, fake (meta) implementations, autograd registration, AOT dispatch."""
    from acf_fast.model.weights import ACFWeights

    model = random_model(n_users=3, n_items=5, m=3, f=5, d=16, backend="triton").to(DEVICE)
    data = random_batch(model, batch=2, seed=0, lengths=[2, 0], duplicates=True)
    batch = triton_backend.fused.distinct_items(data.profile_ids, data.profile_mask, capacity)
    assert (batch.item_count is None) == (capacity is None)
    weights = [t.detach().clone().requires_grad_(True) for t in ACFWeights.of(model)]
    fwd_args = (model.feature_table, *batch, data.user_ids, data.profile_ids, data.pos, data.neg,
                weights, True, True)
    torch.library.opcheck(triton_backend.triton_forward, fwd_args)
    out = triton_backend.triton_forward(*fwd_args)
    user, _, _, alpha, _, r, xbar, pre = (t.detach() for t in out)
    grads = [torch.randn_like(user), torch.randn_like(alpha[:, 0]), torch.randn_like(alpha[:, 0])]
    bwd_args = (*grads, *fwd_args[:10], [w.detach() for w in weights], user, alpha, r, xbar, pre,
                True)
    torch.library.opcheck(triton_backend.triton_backward, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_gpu_tile_sizes_and_split_weight_gradient(monkeypatch):
    """The reduction's GPU tiles (64-row blocks, 32-wide K steps) and its split-K weight
    gradient (several row ranges summed on the host) also run under the interpreter."""
    import acf_fast.kernels.outer_sum as outer_sum
    import acf_fast.kernels.reduce as reduce

    monkeypatch.setattr(reduce, "interpreting", lambda: False)
    monkeypatch.setattr(outer_sum, "interpreting", lambda: False)   # dW_red's kernel
    assert reduce.fwd_blocks(64)["BLOCK_R"] == 64
    ref, tri = twins(n_users=4, n_items=24, m=49, f=40, d=64)
    ids = torch.arange(1, 25, device=DEVICE).view(4, 6)  # 24 distinct items: 1176 rows
    batch = random_batch(ref, batch=4, seed=11)._replace(profile_ids=ids, profile_mask=ids != 0)
    calls = []
    real = outer_sum._outer_sum_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(outer_sum, "_outer_sum_kernel", Spy())
    assert_backends_agree(ref, tri, batch)
    assert calls and all(grid[2] > 1 for grid in calls), calls
