"""The static-shape Triton path and the CUDA-graph training step (acf_fast.training.cuda_graph).

On the CPU (TRITON_INTERPRET=1) this checks everything but the capture itself: the
static batch layout, outputs and every gradient against the reference and against
the exact-shape path, a float64 gradcheck, that the static step reads nothing back to
the host (the thing that breaks a capture), and GraphedTrainStep's eager mode, checks
and fallbacks. The tests marked `cuda` capture and replay on a GPU
(benchmarks/gpu_check.sh runs them).
"""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")
from agreement import OUTPUTS, assert_grads_close, loss_weights, run  # noqa: E402
from conftest import require_triton_runnable, tiny_train_config  # noqa: E402

from acf_fast.backends.registry import triton_interpreter_on  # noqa: E402

require_triton_runnable()

from acf_fast.backends import planning  # noqa: E402
from acf_fast.backends import triton as triton_backend  # noqa: E402
from acf_fast.training.cuda_graph import GraphedTrainStep  # noqa: E402
from acf_fast.model.losses import warp_loss  # noqa: E402
from acf_fast.testing import random_batch, random_model, same_model  # noqa: E402
from acf_fast.model.weights import ACFWeights  # noqa: E402

DEVICE = "cpu" if triton_interpreter_on() else "cuda"
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="capture needs a CUDA GPU")
distinct_items = triton_backend.fused.distinct_items


def _profiles(rows):
    ids = torch.tensor(rows, device=DEVICE)
    return ids, ids != 0


@pytest.mark.parametrize("rows, capacity", [
    ([[3, 1, 3], [0, 0, 0], [7, 1, 0], [2, 0, 0]], 12),   # capacity B * P
    ([[3, 1, 3], [0, 0, 0], [7, 1, 0], [2, 0, 0]], 5),    # capacity N < B * P
    ([[4, 4, 4], [4, 4, 0]], 4),                          # one item, many slots
    ([[0, 0], [0, 0]], 3),                                # no live item at all
])
def test_static_batch_matches_the_exact_one_padded(rows, capacity):
    ids, mask = _profiles(rows)
    exact = distinct_items(ids, mask)
    static = distinct_items(ids, mask, capacity)
    U = exact.item_ids.numel()
    assert static.item_ids.shape == (capacity,) and static.item_start.shape == (capacity + 1,)
    assert int(static.item_count) == U and exact.item_count is None
    assert torch.equal(static.item_ids[:U], exact.item_ids)
    assert (static.item_ids[U:] == 0).all()
    assert torch.equal(static.slot_item, exact.slot_item)
    assert torch.equal(static.slot_order, exact.slot_order)
    assert torch.equal(static.item_start[:U + 1], exact.item_start)
    assert (static.item_start[U:] == ids.numel() + 1).all()   # no slots past the live items


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_reduction_kernels_skip_the_dead_items(splits, monkeypatch):
    """r of the items past the live count is exactly 0 (so that products with it stay
    finite); dW_red reads the live items' rows only, whatever dr holds past them, also
    when its rows are split over several programs (as on a GPU)."""
    from acf_fast.kernels import outer_sum
    from acf_fast.kernels.reduce import reduce_items, reduce_weight_grad

    monkeypatch.setattr(outer_sum, "splits_for", lambda *args: splits)

    g = torch.Generator().manual_seed(0)
    # M = 20: 140 rows, 60 of them live, so that with 5 splits the live rows span several
    table = torch.randn(9, 20, 20, generator=g).to(DEVICE)
    w, b = torch.randn(16, 20, generator=g).to(DEVICE), torch.randn(16, generator=g).to(DEVICE)
    ids = torch.tensor([4, 1, 7, 0, 0, 0, 0], device=DEVICE)  # 3 live, then padding
    count = torch.tensor([3], dtype=torch.int32, device=DEVICE)
    r = reduce_items(table, ids, w, b, count)
    torch.testing.assert_close(r[:3], reduce_items(table, ids[:3], w, b))
    assert (r[3:] == 0).all()
    dr = torch.randn(7, 20, 16, generator=g).to(DEVICE)   # nonzero past the live rows
    torch.testing.assert_close(reduce_weight_grad(table, ids, dr, count),
                               reduce_weight_grad(table, ids[:3], dr[:3]))


