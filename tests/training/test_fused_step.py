"""The fused training step (acf_fast.training.fused_step): eleven Triton launches a step.

Checked on the CPU under TRITON_INTERPRET=1 against the reference model trained by
torch.optim.Adam (the tutorial's step): the loss, every gradient (assembled from the
step's buffers) and the parameters after several Adam steps, in float64 to 1e-10, for
every loss, tied and untied profile embeddings, padded, empty and duplicate profiles,
repeated users and odd sizes; a float64 gradcheck through the step's kernels; a
16-bit feature table within the bound the other backends use; bit-identical repeats;
and the launch count, with a dispatch recorder that sees every ATen op and a counter
of Triton launches.
"""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")
from conftest import require_triton_runnable  # noqa: E402

from acf_fast.backends.registry import triton_interpreter_on  # noqa: E402

require_triton_runnable()

from acf_fast.model.losses import get_loss  # noqa: E402
from acf_fast.model.weights import ACFWeights  # noqa: E402
from acf_fast.testing import random_batch, random_model  # noqa: E402
from acf_fast.training.fused_step import FusedTrainStep  # noqa: E402

DEVICE = "cpu" if triton_interpreter_on() else "cuda"


def _twins(dtype=torch.float64, tied=True, feature_dtype=torch.float32, lr=1e-2, seed=0, d=16,
           m=5):
    model = random_model(n_users=6, n_items=40, m=m, f=24, d=d, backend="triton", dtype=dtype,
                         feature_dtype=feature_dtype, seed=seed)
    if not tied:
        um = model.user_model
        um.profile_embedding = copy.deepcopy(um.profile_embedding)
        with torch.no_grad():
            um.profile_embedding.weight.mul_(0.5)
    model = model.to(DEVICE)
    ref = copy.deepcopy(model)
    ref.backend = "reference"
    make = lambda m: torch.optim.Adam(m.parameters(), lr=lr, weight_decay=1e-5)  # noqa: E731
    return ref, make(ref), model, make(model)


def _batch(model, lengths, seed=3):
    b = random_batch(model, batch=len(lengths), seed=seed, lengths=lengths, duplicates=True)
    b = b.to(DEVICE)
    return b, torch.where(b.profile_mask, b.profile_ids, 0)


def _reference_step(ref, opt, batch, loss):
    opt.zero_grad(set_to_none=True)
    value = get_loss(loss)(*ref(*batch))
    value.backward()
    grads = {n: g.grad.clone() for n, g in zip(ACFWeights._fields, ACFWeights.of(ref))}
    opt.step()
    return value.detach(), grads


@pytest.mark.parametrize("loss, tied, d, m", [
    ("warp", True, 16, 5), ("sigmoid", True, 16, 5), ("bpr", True, 16, 5),
    ("warp", False, 16, 5), ("bpr", False, 16, 5),
    # D = 48: the [D, D] products over two column chunks of 32, the second part masked;
    # M = 17 rows in a 32-row tile
    ("warp", False, 48, 17),
])
def test_steps_equal_reference_with_torch_adam(loss, tied, d, m):
    ref, opt_ref, model, opt = _twins(tied=tied, d=d, m=m)
    step = FusedTrainStep(model, opt, loss)
    lengths = [[9, 0, 3, 1, 9, 0, 5], [2, 2, 2], [0, 0, 0, 0, 1]]   # last: nearly all empty
    for it, lens in enumerate(lengths):
        batch, prof = _batch(model, lens, seed=it)
        expected, grads = _reference_step(ref, opt_ref, batch, loss)
        got = step.step(batch.user_ids, prof, batch.pos, batch.neg)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
        for name, g in step.gradients().items():
            torch.testing.assert_close(g, grads[name], atol=1e-12, rtol=1e-10, msg=name)
    # the two softmax biases (c2, c1) have an exactly-zero gradient (a softmax ignores a
    # shift): only rounding noise reaches them, which Adam normalises up to lr size
    shift_free = {"user_model.feats.w.bias", "user_model.w.bias"}
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        if name not in shift_free:   # atol: Adam turns 1e-18 gradient noise on elements
            # whose gradient is near eps into ~1e-12 (lr / eps * noise)
            torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10, msg=name)
    mine, theirs = opt.state_dict()["state"], opt_ref.state_dict()["state"]
    assert sorted(mine) == sorted(theirs)      # the unused w_v has no state in either
    for index, (name, _) in enumerate(ref.named_parameters()):
        if index not in theirs:
            continue
        a, b = theirs[index], mine[index]
        assert float(b["step"]) == float(a["step"]) == len(lengths)
        if name not in shift_free:
            torch.testing.assert_close(b["exp_avg_sq"], a["exp_avg_sq"], atol=1e-20, rtol=1e-8)


