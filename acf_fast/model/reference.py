"""Pure-PyTorch reference ACF: the tutorial's modules, batched, with the fixes
docs/model.md#departures-from-the-tutorial-and-the-paper lists.

This is the ground truth every fused backend is tested against, and the path for
GPUs Triton does not support. It follows the VisRec tutorial's computation order
on purpose (gather every [B, P, M, F] feature, reduce, attend) so that it is also
the baseline the benchmarks measure against.

Deviations from the tutorial code (docs/model.md#departures-from-the-tutorial-and-the-paper):
- an empty profile gives alpha = 0 with a finite softmax (the tutorial's models/acf.py
  gets 0 by replacing the softmax's NaN; the version in its slides returns NaN);
- attentions are returned as [B, P] and [B, P, M], zero on padded slots.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def kaiming_(layer: nn.Linear) -> None:
    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over `dim` restricted to `mask`; rows with no valid entry give all zeros.

    Rows that are entirely masked are given finite logits before the softmax so that
    neither the output nor its gradient can become NaN.
    """
    mask = mask.bool()
    filled = logits.masked_fill(~mask, float("-inf"))
    has_any = mask.any(dim=dim, keepdim=True)
    safe = torch.where(has_any, filled, torch.zeros_like(logits))
    return torch.softmax(safe, dim=dim) * mask.to(logits.dtype)


class ACFFeatureNet(nn.Module):
    """Component-level attention (tutorial: models/acf.py, ACFFeatureNet)."""

    def __init__(self, emb_dim, input_feature_dim, feature_dim, hidden_dim=None, output_dim=None):
        super().__init__()
        hidden_dim = hidden_dim or emb_dim
        self.dim_reductor = nn.Linear(input_feature_dim, feature_dim)
        self.w_x = nn.Linear(feature_dim, hidden_dim)
        self.w_u = nn.Linear(emb_dim, hidden_dim)
        self.w = nn.Linear(hidden_dim, 1)
        kaiming_(self.w_x)
        kaiming_(self.w_u)
        kaiming_(self.w)

    def forward(self, user, components, profile_mask, return_attentions=False):
        """user [B, D] raw embedding, components [B, P, M, F], profile_mask [B, P]."""
        x = self.dim_reductor(components)  # B, P, M, D
        x = x.movedim(0, -2)  # P, M, B, D
        x_tilde = self.w_x(x)
        user = self.w_u(user)
        beta = F.relu(x_tilde + user)
        beta = self.w(beta)  # P, M, B, 1
        beta = F.softmax(beta, dim=1)
        x = (beta * x).sum(dim=1)  # P, B, D
        x = x.movedim(-2, 0)  # B, P, D
        x = profile_mask.to(x.dtype).unsqueeze(-1) * x
        output = {"pooled_features": x}
        if return_attentions:
            output["attentions"] = beta.squeeze(-1).permute(2, 0, 1)  # B, P, M
        return output


class ACFUserNet(nn.Module):
    """Item-level attention and the user vector (tutorial: ACFUserNet)."""

    def __init__(self, num_users, num_items, emb_dim=128, input_feature_dim=0,
                 profile_embedding=None, pad_token=0):
        super().__init__()
        self.pad_token = pad_token
        self.emb_dim = emb_dim
        self.feats = (ACFFeatureNet(emb_dim, input_feature_dim, emb_dim)
                      if input_feature_dim > 0 else None)
        self.user_embedding = nn.Embedding(num_users, emb_dim)
        if profile_embedding is None:
            profile_embedding = nn.Embedding(num_items, emb_dim, padding_idx=pad_token)
        self.profile_embedding = profile_embedding
        self.w_u = nn.Linear(emb_dim, emb_dim)
        self.w_v = nn.Linear(emb_dim, emb_dim)  # never used; kept so checkpoints load
        self.w_p = nn.Linear(emb_dim, emb_dim)
        self.w_x = nn.Linear(emb_dim, emb_dim)
        self.w = nn.Linear(emb_dim, 1)
        for layer in (self.w_u, self.w_v, self.w_p, self.w_x, self.w):
            kaiming_(layer)

    def forward(self, user_ids, profile_ids, features, profile_mask, return_attentions=False):
        """features [B, P, M, F] already gathered; returns {'user': [B, D], ...}."""
        user = self.user_embedding(user_ids)
        profile = self.profile_embedding(profile_ids)
        feat_output = self.feats(user, features, profile_mask, return_attentions)
        components = feat_output["pooled_features"]
        user = self.w_u(user)
        logits = self.w(F.relu(user.unsqueeze(1) + self.w_p(profile) + self.w_x(components)))
        alpha = masked_softmax(logits.squeeze(-1), profile_mask, dim=1)  # B, P
        user = user + (alpha.unsqueeze(-1) * profile).sum(dim=1)
        output = {"user": user}
        if return_attentions:
            output["profile_attentions"] = alpha
            # padded slots attend to the zero row; report them as zero attention
            output["component_attentions"] = (feat_output["attentions"]
                                              * profile_mask.to(alpha.dtype).unsqueeze(-1))
        return output


def gather_features(table: torch.Tensor, profile_ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The tutorial's per-batch gather: [B, P] ids -> [B, P, M, F] in `like`'s dtype and
    on its device (a host-resident table is gathered on the host, then copied over)."""
    gathered = table[profile_ids.to(table.device)]
    return gathered.to(device=like.device, dtype=like.dtype)


def user_vectors(model, user_ids, profile_ids, profile_mask, return_attentions=False):
    features = gather_features(model.feature_table, profile_ids,
                               model.user_model.user_embedding.weight)
    out = model.user_model(user_ids, profile_ids, features, profile_mask, return_attentions)
    if return_attentions:
        return out["user"], out["profile_attentions"], out["component_attentions"]
    return out["user"], None, None


def score(user: torch.Tensor, items: torch.Tensor, model_dim: int) -> torch.Tensor:
    return (user * items).sum(-1) / model_dim


def pair_scores(model, user_ids, profile_ids, pos, neg, profile_mask):
    user, _, _ = user_vectors(model, user_ids, profile_ids, profile_mask)
    d = model.model_dim
    return score(user, model.item_model(pos), d), score(user, model.item_model(neg), d)