def _static_run(model, batch, weights):
    """Scores, user vectors and every parameter gradient through the static path."""
    wp, wn, wu = weights
    model.zero_grad(set_to_none=True)
    w = ACFWeights.of(model)
    args = (w, model.feature_table, batch.user_ids, batch.profile_ids, batch.profile_mask)
    user, pos, neg, _, _ = triton_backend.fused_acf(*args, batch.pos, batch.neg,
                                                    static_shapes=True)
    user2, _, _, alpha, beta = triton_backend.fused_acf(*args, return_attentions=True,
                                                        static_shapes=True)
    ((pos * wp).sum() + (neg * wn).sum() + (user2 * wu).sum()).backward()
    return (pos, neg, user2, alpha, beta), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("n_items, lengths", [(40, [9, 0, 3, 1, 9, 0, 5]),   # capacity B * P
                                              (5, [4, 4, 0, 2, 3, 1, 4])])   # capacity N
def test_static_path_matches_reference_and_exact_path(n_items, lengths):
    ref = random_model(n_users=6, n_items=n_items, m=5, f=24, d=16).to(DEVICE)
    tri = same_model(ref, "triton")
    batch = random_batch(ref, batch=7, seed=3, lengths=lengths, duplicates=True)
    weights = loss_weights(batch, 16, torch.float32, DEVICE)
    out_r, grad_r = run(ref, batch, weights)
    out_e, grad_e = run(tri, batch, weights)
    out_s, grad_s = _static_run(tri, batch, weights)
    atol, rtol = 2e-5, 2e-4        # as test_triton_backend's float32 comparison
    for name, r, e, s in zip(OUTPUTS, out_r, out_e, out_s):
        torch.testing.assert_close(s, r, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(s, e, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")
    assert_grads_close(grad_s, grad_r, atol=atol, rtol=rtol)
    # against the exact (non-static) path: the same kernels, so to rounding
    assert_grads_close(grad_s, grad_e, atol=1e-6, rtol=1e-6)


def test_static_path_gradcheck_float64():
    # N = 5 < B * P = 9: the capacity is N, and the padded items must not leak in
    model = random_model(n_users=3, n_items=5, m=3, f=5, d=4, dtype=torch.float64,
                         backend="triton").to(DEVICE)
    profile_ids = torch.tensor([[2, 2, 4], [0, 0, 0], [4, 0, 0]], device=DEVICE)
    batch = random_batch(model, batch=3, seed=1, lengths=[3, 0, 1], duplicates=True)
    batch = batch._replace(profile_ids=profile_ids, profile_mask=profile_ids != 0)
    names = [n for n, _ in model.named_parameters() if not n.startswith("user_model.w_v.")]
    params = tuple(dict(model.named_parameters())[n].detach().clone().requires_grad_(True)
                   for n in names)

    def f(*flat):
        with torch.nn.utils.stateless._reparametrize_module(model, dict(zip(names, flat))):
            return triton_backend.static_pair_scores(model, *batch[:4], batch.profile_mask)

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


# ops whose result the host must wait for: any of them inside a step breaks a capture
READ_BACK = {"aten.item", "aten._local_scalar_dense", "aten.nonzero", "aten._unique2", "aten.unique_dim",
             "aten.unique_consecutive", "aten.masked_select", "aten.is_nonzero", "aten.equal",
             "aten.repeat_interleave"}


class ReadBackRecorder(TorchDispatchMode):
    """Records every op (custom ops' bodies included) that reads device values back."""

    def __init__(self):
        super().__init__()
        self.found = []
        self.bodies = {torch.ops.acf_fast.triton_forward.default: triton_backend.triton_forward._init_fn,
                       torch.ops.acf_fast.triton_backward.default: triton_backend.triton_backward._init_fn,
                       torch.ops.acf_fast.distinct_items.default: planning._exact_plan_impl}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name().split(".")[0].replace("::", ".")
        boolean_index = func is torch.ops.aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if name in READ_BACK or boolean_index:
            self.found.append(str(func))
        if func in self.bodies:  # look inside the opaque custom ops too
            with self:
                return self.bodies[func](*args, **kwargs)
        return func(*args, **kwargs)


@pytest.mark.parametrize("static", [False, True])
def test_only_the_static_step_reads_nothing_back(static):
    model = random_model(n_users=6, n_items=40, m=5, f=24, d=16, backend="triton").to(DEVICE)
    batch = random_batch(model, batch=7, seed=3, lengths=[9, 0, 3, 1, 9, 0, 5], duplicates=True)
    with ReadBackRecorder() as rec:
        spos, sneg = triton_backend.fused_acf(
            ACFWeights.of(model), model.feature_table, batch.user_ids, batch.profile_ids,
            batch.profile_mask, batch.pos, batch.neg, static_shapes=static)[1:3]
        warp_loss(spos, sneg).backward()
    if static:
        assert rec.found == []
    else:  # the recorder sees what the exact path needs: torch.unique's size
        assert "aten._unique2.default" in rec.found


def _graph_twins(dtype=torch.float64, lr=1e-2):
    model = random_model(n_users=6, n_items=12, m=5, f=24, d=16, backend="triton",
                         dtype=dtype).to(DEVICE)
    model.max_profile_size = 6
    eager, graphed = model, copy.deepcopy(model)
    kw = dict(lr=lr, fused=True, capturable=True) if DEVICE == "cuda" else dict(lr=lr)
    return (eager, torch.optim.Adam(eager.parameters(), **kw),
            graphed, torch.optim.Adam(graphed.parameters(), **kw))


def _steps(n_full=5, full=5, partial=3, sizes=None):
    """Host batches of varying width: n_full full-size ones then a partial one (or `sizes`)."""
    template = random_model(n_users=6, n_items=12, m=5, f=24, d=16)
    sizes = sizes or [full] * n_full + [partial]
    return [random_batch(template, batch=b, seed=i, max_profile=6, duplicates=True)
            for i, b in enumerate(sizes)]


def _assert_same_training(eager, opt, graphed, step, batches, tol):
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        dev = batch.to(DEVICE)
        pos, neg = eager(*dev)
        expected = warp_loss(pos, neg)
        expected.backward()
        opt.step()
        got = step(batch.user_ids, batch.profile_ids, batch.pos, batch.neg)
        torch.testing.assert_close(got.detach(), expected.detach(), atol=tol, rtol=tol)
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def test_eager_static_steps_train_like_the_model():
    # widths vary (padded to max_profile_size), the last batch is partial; float64 so
    # that Adam's normalisation does not blow float32 rounding up to learning-rate size
    eager, opt, graphed, opt_g = _graph_twins()
    step = GraphedTrainStep(graphed, opt_g, warp_loss, capture=False)
    _assert_same_training(eager, opt, graphed, step, _steps(), 1e-10)
    assert step.replays == 0


def test_a_bad_batch_is_refused_before_any_change():
    _, _, model, opt = _graph_twins()
    step = GraphedTrainStep(model, opt, warp_loss, capture=False)
    before = [p.detach().clone() for p in model.parameters()]
    batch = _steps(1)[0]
    with pytest.raises(ValueError, match=r"pos contains id 1\d\d, expected ids in \[1, 12\]"):
        step(batch.user_ids, batch.profile_ids, batch.pos + 100, batch.neg)
    with pytest.raises(ValueError, match="user_ids contains id -"):
        step(batch.user_ids - 1 - batch.user_ids.max(), batch.profile_ids, batch.pos, batch.neg)
    with pytest.raises(TypeError, match="profile_ids must be an int64 or int32"):
        step(batch.user_ids, batch.profile_ids.float(), batch.pos, batch.neg)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_what_cannot_be_graphed_is_refused():
    model = random_model(n_users=6, n_items=12, m=5, f=24, d=16).to(DEVICE)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="needs the triton backend; this model runs the 'reference'"):
        GraphedTrainStep(model, opt, warp_loss)
    model.backend = "triton"
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        GraphedTrainStep(model, opt, warp_loss, warmup=0, capture=False)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="capture=True needs the model on a CUDA device"):
            GraphedTrainStep(model, opt, warp_loss, capture=True)
    else:
        with pytest.raises(ValueError, match="not capturable: create it with capturable=True"):
            GraphedTrainStep(model, opt, warp_loss, capture=True)