def test_epoch_order_on_the_device_advances_the_cursor():
    """bind_epoch + epoch_step: the batches come from device-resident triplets in the
    epoch's order, a device cursor moves on, and the steps equal step() on those batches."""
    _, _, model, opt = _twins()
    _, _, twin, opt_twin = _twins()
    batch, prof = _batch(model, [3, 9, 0, 4, 4, 1, 2, 7, 5, 0])
    order = torch.tensor([4, 1, 7, 0, 9, 2, 3, 8, 6, 5], device=DEVICE)
    step = FusedTrainStep(model, opt, "warp")
    step.bind_epoch(batch.user_ids, prof, batch.pos, batch.neg, order, batch_size=5)
    other = FusedTrainStep(twin, opt_twin, "warp")
    for k in range(2):
        idx = order[k * 5:(k + 1) * 5]
        got = step.epoch_step(5).clone()
        want = other.step(batch.user_ids[idx], prof[idx], batch.pos[idx], batch.neg[idx])
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_repeats_are_bit_identical():
    outs = []
    for _ in range(2):
        _, _, model, opt = _twins(dtype=torch.float32)
        step = FusedTrainStep(model, opt, "warp")
        batch, prof = _batch(model, [9, 4, 4, 0, 9, 2])
        for _ in range(2):
            step.step(batch.user_ids, prof, batch.pos, batch.neg)
        outs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("feature_dtype", [torch.bfloat16, torch.float16])
def test_16bit_table_within_the_reference_bound(feature_dtype):
    """fp32 parameters and a 16-bit table against the same model in float64: the fused
    gradients stay within a small multiple of the reference's own (fp32) error."""
    exact, _, _, _ = _twins(dtype=torch.float64, feature_dtype=feature_dtype)
    ref32, _, model, opt = _twins(dtype=torch.float32, feature_dtype=feature_dtype)
    batch, prof = _batch(model, [9, 3, 0, 9, 5])
    _, want = _reference_step(exact, torch.optim.Adam(exact.parameters()), batch.to(DEVICE), "warp")
    _, ref_grads = _reference_step(ref32, torch.optim.Adam(ref32.parameters()), batch, "warp")
    step = FusedTrainStep(model, opt, "warp")
    step.step(batch.user_ids, prof, batch.pos, batch.neg)
    for name, g in step.gradients().items():
        scale = want[name].abs().max().item() + 1e-30
        ref_err = (ref_grads[name].double() - want[name]).abs().max().item() / scale
        err = (g.double() - want[name]).abs().max().item() / scale
        assert err <= max(4 * ref_err, 1e-5), f"{name}: {err:.2e} vs reference {ref_err:.2e}"


class _LossOfParameters(torch.autograd.Function):
    """The fused step's loss as a function of its parameters (no update: gradients only)."""

    @staticmethod
    def forward(ctx, step, batch, prof, *params):
        with torch.no_grad():
            for p, value in zip(step.weights_unique(), params):
                p.copy_(value)
        loss, grads = step.loss_and_gradients(batch.user_ids, prof, batch.pos, batch.neg)
        ctx.grads = grads
        return loss

    @staticmethod
    def backward(ctx, g):
        return (None, None, None) + tuple(g * t for t in ctx.grads)


