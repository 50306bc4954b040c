"""The reference ACF against docs/model.md's equations written out literally, and its invariants."""

import math

import pytest
import torch
from torch.func import functional_call

from acf_fast import ACF
from acf_fast.testing import random_batch, random_model
from acf_fast.model.weights import ACFWeights


def literal_acf(model, user_ids, profile_ids, pos, neg):
    """docs/model.md#forward-pass, eqs. (1)-(6): one user, one slot, one component at a time, in float64."""
    w = ACFWeights.of(model)
    w = ACFWeights(*(t.detach().double() for t in w))
    table = model.feature_table.double()
    d = model.model_dim
    pos_s, neg_s, alphas, betas = [], [], [], []
    for b in range(user_ids.shape[0]):
        u = w.user_emb[user_ids[b]]
        ids = [int(i) for i in profile_ids[b]]
        xbars, logits, beta_rows = [], [], []
        for item in ids:
            m_l = 1.0 if item != 0 else 0.0
            r = [w.red_w @ x + w.red_b for x in table[item]]                      # 1.
            e = [float(w.c_w[0] @ torch.relu(w.c_wx @ r_m + w.c_bx + w.c_wu @ u + w.c_bu)
                       + w.c_b[0]) for r_m in r]                                   # 2.
            mx = max(e)
            ex = [math.exp(v - mx) for v in e]
            beta = [v / sum(ex) for v in ex]
            xbar = m_l * sum(bm * r_m for bm, r_m in zip(beta, r))                 # 3.
            xbars.append(xbar)
            beta_rows.append([bm * m_l for bm in beta])
        ut = w.i_wu @ u + w.i_bu                                                   # 4.
        for item, xbar in zip(ids, xbars):
            p = w.profile_emb[item]
            a = float(w.i_w[0] @ torch.relu(ut + w.i_wp @ p + w.i_bp + w.i_wx @ xbar + w.i_bx)
                      + w.i_b[0])
            logits.append(a if item != 0 else -math.inf)
        if all(v == -math.inf for v in logits):
            alpha = [0.0] * len(ids)
        else:
            mx = max(logits)
            ex = [math.exp(v - mx) if v != -math.inf else 0.0 for v in logits]
            alpha = [v / sum(ex) for v in ex]
        user = ut + sum(a * w.profile_emb[item] for a, item in zip(alpha, ids))    # 5.
        pos_s.append(float(user @ w.item_emb[pos[b]]) / d)                         # 6.
        neg_s.append(float(user @ w.item_emb[neg[b]]) / d)
        alphas.append(alpha)
        betas.append(beta_rows)
    f64 = torch.float64
    return (torch.tensor(pos_s, dtype=f64), torch.tensor(neg_s, dtype=f64),
            torch.tensor(alphas, dtype=f64), torch.tensor(betas, dtype=f64))


@pytest.fixture
def model():
    return random_model(n_users=5, n_items=12, m=6, f=10, d=8, dtype=torch.float64)


def test_matches_literal_equations(model):
    batch = random_batch(model, batch=6, max_profile=4, seed=3, lengths=[0, 1, 4, 2, 3, 4])
    pos, neg = model(*batch)
    _, alpha, beta = model.user_vectors(batch.user_ids, batch.profile_ids, return_attentions=True)
    lp, ln, la, lb = literal_acf(model, batch.user_ids, batch.profile_ids, batch.pos, batch.neg)
    torch.testing.assert_close(pos, lp)
    torch.testing.assert_close(neg, ln)
    torch.testing.assert_close(alpha, la)
    torch.testing.assert_close(beta, lb)


def test_gradcheck_every_parameter(model):
    batch = random_batch(model, batch=3, max_profile=3, seed=1, lengths=[2, 0, 3], duplicates=True)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in model.named_parameters())

    def f(*flat):
        pos, neg = functional_call(model, dict(zip(names, flat)), tuple(batch))
        return pos, neg

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-6)