def test_trainer_option_needs_a_gpu(tmp_path):
    config = tiny_train_config(tmp_path, tmp_path / "run", backend="triton", cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device, got device='cpu'"):
        config.validate()


@cuda_only
@pytest.mark.parametrize("deterministic", ["0", "1"])   # index_add_ / sorted index_put_
def test_captured_steps_train_like_the_model(deterministic, monkeypatch):
    # float64: the eager model runs the exact-shape path, so sums differ in the last bits
    # and Adam would blow float32 differences on near-zero gradients up to lr size
    monkeypatch.setenv("ACF_FAST_DETERMINISTIC", deterministic)
    eager, opt, graphed, opt_g = _graph_twins(torch.float64)
    step = GraphedTrainStep(graphed, opt_g, warp_loss, warmup=2)
    # a partial batch first (it must not fix the graph's size), 2 warm-ups, a capture and
    # 3 more replays, a partial batch run eagerly after the capture, 2 more replays
    sizes = [3] + [5] * 6 + [3] + [5] * 2
    _assert_same_training(eager, opt, graphed, step, _steps(sizes=sizes), 1e-10)
    assert step.replays == 6
    for (name, p), q in zip(eager.named_parameters(), graphed.parameters()):
        if p.grad is not None:   # .grad shows the last step, replayed or eager
            torch.testing.assert_close(q.grad, p.grad, atol=1e-10, rtol=1e-10, msg=name)


@cuda_only
@pytest.mark.parametrize("batch_size", [7, 600])   # torch.sort changes algorithm past 4096
def test_static_step_never_synchronises(batch_size):
    model = random_model(n_users=6, n_items=40, m=5, f=24, d=16, backend="triton").to(DEVICE)
    batch = random_batch(model, batch=batch_size, seed=3, max_profile=9, duplicates=True)
    args = (model, batch.user_ids, batch.profile_ids, batch.pos, batch.neg, batch.profile_mask)
    warp_loss(*triton_backend.static_pair_scores(*args)).backward()   # compile outside
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        warp_loss(*triton_backend.static_pair_scores(*args)).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_trainer_graph_steps_follow_the_plain_loop(tmp_path):
    """The Trainer's graphed loop against its plain loop. On the CPU a GraphedTrainStep
    runs eagerly (capture=False) for 3 small steps (the interpreter is slow); on a GPU
    `cuda_graph=True` (the fused step, acf_fast.training.fused_step) captures over a
    whole epoch: 6 full batches of 100 and a partial one of 40."""
    pytest.importorskip("h5py")   # the tiny dataset's feature file (maybe absent on a GPU box)
    from acf_fast.training.cuda_graph import GraphedTrainStep as Step
    from acf_fast.training import Trainer
    from conftest import tiny_prepared_dataset

    root = tiny_prepared_dataset(tmp_path)
    size = dict(batch_size=100) if DEVICE == "cuda" else dict(batch_size=32, max_steps=3,
                                                              max_profile_size=3)
    losses = []
    for graphed in (False, True):
        extra = dict(device="cuda", cuda_graph=graphed) if DEVICE == "cuda" else {}
        cfg = tiny_train_config(root, tmp_path / f"run{graphed}", backend="triton", epochs=1,
                                val_rank_samples=0, **size, **extra)
        trainer = Trainer(cfg)
        if graphed and DEVICE == "cpu":
            trainer.graph_step = Step(trainer.model, trainer.optimizer, trainer.loss_fn,
                                      capture=False)
        trainer.fit()
        losses.append(trainer.step_losses)
        if graphed and DEVICE == "cuda":
            # cuda_graph=True trains through the fused step: its first full batch runs and
            # is captured, the next 5 replay, the partial one runs without the graph
            assert trainer.train_step.fused.replays == 5
    assert len(losses[1]) == len(losses[0]) == (7 if DEVICE == "cuda" else 3)
    # float32 and Adam: the two paths' last-bit differences grow a little step by step
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]),
                               atol=1e-3, rtol=1e-3)


