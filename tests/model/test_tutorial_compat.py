"""Drop-in check: the tutorial's own module layout (VisRec slides, models/acf.py) loads our
state dict and computes the same scores, attentions and gradients.

The modules below follow the slides' forward code line by line (its permutes, its
movedim, its masked_fill with -inf), with the slide's typo `self.w_u[user]` read as the
call it must be. They are test fixtures, not part of the package.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from acf_fast import ACF
from acf_fast.testing import random_batch


class TutorialFeatureNet(nn.Module):
    def __init__(self, emb_dim, input_feature_dim, feature_dim, hidden_dim=None):
        super().__init__()
        hidden_dim = hidden_dim or emb_dim
        self.dim_reductor = nn.Linear(input_feature_dim, feature_dim)
        self.w_x = nn.Linear(feature_dim, hidden_dim)
        self.w_u = nn.Linear(emb_dim, hidden_dim)
        self.w = nn.Linear(hidden_dim, 1)

    def forward(self, user, components, profile_mask, return_attentions=False):
        x = self.dim_reductor(components)
        x = x.movedim(0, -2)
        x_tilde = self.w_x(x)
        user = self.w_u(user)
        beta = F.relu(x_tilde + user)
        beta = self.w(beta)
        beta = F.softmax(beta, dim=1)
        x = (beta * x).sum(dim=1)
        x = x.movedim(-2, 0)
        feature_dim = x.shape[-1]
        profile_mask = profile_mask.float()
        profile_mask = profile_mask.unsqueeze(-1).expand((*profile_mask.shape, feature_dim))
        x = profile_mask * x
        output = {"pooled_features": x}
        if return_attentions:
            output["attentions"] = beta.squeeze(-1).squeeze(-1)
        return output


class TutorialUserNet(nn.Module):
    def __init__(self, num_users, emb_dim, input_feature_dim, profile_embedding):
        super().__init__()
        self.feats = TutorialFeatureNet(emb_dim, input_feature_dim, emb_dim)
        self.user_embedding = nn.Embedding(num_users, emb_dim)
        self.profile_embedding = profile_embedding
        self.w_u = nn.Linear(emb_dim, emb_dim)
        self.w_v = nn.Linear(emb_dim, emb_dim)
        self.w_p = nn.Linear(emb_dim, emb_dim)
        self.w_x = nn.Linear(emb_dim, emb_dim)
        self.w = nn.Linear(emb_dim, 1)

    def forward(self, user_ids, profile_ids, features, profile_mask):
        user = self.user_embedding(user_ids)
        profile = self.profile_embedding(profile_ids)
        feat_output = self.feats(user, features, profile_mask, True)
        components = feat_output["pooled_features"]
        user = self.w_u(user)
        profile_query = self.w_p(profile)
        components = self.w_x(components)
        profile_query = profile_query.permute((1, 0, 2))
        components = components.permute((1, 0, 2))
        alpha = F.relu(user + profile_query + components)
        alpha = self.w(alpha)
        profile_mask = profile_mask.permute((1, 0))
        profile_mask = profile_mask.unsqueeze(-1)
        alpha = alpha.masked_fill(torch.logical_not(profile_mask), float("-inf"))
        alpha = F.softmax(alpha, dim=0)
        alpha = alpha.permute((1, 0, 2))
        user_profile = (alpha * profile).sum(dim=1)
        user = user + user_profile
        return {"user": user, "profile_attentions": alpha.squeeze(-1),
                "component_attentions": feat_output["attentions"]}


class TutorialACF(nn.Module):
    def __init__(self, num_users, num_items, feature_data, model_dim, all_items=None):
        super().__init__()
        self.model_dim = model_dim
        self.all_items = torch.arange(1, num_items) if all_items is None else all_items
        self.feature_data = feature_data  # [N + 1, 7, 7, F], channels last, as the tutorial keeps it
        self.item_model = nn.Embedding(num_items, model_dim, padding_idx=0)
        self.user_model = TutorialUserNet(num_users, model_dim, feature_data.shape[-1], self.item_model)

    def forward(self, user_id, profile_ids, pos, neg, profile_mask):
        profile_features = self.feature_data[profile_ids].flatten(start_dim=2, end_dim=3)
        out = self.user_model(user_id, profile_ids, profile_features, profile_mask)
        user = out["user"]
        pos_pred = (user * self.item_model(pos)).sum(1) / self.model_dim
        neg_pred = (user * self.item_model(neg)).sum(1) / self.model_dim
        return pos_pred, neg_pred, out

    def recommend_all(self, user_id, profile_ids):
        """The tutorial's contract for one user [1], profile [1, P]: the user vector [1, D]
        broadcast against every catalogue embedding [N, D] and summed over dim 1 -> [N];
        the feature net's attentions [P, 49, 1, 1] squeezed -> [P, 49]; alpha -> [1, P]."""
        features = self.feature_data[profile_ids].flatten(start_dim=2, end_dim=3)
        out = self.user_model(user_id, profile_ids, features, profile_ids != 0)
        scores = (out["user"] * self.item_model(self.all_items)).sum(1) / self.model_dim
        return scores, out["component_attentions"], out["profile_attentions"]


