"""`explain`: one user's recommendation and attentions as a PNG, like the tutorial's notebook,
and the numbers drawn as JSON. The figure is `explain_figure`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..data.history import UserHistory
from ..data.prepared import PreparedDataset
from ..model.acf import load_model
from ..model.features import feature_names
from ..utils.outputs import check_output_file, write_text_atomic
from .explain_figure import draw_explanation


@torch.no_grad()
def user_explanation(model, history: UserHistory, user: int, k: int = 10,
                     exclude: str = "profile", max_profile_size: int = 9) -> dict:
    """alpha, beta and top-k for one user (item ids 1-based, the model's; `explain` writes
    and returns them 0-based, as in the input files).

    exclude: "profile" (the items shown, as the tutorial protocol does), "train" (every
    training item) or "none"; older consumed items that remain are marked in the figure.
    """
    if exclude not in ("profile", "train", "none"):
        raise ValueError(f"exclude must be 'profile', 'train' or 'none', got {exclude!r}")
    users = history.check_users([user])
    device = model.item_model.weight.device
    prof = torch.from_numpy(history.last_profiles(users, max_profile_size)).to(device)
    excl = (prof if exclude == "profile" else None if exclude == "none"
            else torch.from_numpy(history.padded(users, "train")).to(device))
    u = torch.from_numpy(users).to(device)
    (scores, items), beta, alpha = model.recommend_batch(u, prof, return_attentions=True, k=k, exclude=excl)
    mask = prof[0] > 0
    found = torch.isfinite(scores[0])  # exclusions can leave fewer than k items
    scores, items = scores[:, found], items[:, found]
    train = set(history.train_of(user).tolist())
    held = sorted(set(history.consumed_of(user).tolist()) - train)
    m = beta.shape[-1]
    return {
        "user": int(user),
        "profile": prof[0][mask].tolist(),
        "alpha": alpha[0][mask].tolist(),
        "beta": beta[0][mask].reshape(-1, m).tolist(),
        "top_k": items[0].tolist(), "scores": scores[0].tolist(),
        "held_out": held,
        "hits": [int(i) for i in items[0].tolist() if i in set(held)],
        "consumed_in_top_k": [int(i) for i in items[0].tolist() if i in train],
    }


ITEM_KEYS = ("profile", "top_k", "held_out", "hits", "consumed_in_top_k")


def zero_based(exp: dict) -> dict:
    """`exp` with every item id 0-based (as in the input files and recommend's output)."""
    out = {k: ([int(i) - 1 for i in v] if k in ITEM_KEYS else v) for k, v in exp.items()}
    out["item_ids"] = "0-based, as in the input files"
    return out


def explain(checkpoint, data_dir, user: int, out, k: int = 10, images_dir=None, features=None,
            exclude: str = "profile", planted=None, backend: str = "auto",
            device: str = "cpu", check_dataset: bool = True, feature_dtype=None) -> dict:
    """Write `out` (PNG) and `out` with .json (the numbers drawn); returns that dict. Item
    ids there and in the figure are 0-based, as in the input files and `recommend`'s output.

    `out` is checked before any work; a checkpoint trained on another dataset is refused
    unless check_dataset=False. The features are read in the dtype the checkpoint was
    trained with, or `feature_dtype`."""
    check_output_file(out, "--out")
    data = PreparedDataset(data_dir)
    features = data.features(features)
    history = data.history()
    model = load_model(checkpoint, features, backend, device, data.n_users, data.n_items,
                       dataset=data, check_dataset=check_dataset, feature_dtype=feature_dtype)
    exp = user_explanation(model, history, int(user), k, exclude,
                           getattr(model, "max_profile_size", 9))
    names = None
    if images_dir is not None:
        if not Path(images_dir).is_dir():
            raise FileNotFoundError(f"image folder not found: {images_dir}")
        names = feature_names(features, model.feature_table.dtype)   # the cache just used
        if len(names) < data.n_items:     # a truncated name list would fail mid-figure
            raise ValueError(f"{features} lists {len(names)} image names for its {data.n_items} "
                             "items: the file is truncated or damaged; extract the features again "
                             "(acf-fast extract), or leave out --images")
    if planted is not None and not isinstance(planted, np.ndarray):
        from ..data.synth import load_planted

        planted = load_planted(planted)["planted_cells"]
    path, figure = draw_explanation(exp, out, images_dir, names, planted)   # labels 0-based ids itself
    exp = zero_based(exp)
    exp["figure"] = figure         # what the figure shows: legend, ground truth shown, beta on planted
    exp["png"] = str(path)
    write_text_atomic(Path(path).with_suffix(".json"), json.dumps(exp, indent=1))
    return exp