@cuda_only
def test_a_cpu_run_resumes_on_the_gpu_with_the_graph(tmp_path):
    """A CPU checkpoint's Adam step counts are host tensors: the GPU run's fused,
    capturable Adam needs them on the device (else the graph would freeze them)."""
    import math

    pytest.importorskip("h5py")
    from acf_fast.training import Trainer
    from conftest import tiny_prepared_dataset

    root = tiny_prepared_dataset(tmp_path)
    common = dict(epochs=1, batch_size=100, val_rank_samples=0)
    Trainer(tiny_train_config(root, tmp_path / "run", max_steps=2, **common)).fit()
    gpu = Trainer(tiny_train_config(root, tmp_path / "run", backend="triton", device="cuda",
                                    cuda_graph=True, **common))
    assert gpu.resume()
    steps = [state["step"] for state in gpu.optimizer.state.values()]
    assert steps and all(t.device.type == "cuda" for t in steps)
    gpu.fit()
    # 5 steps left (the fused step): one run and captured, 3 replays, the partial batch
    # without the graph
    assert gpu.state.finished and len(gpu.step_losses) == 5
    assert all(math.isfinite(v) for v in gpu.step_losses) and gpu.train_step.fused.replays == 3
    assert all(float(t) == 7 for t in steps)


@cuda_only
def test_a_failed_capture_falls_back_to_eager_steps(capsys):
    # last in the file: a failed capture is recoverable, but should it leave the CUDA
    # context in a bad state, no other test runs after it
    eager, opt, graphed, opt_g = _graph_twins(torch.float64)
    step = GraphedTrainStep(graphed, opt_g, warp_loss, warmup=1)
    plain = step._forward_backward

    def reads_back(*args):   # a host read inside the step: capture must fail
        loss = plain(*args)
        float(loss)
        return loss

    step._forward_backward = reads_back
    _assert_same_training(eager, opt, graphed, step, _steps(n_full=4), 1e-10)
    assert step.replays == 0 and not step.capture
    assert "CUDA-graph capture failed" in capsys.readouterr().err
