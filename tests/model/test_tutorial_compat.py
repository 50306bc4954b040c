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
    def __init__(self, num_users, num_items, feature_data, model_dim):
        super().__init__()
        self.model_dim = model_dim
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

    # the tutorial's softmax over slots is NaN for an empty profile; SPEC fixes that, so
    # the comparison uses non-empty profiles (the empty case is tested against SPEC elsewhere)
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
