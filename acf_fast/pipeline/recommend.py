"""`recommend`: top-k items for given users (or all), in blocks of users.

Each user's profile is their most recent training items (what the model saw in
training); what they consumed (training and held-out items) is excluded unless
asked otherwise. Ids in the output are the files' 0-based item ids.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from ..data.history import UserHistory
from ..data.prepared import PreparedDataset
from ..model.acf import load_model
from ..utils.outputs import atomic_write, check_output_file

SUFFIXES = (".json", ".csv")


def parse_users(spec) -> list[int] | None:
    """'3,5,9' / [3, 5, 9] / None (all users) -> list of ints, with a clear error on junk."""
    if spec is None or spec == "all":
        return None
    if isinstance(spec, str):
        spec = [s for s in spec.replace(" ", ",").split(",") if s]
    out = []
    for s in spec:
        try:
            out.append(int(s))
        except (TypeError, ValueError):
            raise ValueError(f"user id {s!r} is not an integer") from None
    if not out:
        raise ValueError(f"users {spec!r} names no user id: give comma-separated ids or 'all'")
    return out


@torch.no_grad()
def top_k(model, history: UserHistory, users: np.ndarray, k: int, exclude_consumed: bool = True,
          max_profile_size: int = 9, block_users: int = 1024):
    """(item ids [U, k] 1-based, scores [U, k]) for `users`, blocked over users."""
    if not 0 < k <= model.num_items:
        raise ValueError(f"k must be in [1, {model.num_items}], got {k}")
    device = model.item_model.weight.device
    ids, scores = [], []
    for s in range(0, users.size, block_users):
        blk = users[s:s + block_users]
        prof = torch.from_numpy(history.last_profiles(blk, max_profile_size)).to(device)
        excl = torch.from_numpy(history.padded(blk, "consumed")).to(device) if exclude_consumed else None
        sc, it = model.recommend_batch(torch.from_numpy(blk).to(device), prof, k=k, exclude=excl)
        ids.append(it.cpu().numpy()), scores.append(sc.cpu().numpy())
    return np.concatenate(ids), np.concatenate(scores)


def recommend(checkpoint, data_dir, users=None, k: int = 10, exclude_consumed: bool = True,
              out=None, features=None, backend: str = "auto", device: str = "cpu",
              check_dataset: bool = True, feature_dtype=None) -> dict:
    """Recommendations {user_id: [(item_id, score), ...]}; written to `out` (.json or .csv) if given.

    `out` is checked before any work; a checkpoint trained on another dataset is refused
    unless check_dataset=False. The features are read in the dtype the checkpoint was
    trained with, or `feature_dtype`."""
    if out is not None:
        check_output_file(out, "output file", SUFFIXES)
    data = PreparedDataset(data_dir)
    history = data.history()
    model = load_model(checkpoint, data.features(features), backend, device, data.n_users,
                       data.n_items, dataset=data, check_dataset=check_dataset,
                       feature_dtype=feature_dtype)
    wanted = parse_users(users)
    users_arr = (np.arange(history.n_users) if wanted is None else history.check_users(wanted))
    ids, scores = top_k(model, history, users_arr, k, exclude_consumed,
                        getattr(model, "max_profile_size", 9))
    recs = {int(u): [(int(i) - 1, float(s)) for i, s in zip(ids[r], scores[r]) if np.isfinite(s)]
            for r, u in enumerate(users_arr)}
    if out is not None:
        write_recommendations(recs, out, k, exclude_consumed)
    return recs


def write_recommendations(recs: dict, out, k: int, exclude_consumed: bool) -> Path:
    """`out` as CSV or JSON (by its suffix), written whole or not at all.

    CSV: user_id, rank, item_id, score, one row per recommendation; rank counts from 1 (rank 1
    = the best item). JSON: each user's item_ids best first. Item ids are 0-based, as in the
    input files."""
    out = check_output_file(out, "output file", SUFFIXES)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        with atomic_write(out, newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["user_id", "rank", "item_id", "score"])
            for u, items in recs.items():
                for rank, (item, score) in enumerate(items, start=1):   # 1 = the best
                    w.writerow([u, rank, item, f"{score:.6f}"])
    else:
        with atomic_write(out) as fh:
            fh.write(json.dumps({
                "k": k, "exclude_consumed": exclude_consumed, "item_ids": "0-based, as in the input files",
                "recommendations": [{"user_id": u, "item_ids": [i for i, _ in items],
                                     "scores": [s for _, s in items]} for u, items in recs.items()]},
                indent=1))
    return out