def tutorial_sizes(model_args):
    """How the tutorial sizes its tables from a checkpoint's model_args: max(id) + 1, item
    ids shifted to 1-based when they start at 0. Needs id lists, not counts."""
    num_users = max(model_args["users"]) + 1
    all_items = torch.tensor(model_args["items"])
    all_items = all_items + 1 if all_items.min() == 0 else all_items
    return num_users, int(max(all_items)) + 1, all_items


def write_npy(path, grids):
    arr = np.empty((grids.shape[0], 2), dtype=object)
    for i in range(grids.shape[0]):
        arr[i] = [f"{i}.jpg", grids[i]]
    np.save(path, arr, allow_pickle=True)
    return str(path)


def tutorial_table(grids):
    """The tutorial's feature_data: a zero row, then [N, 7, 7, F] channels last."""
    return torch.cat([torch.zeros(1, *grids.shape[1:]), torch.from_numpy(grids)]).permute(0, 2, 3, 1).contiguous()


def _backends():
    from acf_fast.backends import registry as select
    names = ["reference"]
    if select.cpu_extension_available():
        names.append("cpu")
    if select.triton_supports(torch.device("cpu")):
        names.append("triton")
    return names


@pytest.mark.parametrize("backend", _backends())
def test_tutorial_modules_load_our_state_dict_and_agree(tmp_path, backend):
    rng = np.random.default_rng(0)
    grids = rng.standard_normal((15, 24, 7, 7)).astype(np.float32)  # the .npy layout (F, 7, 7)
    arr = np.empty((15, 2), dtype=object)
    for i in range(15):
        arr[i] = [f"{i}.jpg", grids[i]]
    np.save(tmp_path / "features.npy", arr, allow_pickle=True)

    torch.manual_seed(0)
    ours = ACF(list(range(6)), list(range(15)), str(tmp_path / "features.npy"), model_dim=16,
               backend=backend)
    table = torch.cat([torch.zeros(1, 24, 7, 7), torch.from_numpy(grids)]).permute(0, 2, 3, 1)
    theirs = TutorialACF(6, 16, table.contiguous(), 16)
    theirs.load_state_dict(ours.state_dict())  # strict: every key matches both ways

    # the tutorial's softmax over slots is NaN for an empty profile; docs/model.md#item-attention fixes that, so
    # the comparison uses non-empty profiles (the empty case is tested against docs/model.md elsewhere)
    batch = random_batch(ours, batch=7, lengths=[1, 3, 9, 2, 5, 4, 9], seed=1)
    p1, n1 = ours(*batch)
    p2, n2, out = theirs(*batch)
    torch.testing.assert_close(p1, p2)
    torch.testing.assert_close(n1, n2)
    _, alpha, beta = ours.user_vectors(batch.user_ids, batch.profile_ids, return_attentions=True)
    torch.testing.assert_close(alpha, out["profile_attentions"])
    tutorial_beta = out["component_attentions"].permute(2, 0, 1) * batch.profile_mask.unsqueeze(-1)
    torch.testing.assert_close(beta, tutorial_beta)

    (p1 - 2 * n1).sum().backward()
    (p2 - 2 * n2).sum().backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        if param.grad is None:
            assert theirs_grads[name].grad is None, name
        else:
            torch.testing.assert_close(param.grad, theirs_grads[name].grad, msg=name)


