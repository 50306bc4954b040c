"""The fused step's embedding gradients (kernels.embedding_grad, then kernels.adam): each
table's (id, row) lists summed per id into a dense buffer that the optimizer reads and
clears. Checked under TRITON_INTERPRET=1 against torch's index_add_ of the same lists
and against the reference trained by torch.optim.Adam, with batches whose lists span
several programs and chunks and repeat users and items many times.
"""

import pytest
import torch

pytest.importorskip("triton")
from conftest import require_triton_runnable  # noqa: E402

require_triton_runnable()

from test_fused_step import DEVICE, _batch, _reference_step, _twins  # noqa: E402

from acf_fast.training.fused_step import FusedTrainStep  # noqa: E402


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_rows_are_summed_per_id_and_cleared_by_the_optimizer(tied):
    """kernels.embedding_grad: each table's rows summed per id (duplicates, repeated
    users, the padding id 0 left out) equal torch's index_add_ of the same lists; the
    optimizer leaves the dense buffer all zeros for the next step."""
    _, _, model, opt = _twins(tied=tied)
    step = FusedTrainStep(model, opt, "warp")
    lengths = [9, 0, 3, 1, 9, 0, 5, 2, 2]
    batch, prof = _batch(model, lengths, seed=7)
    batch.user_ids[1::2] = batch.user_ids[0]                  # one user many times
    src, B, P = step._load(batch.user_ids, prof, batch.pos, batch.neg)
    plan = step._plan(B, P)
    step.launch(plan, src, advance=False, update=False)
    assert not step.emb_grad.any()
    step.sum_embedding_rows(plan)
    lists = {"user_emb": [(plan.user_ids, plan.duser)],
             "item_emb": [(plan.item_ids, plan.ditem)] + ([(plan.prof_ids, plan.dprof)] if tied else []),
             "profile_emb": [(plan.prof_ids, plan.dprof)]}
    assert set(step.emb_offsets) == ({"user_emb", "item_emb"} | (set() if tied else {"profile_emb"}))
    assert plan.item_ids.unique().numel() < plan.item_ids.numel()          # duplicates present
    for name, off in step.emb_offsets.items():
        param = step.state.params[name]
        got = step.emb_grad[off:off + param.numel()].view_as(param)
        expected = torch.zeros_like(param)
        for ids, rows in lists[name]:
            expected.index_add_(0, ids, rows)
        if name != "user_emb":
            expected[0] = 0
        torch.testing.assert_close(got, expected, atol=1e-13, rtol=1e-12, msg=name)
    step.launch(plan, src, advance=False)                     # a whole step, optimizer too
    assert not step.emb_grad.any()


@pytest.mark.parametrize("tied", [True, False])
def test_big_batches_with_heavy_repeats_equal_reference(tied):
    """Three steps of B = 37, 23, 41 (lists of several programs and chunks), one user a
    third of each batch, item 7 three times in many profiles and as many positives."""
    ref, opt_ref, model, opt = _twins(tied=tied)
    step = FusedTrainStep(model, opt, "warp")
    for it, B in enumerate((37, 23, 41)):
        lengths = [(7 * k + it) % 10 for k in range(B)]
        batch, prof = _batch(model, lengths, seed=10 + it)
        batch.user_ids[::3] = batch.user_ids[0]
        prof = prof.clone()
        for k in range(1, B, 4):
            if lengths[k] >= 3:
                prof[k, :3] = 7
        batch.pos[::5] = 7
        batch = batch._replace(profile_ids=prof, profile_mask=prof != 0)
        expected, _ = _reference_step(ref, opt_ref, batch, "warp")
        got = step.step(batch.user_ids, prof, batch.pos, batch.neg)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
        assert not step.emb_grad.any()
    # not the attention logits' biases c1, c2: their gradient is zero up to rounding (a
    # softmax ignores a shift), and Adam's normalisation turns rounding into a whole step
    for (name, a), b in zip(ref.named_parameters(), model.parameters()):
        if name not in {"user_model.feats.w.bias", "user_model.w.bias"}:
            torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10, msg=name)


def test_a_non_finite_row_stays_with_its_id():
    """An inf row adds to its own id's sum only (as index_add_), not to the other sums of
    its program: the rows are selected, never multiplied by 0 (0 * inf is NaN)."""
    from acf_fast.kernels import embedding_grad as emb

    D, n = 8, 16
    ids = torch.arange(1, n + 1, device=DEVICE)
    ids[5] = 3
    rows = torch.ones(n, D, dtype=torch.float64, device=DEVICE)
    rows[5] = float("inf")
    out = torch.zeros((n + 1) * D, dtype=torch.float64, device=DEVICE)
    spec = torch.tensor([[0, 0, n, 0, 1]], device=DEVICE)   # TABLE_FIELDS
    emb._row_sums_kernel[(1,)](ids, rows, spec, 1, out, D, N_FIELDS=len(emb.TABLE_FIELDS),
                               **emb.blocks(D))
    expected = torch.zeros(n + 1, D, dtype=torch.float64, device=DEVICE).index_add_(0, ids, rows)
    expected[0] = 0
    torch.testing.assert_close(out.view(n + 1, D), expected, equal_nan=True)