def test_every_used_parameter_gets_a_gradient(model):
    batch = random_batch(model, batch=4, seed=2, lengths=[3, 1, 2, 2])
    pos, neg = model(*batch)
    (pos - neg).sum().backward()
    for name, p in model.named_parameters():
        if name.startswith("user_model.w_v."):
            assert p.grad is None, "w_v is kept for checkpoints only and must stay unused"
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_empty_profile_gives_zero_alpha_and_no_nan(model):
    batch = random_batch(model, batch=3, lengths=[0, 0, 0])
    pos, neg = model(*batch)
    user, alpha, _ = model.user_vectors(batch.user_ids, batch.profile_ids, return_attentions=True)
    assert torch.equal(alpha, torch.zeros_like(alpha))
    w = ACFWeights.of(model)
    torch.testing.assert_close(user, w.user_emb[batch.user_ids] @ w.i_wu.T + w.i_bu)
    (pos.sum() + neg.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_single_item_profile_gets_all_attention(model):
    batch = random_batch(model, batch=2, lengths=[1, 1])
    _, alpha, beta = model.user_vectors(batch.user_ids, batch.profile_ids, return_attentions=True)
    torch.testing.assert_close(alpha, torch.ones_like(alpha))
    torch.testing.assert_close(beta.sum(-1), torch.ones(2, 1, dtype=beta.dtype))


def test_right_padding_changes_nothing(model):
    batch = random_batch(model, batch=4, lengths=[2, 3, 0, 1])
    padded = torch.cat([batch.profile_ids, torch.zeros(4, 5, dtype=torch.long)], dim=1)
    a = model(batch.user_ids, batch.profile_ids, batch.pos, batch.neg)
    b = model(batch.user_ids, padded, batch.pos, batch.neg)
    torch.testing.assert_close(a, b)


def test_slot_order_changes_nothing(model):
    batch = random_batch(model, batch=1, lengths=[4])
    perm = batch.profile_ids[:, [2, 0, 3, 1]]
    torch.testing.assert_close(model(batch.user_ids, batch.profile_ids, batch.pos, batch.neg),
                               model(batch.user_ids, perm, batch.pos, batch.neg))


def test_duplicate_items_are_separate_slots(model):
    ids = torch.tensor([[3, 3, 5]])
    _, alpha, _ = model.user_vectors(torch.tensor([0]), ids, return_attentions=True)
    assert alpha[0, 0] == alpha[0, 1]
    torch.testing.assert_close(alpha.sum(), torch.tensor(1.0, dtype=alpha.dtype))


def test_batch_rows_are_independent(model):
    batch = random_batch(model, batch=5, seed=4)
    full = model(*batch)
    for b in range(5):
        one = model(*(t[b:b + 1] for t in batch))
        torch.testing.assert_close((full[0][b:b + 1], full[1][b:b + 1]), one)


def test_state_dict_keys_are_the_tutorials(model):
    expected = {
        "item_model.weight", "user_model.user_embedding.weight", "user_model.profile_embedding.weight",
        *(f"user_model.feats.{n}.{p}" for n in ("dim_reductor", "w_x", "w_u", "w") for p in ("weight", "bias")),
        *(f"user_model.{n}.{p}" for n in ("w_u", "w_v", "w_p", "w_x", "w") for p in ("weight", "bias")),
    }
    assert set(model.state_dict()) == expected
    assert model.user_model.profile_embedding is model.item_model  # tied: p_l = v_l


def test_padding_row_and_init():
    m = random_model(n_users=300, n_items=500, d=64, f=16, m=4)
    assert torch.equal(m.item_model.weight[0], torch.zeros(64))
    assert abs(m.user_model.user_embedding.weight.std().item() - 1) < 0.05      # N(0, 1)
    w = m.user_model.w_p.weight
    assert abs(w.std().item() - math.sqrt(2 / 64)) < 0.02                        # Kaiming, relu
    assert torch.equal(m.user_model.w_p.bias, torch.zeros(64))


def test_recommend_batch_scores_and_topk(model):
    batch = random_batch(model, batch=4, seed=5)
    scores, beta, alpha = model.recommend_batch(batch.user_ids, batch.profile_ids, return_attentions=True)
    assert scores.shape == (4, model.num_items) and alpha.shape == batch.profile_ids.shape
    assert beta.shape == (*batch.profile_ids.shape, model.num_components)
    pos, _ = model(batch.user_ids, batch.profile_ids, batch.pos, batch.neg)
    torch.testing.assert_close(scores.gather(1, (batch.pos - 1).unsqueeze(1)).squeeze(1), pos)
    top_s, top_i = model.recommend_batch(batch.user_ids, batch.profile_ids, k=3, block_items=5)
    ref = scores.topk(3, dim=1)
    torch.testing.assert_close(top_s, ref.values)
    assert torch.equal(top_i, ref.indices + 1)


def test_recommend_batch_excludes(model):
    batch = random_batch(model, batch=3, seed=6, lengths=[2, 3, 0])
    scores = model.recommend_batch(batch.user_ids, batch.profile_ids, exclude=batch.profile_ids)
    for b in range(3):
        for item in batch.profile_ids[b][batch.profile_ids[b] > 0]:
            assert scores[b, item - 1] == float("-inf")
    assert torch.isfinite(scores[2]).all()
    _, top_i = model.recommend_batch(batch.user_ids, batch.profile_ids, k=5, exclude=batch.profile_ids,
                                   block_items=4)
    for b in range(3):
        assert not set(top_i[b].tolist()) & set(batch.profile_ids[b].tolist())


def test_tied_false_has_separate_profile_embedding():
    feats = torch.rand(6, 4, 5)
    m = ACF(3, 6, features=feats, model_dim=4, tied_item_embedding=False)
    assert m.user_model.profile_embedding is not m.item_model
    assert "user_model.profile_embedding.weight" in m.state_dict()