def test_gradcheck_float64():
    _, _, model, opt = _twins(dtype=torch.float64, lr=0.0)
    step = FusedTrainStep(model, opt, "sigmoid")    # smooth: WARP's count has jumps
    batch, prof = _batch(model, [4, 0, 2, 4])
    params = [p.detach().clone().requires_grad_(True) for p in step.weights_unique()]
    assert torch.autograd.gradcheck(
        lambda *ps: _LossOfParameters.apply(step, batch, prof, *ps), params,
        eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


class _Recorder(TorchDispatchMode):
    """Every ATen op except allocations, views and metadata."""

    FREE = {"empty", "empty_strided", "view", "_unsafe_view", "as_strided", "detach",
            "alias", "select", "slice", "t", "transpose", "unsqueeze", "squeeze",
            "expand", "reshape", "lift_fresh", "_to_copy_meta"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name().split("::")[-1].split(".")[0]
        if name not in self.FREE:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def _count_launches(monkeypatch):
    """Count every Triton launch (JITFunction.run, or the interpreter's). What a launch
    does inside (the interpreter copies tensors with torch) is hidden from the recorder:
    on a GPU it is one kernel."""
    from torch.utils._python_dispatch import _disable_current_modes
    from triton.runtime import jit

    launches = []
    classes = [jit.JITFunction]
    if triton_interpreter_on():
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    for cls in classes:
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            launches.append(getattr(self, "__name__", None) or self.fn.__name__)
            with _disable_current_modes():
                return _original(self, *args, **kwargs)
        monkeypatch.setattr(cls, "run", run)
    return launches


@pytest.mark.parametrize("lengths, d, m", [
    ([0, 0, 0], 16, 5),               # every profile empty (P = 1, all padding)
    ([4], 16, 5),                     # B = 1 (the JIT's constexpr 1), P = 4
    ([3, 1, 2, 3, 0], 20, 1),         # B * P = 15 slot programs, D = 20 in a masked chunk, M = 1
    ([16, 2, 0], 16, 5),              # P = 16 = BLOCK_P exactly
    ([17, 5, 1], 24, 3),              # P = 17: BLOCK_P 32
    ([1, 1, 1, 1, 1, 1, 1], 16, 33),  # P = 1, M = 33: BLOCK_M 64
])
def test_odd_shapes_equal_reference(lengths, d, m):
    """The slot and user programs at the edges of their tiles, two steps on one plan."""
    ref, opt_ref, model, opt = _twins(tied=False, d=d, m=m)
    step = FusedTrainStep(model, opt, "bpr")
    for it in range(2):
        batch, prof = _batch(model, lengths, seed=10 + it)
        expected, grads = _reference_step(ref, opt_ref, batch, "bpr")
        got = step.step(batch.user_ids, prof, batch.pos, batch.neg)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
        for name, g in step.gradients().items():
            torch.testing.assert_close(g, grads[name], atol=1e-12, rtol=1e-10, msg=name)
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("lengths", [[9, 0, 3, 1, 9, 0, 5], [0, 0, 0], [2, 17, 1]])
def test_every_buffer_a_launch_reads_is_written_by_the_step(lengths):
    """A plan's buffers are reused step after step: poison them all (NaN, ids -1) before a
    step, and any element a later launch reads without this step writing it (a padding
    slot's partial, a masked tail) shows as a wrong gradient. A fresh plan's zeroed
    buffers would hide such a miss."""
    ref, opt_ref, model, opt = _twins(tied=False, d=20, m=5)
    step = FusedTrainStep(model, opt, "bpr")
    batch, prof = _batch(model, lengths, seed=5)
    step.loss_and_gradients(batch.user_ids, prof, batch.pos, batch.neg)   # makes the plan
    plan = step._last
    for name in ("r", "dr", "dxr", "xbar", "dz", "duser", "ditem", "dprof", "terms",
                 "flags", "scores", "partials"):
        getattr(plan, name).fill_(float("nan"))
    for name in ("user_ids", "item_ids", "prof_ids"):
        getattr(plan, name).fill_(-1)
    _, grads = _reference_step(ref, opt_ref, batch, "bpr")
    step.loss_and_gradients(batch.user_ids, prof, batch.pos, batch.neg)
    for name, g in step.gradients().items():
        torch.testing.assert_close(g, grads[name], atol=1e-12, rtol=1e-10, msg=name)


def test_loss_and_gradients_leaves_the_optimizer_alone():
    """No parameter, moment or step count changes: the step count belongs to Adam."""
    _, _, model, opt = _twins()
    step = FusedTrainStep(model, opt, "bpr")
    batch, prof = _batch(model, [3, 2])
    before = [t.clone() for t in (step.state.step, step.state.flat, step.state.exp_avg)]
    step.loss_and_gradients(batch.user_ids, prof, batch.pos, batch.neg)
    for a, b in zip(before, (step.state.step, step.state.flat, step.state.exp_avg)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("B", [7, 33])
def test_a_step_is_eleven_launches_and_nothing_else(monkeypatch, B):
    """The issue's budget is 12 device kernels a step (goal 8): a training step from the
    device-resident epoch is exactly 11 Triton launches, in this order, and not a single
    ATen op (so nothing is read back either); a host batch adds only the copies into
    its buffers."""
    _, _, model, opt = _twins(dtype=torch.float32)
    batch, prof = _batch(model, [9, 0, 3, 1, 9, 0, 5] * (B // 7) + [2] * (B % 7))
    step = FusedTrainStep(model, opt, "warp")
    step.bind_epoch(batch.user_ids, prof, batch.pos, batch.neg, torch.arange(B, device=DEVICE))
    step.epoch_step(B)                  # plans the buffers (allocations) once
    step.bind_epoch(batch.user_ids, prof, batch.pos, batch.neg, torch.arange(B, device=DEVICE))
    launches = _count_launches(monkeypatch)
    with _Recorder() as rec:
        step.epoch_step(B)
    assert rec.ops == []
    assert launches == (["_slot_forward_kernel", "_user_step_kernel", "_slot_backward_kernel"]
                        + ["_outer_sum_kernel"] * 6 + ["_row_sums_kernel", "_adam_kernel"]), launches
    step.step(batch.user_ids, prof, batch.pos, batch.neg)   # allocates its input buffers once
    launches.clear()
    checked = _unrecorded_checks(monkeypatch, model)
    with _Recorder() as rec:
        step.step(batch.user_ids, prof, batch.pos, batch.neg)
    assert len(launches) == 11
    assert set(rec.ops) <= {"copy_", "zero_", "fill_"}, rec.ops
    assert "_local_scalar_dense" not in rec.ops and "item" not in rec.ops
    # the batch's ids are checked where the batch is (a host batch: on the host)
    assert checked == [batch.user_ids.device]


def _unrecorded_checks(monkeypatch, model) -> list:
    """The model's batch checks run outside the recorder; returns the devices they ran on."""
    from torch.utils._python_dispatch import _disable_current_modes

    devices, original = [], model._check_batch

    def check(*args, device=None, **kwargs):
        devices.append(device)
        with _disable_current_modes():
            return original(*args, device=device, **kwargs)
    monkeypatch.setattr(model, "_check_batch", check)
    return devices


def test_bad_ids_are_refused_before_any_kernel_runs():
    """An id outside its table would make the kernels read and write out of bounds:
    refused with the id and the range, for a batch, an epoch's triplets and its order."""
    _, _, model, opt = _twins()
    step = FusedTrainStep(model, opt, "warp")
    batch, prof = _batch(model, [3, 2, 1])
    bad_users = batch.user_ids.clone()
    bad_users[1] = model.num_users
    with pytest.raises(ValueError, match=f"user_ids contains id {model.num_users}"):
        step.step(bad_users, prof, batch.pos, batch.neg)
    with pytest.raises(ValueError, match="pos contains id 0"):
        step.step(batch.user_ids, prof, torch.zeros_like(batch.pos), batch.neg)
    bad_prof = prof.clone()
    bad_prof[0, 0] = model.num_items + 1
    with pytest.raises(ValueError, match="profile_ids contains id"):
        step.bind_epoch(batch.user_ids, bad_prof, batch.pos, batch.neg,
                        torch.arange(3, device=DEVICE))
    with pytest.raises(ValueError, match="order contains id 3"):
        step.bind_epoch(batch.user_ids, prof, batch.pos, batch.neg,
                        torch.tensor([0, 1, 3], device=DEVICE))
    assert not step.state.step.any()           # nothing ran


def test_what_it_does_not_implement_is_refused():
    ref, _, model, opt = _twins()
    with pytest.raises(ValueError, match="runs the triton backend; this model runs 'reference'"):
        FusedTrainStep(ref, torch.optim.Adam(ref.parameters()), "warp")
    with pytest.raises(ValueError, match="implements the losses"):
        FusedTrainStep(model, opt, "hinge")
    with pytest.raises(ValueError, match="implements torch.optim.Adam, got SGD"):
        FusedTrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), "warp")
    with pytest.raises(ValueError, match="amsgrad=True"):
        FusedTrainStep(model, torch.optim.Adam(model.parameters(), amsgrad=True), "warp")


def test_trainer_fused_steps_follow_the_plain_loop(tmp_path):
    """The Trainer with the fused step (losses read one step late, the epoch's order on
    the device) against its plain loop: the same step losses in the same order, an
    interrupted run's mid-epoch checkpoint resumes the fused step where it stopped."""
    pytest.importorskip("h5py")
    from conftest import tiny_prepared_dataset, tiny_train_config

    from acf_fast.training import Trainer
    from acf_fast.training.steps import FusedStep

    root = tiny_prepared_dataset(tmp_path)
    # 4 steps of 64 (the interpreter is slow); the plain loop on the reference backend
    size = dict(batch_size=64, max_profile_size=3, val_rank_samples=0, epochs=1)
    plain = Trainer(tiny_train_config(root, tmp_path / "plain", max_steps=4, **size))
    plain.fit()
    fused = Trainer(tiny_train_config(root, tmp_path / "fused", max_steps=2, backend="triton",
                                      **size))
    fused.train_step = FusedStep(fused, capture=False)
    fused.fit()                                         # stops mid-epoch after 2 steps
    assert len(fused.step_losses) == 2
    resumed = Trainer(tiny_train_config(root, tmp_path / "fused", max_steps=4, backend="triton",
                                        **size))
    resumed.train_step = FusedStep(resumed, capture=False)
    assert resumed.resume()
    resumed.fit()
    got = fused.step_losses + resumed.step_losses
    assert len(got) == len(plain.step_losses) == 4
    # float32 and Adam: the two paths' last-bit differences grow a little step by step
    torch.testing.assert_close(torch.tensor(got), torch.tensor(plain.step_losses),
                               atol=1e-3, rtol=1e-3)