# ---------------------------------------------------------------- the drop-in contracts
@pytest.fixture
def pair(tmp_path):
    """acf_fast's ACF from a .npy file, and the oracle holding the same parameters."""
    grids = np.random.default_rng(3).standard_normal((12, 8, 7, 7)).astype(np.float32)
    torch.manual_seed(0)
    ours = ACF(np.arange(5), np.arange(1, 13), write_npy(tmp_path / "features.npy", grids),
               model_dim=8).eval()
    theirs = TutorialACF(5, 13, tutorial_table(grids), 8)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("user, profile", [(2, [3, 7, 1]), (0, [12]), (4, [5, 9, 0, 0])])
def test_recommend_all_for_one_user_keeps_the_tutorial_contract(pair, user, profile):
    """Order (scores, component, profile attentions), shapes [N], [P, 49], [1, P], and
    values; a padded slot's component attentions are 1/49 there, as in the tutorial."""
    ours, theirs = pair
    u, p = torch.tensor([user]), torch.tensor([profile])
    want = theirs.recommend_all(u, p)
    got = ours.recommend_all(u, p, return_attentions=True)
    assert isinstance(got, tuple) and len(got) == 3
    assert [x.shape for x in got] == [x.shape for x in want] == [
        (12,), (len(profile), 49), (1, len(profile))]
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y.detach())
    torch.testing.assert_close(ours.recommend_all(u, p), want[0].detach())  # no attentions: [N]


def test_an_acf_fast_checkpoint_builds_the_tutorial_model(pair, tmp_path):
    """make_checkpoint (what `acf-fast train` writes) -> torch.load(weights_only=True) ->
    the tutorial's sizing from model_args -> strict load_state_dict -> the same scores."""
    from acf_fast.model.checkpoint import make_checkpoint, save_checkpoint

    ours, _ = pair
    opt = torch.optim.Adam(ours.parameters())
    path = save_checkpoint(make_checkpoint(ours, opt, epoch=1, loss=0.5), tmp_path / "best.pt")
    ckpt = torch.load(path, weights_only=True)
    num_users, num_items, all_items = tutorial_sizes(ckpt["model_args"])
    assert ckpt["model_args"]["feature_path"] == ours.feature_path
    table = tutorial_table(np.stack([g for g in np.load(ckpt["model_args"]["feature_path"],
                                                        allow_pickle=True)[:, 1]]))
    theirs = TutorialACF(num_users, num_items, table, ckpt["model_args"]["model_dim"], all_items)
    theirs.load_state_dict(ckpt["state_dict"])
    u, p = torch.tensor([3]), torch.tensor([[2, 11, 6]])
    for x, y in zip(ours.recommend_all(u, p, return_attentions=True), theirs.recommend_all(u, p)):
        torch.testing.assert_close(x, y.detach())


def test_a_checkpoint_saved_the_tutorial_trainers_way_loads_everywhere(pair, tmp_path):
    """{epoch, loss, model_args: model.args(), state_dict, optimizer}, as the tutorial's
    trainer builds it, loads with weights_only=True and with ACF.from_checkpoint(ckpt, device=...)."""
    ours, _ = pair
    opt = torch.optim.Adam(ours.parameters(), lr=1e-3, weight_decay=1e-5)
    state = {"epoch": 0, "loss": 1.5, "model_args": ours.args(), "state_dict": ours.state_dict(),
             "optimizer": opt.state_dict()}
    torch.save(state, tmp_path / "ACF_e0.pt")
    ckpt = torch.load(tmp_path / "ACF_e0.pt", map_location=torch.device("cpu"), weights_only=True)
    args = ckpt["model_args"]
    assert args["users"] == [0, 1, 2, 3, 4] and args["items"] == list(range(1, 13))
    assert all(type(i) is int for i in args["users"] + args["items"])
    assert isinstance(args["feature_path"], str) and type(args["model_dim"]) is int
    assert args["input_feature_dim"] == 8
    again = ACF.from_checkpoint(ckpt, device=torch.device("cpu")).eval()
    u, p = torch.tensor([1]), torch.tensor([[4, 2]])
    for x, y in zip(again.recommend_all(u, p, True), ours.recommend_all(u, p, True)):
        assert torch.equal(x, y)
    num_users, num_items, _ = tutorial_sizes(args)
    assert (num_users, num_items) == (ours.num_users, ours.num_items + 1)
