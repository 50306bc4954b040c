"""`evaluate`: full-catalogue ranking of every evaluation group, in blocks of users.

Each block of groups gets its user vectors in one batched call, its scores against
the whole catalogue as one [B, N] matrix, and its ranks by sorting that matrix once
per protocol; B is chosen from a memory budget, so peak memory does not depend
on the number of users. Protocols (docs/metrics.md#tutorial-protocol, #standard-protocol):
- tutorial: a target's 0-based rank among all N items, less the profile items
  ranked above it; AUC over N; nDCG's ideal DCG over the number of hits.
- standard: every training item of the user removed from the candidates; AUC over
  the remaining items; ideal DCG over min(n, k).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from .. import distributed
from ..data.formats import EvaluationGroups, profiles_to_matrix
from ..data.history import UserHistory
from ..data.prepared import PreparedDataset
from ..model.acf import ACF, load_model
from ..model.checkpoint import choose_feature_dtype, read_checkpoint
from ..model.scoring import catalogue_columns, rank_targets
from ..utils.outputs import check_output_folder
from ..utils.progress import bar as tqdm
from .metrics import (IDEAL_HITS, IDEAL_MIN_N_K, KS, PROTOCOLS_NOTE, REPORTED, format_table,
                      mean_metrics, metric_names, ranking_metrics)
from .report import write_report

PROTOCOLS = {"tutorial": IDEAL_HITS, "standard": IDEAL_MIN_N_K}
HISTORY_BINS = (1, 3, 6, 11, 21, 51, 101)   # bin edges on the number of training items


def catalogue_scores(model: ACF, users: torch.Tensor, profiles: torch.Tensor) -> torch.Tensor:
    """[B, N] scores of every catalogue item (column c = model.all_items[c]) in one batched call."""
    return model.recommend_batch(users, profiles)


def _block_size(n_items: int, memory_mb: float) -> int:
    # a few [B, N] float32 matrices live at once (scores, a masked copy, its sort)
    return max(1, int(memory_mb * 2**20 // (n_items * 4 * 4)))


def _padded_targets(groups: EvaluationGroups, idx: np.ndarray) -> np.ndarray:
    lengths = groups.n_targets[idx]
    out = np.zeros((idx.size, max(int(lengths.max()), 1)), dtype=np.int64)
    for row, g in enumerate(idx):       # ragged copy of a block; the work per group is O(n)
        out[row, :lengths[row]] = groups.targets(g)
    return out


def model_profiles(profile: np.ndarray, width: int) -> np.ndarray:
    """The most recent `width` items of left-aligned, 0-padded profiles (what the model sees)."""
    lengths = (profile > 0).sum(1)
    flat = profile[profile > 0]
    return profiles_to_matrix(flat, lengths, width)


def evaluate_groups(model: ACF, groups: EvaluationGroups, history: UserHistory | None = None,
                    ks=KS, protocols=("tutorial", "standard"), max_profile_size: int = 9,
                    memory_mb: float = 256, device=None, progress: bool = True) -> dict:
    """Per-group metrics {protocol: {metric: [G]}} plus per-group sizes."""
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"unknown protocol {p!r}; expected one of {list(PROTOCOLS)}")
    if "standard" in protocols and history is None:
        raise ValueError("the standard protocol needs the users' training history (history.npz)")
    device = torch.device(device) if device else model.item_model.weight.device
    n_items = model.all_items.numel()
    if not memory_mb > 0:
        raise ValueError(f"memory_mb must be positive, got {memory_mb}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cutoffs, got {list(ks)}")
    if max(ks) >= n_items and progress and distributed.is_main():
        print(f"note: cutoffs {[k for k in ks if k >= n_items]} reach the whole catalogue "
              f"({n_items} items): metrics there rank every item", file=sys.stderr)
    bad_users = groups.user[groups.user >= model.num_users]
    if bad_users.size:
        raise ValueError(f"evaluation names unknown user id {int(bad_users[0])}; "
                         f"the model has users 0..{model.num_users - 1}")
    block = _block_size(n_items, memory_mb)
    per = {p: [] for p in protocols}
    history_len = []
    model.eval()
    # under torchrun each rank takes whole blocks (the same shapes one process computes) and
    # the per-group rows are gathered back into order: metrics equal one process's bit for bit
    blocks = distributed.shard_blocks(len(groups), block)
    bar = tqdm(total=sum(e - s for s, e in blocks), desc="evaluating", unit="user",
               disable=not progress or not distributed.is_main())
    for s, e in blocks:
        idx = np.arange(s, e)
        users = torch.from_numpy(groups.user[idx]).to(device)
        prof_full = torch.from_numpy(groups.profile[idx]).to(device)
        prof_in = torch.from_numpy(model_profiles(groups.profile[idx], max_profile_size)).to(device)
        targets = torch.from_numpy(_padded_targets(groups, idx)).to(device)
        n_t = (targets > 0).sum(1).cpu().numpy()
        with torch.no_grad():
            scores = catalogue_scores(model, users, prof_in)
        if history is not None:
            train_items = history.padded(groups.user[idx], "train")
            history_len.append((train_items > 0).sum(1))
        for p in protocols:
            if p == "tutorial":
                ranks = rank_targets(scores, model.all_items, targets, exclude=prof_full)
                n_cand = n_items
            else:
                excl = torch.from_numpy(train_items).to(device)
                ranks = rank_targets(scores, model.all_items, targets, exclude=excl)
                n_cand = n_items - (catalogue_columns(model.all_items, excl) >= 0).sum(1).cpu().numpy()
            per[p].append(ranking_metrics(ranks.cpu().numpy(), n_t, n_cand, ks, PROTOCOLS[p]))
        bar.update(idx.size)
    bar.close()
    positions = np.concatenate([np.arange(s, e) for s, e in blocks] or [np.zeros(0, np.int64)])
    gather = lambda rows: distributed.gather_rows(rows, positions, len(groups))
    out = {p: gather({k: np.concatenate([b[k] for b in per[p]]) for k in (per[p][0] if per[p] else ())})
           for p in protocols}
    sizes = {"n_targets": groups.n_targets, "profile_size": groups.profile_size}
    if history is not None:
        sizes["history_size"] = gather({"h": np.concatenate(history_len or [np.zeros(0, np.int64)])})["h"]
    return {"per_group": out, "sizes": sizes}


def by_size(per_group: dict[str, np.ndarray], sizes: np.ndarray, edges=HISTORY_BINS) -> list[dict]:
    """Mean of each metric per size bin [edges[i], edges[i+1]) (the last bin is open).

    Every bin is listed, an empty one with groups 0 and None for each metric, so a reader
    (and the figure's axis) sees that no group has that size instead of a missing bin."""
    rows = []
    bounds = list(edges) + [np.inf]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        sel = (sizes >= lo) & (sizes < hi)
        label = f"{lo}+" if hi == np.inf else (f"{lo}" if hi - lo == 1 else f"{lo}-{int(hi) - 1}")
        row = {"bin": label, "groups": int(sel.sum())}
        row.update({k: float(v[sel].mean()) if sel.any() else None for k, v in per_group.items()})
        rows.append(row)
    return rows


def evaluate(checkpoint, data_dir, out_dir=None, features=None, ks=KS,
             protocols=("tutorial", "standard"), max_profile_size: int | None = None,
             memory_mb: float = 256, backend: str = "auto", device: str = "cpu",
             plot: bool = True, progress: bool = True, print_table: bool = True,
             check_dataset: bool = True, feature_dtype=None) -> dict:
    """Evaluate a checkpoint on `naive-user-evaluation.csv`; write metrics.json/.csv and a PNG.

    A checkpoint trained on another dataset (its recorded fingerprint) is refused unless
    check_dataset=False; `out_dir` is checked (a writable folder) before any work. The
    features are read in the dtype the checkpoint was trained with, or `feature_dtype`."""
    data = PreparedDataset(data_dir)
    if out_dir is not None and distributed.is_main():
        check_output_folder(out_dir, "--out folder", keep=False)
    ctx = distributed.init_distributed(device)
    device = ctx.device                                       # cuda:LOCAL_RANK under torchrun
    if ctx.is_distributed:    # the cache, in the model's dtype, built once and then mapped
        dtype = choose_feature_dtype(read_checkpoint(checkpoint), feature_dtype, checkpoint)
        distributed.prepare_feature_cache(data.features(features), dtype)
    model = load_model(checkpoint, data.features(features), backend, device, data.n_users,
                       data.n_items, dataset=data, check_dataset=check_dataset,
                       feature_dtype=feature_dtype)
    groups = data.evaluation()
    history = data.history() if "standard" in protocols else None
    if max_profile_size is None:
        max_profile_size = getattr(model, "max_profile_size", 9)
    res = evaluate_groups(model, groups, history, ks, protocols, max_profile_size, memory_mb,
                          device, progress)
    summary = {p: mean_metrics(res["per_group"][p]) for p in protocols}
    report = {
        "checkpoint": str(checkpoint), "data_dir": str(data_dir), "n_groups": len(groups),
        "n_items": data.n_items, "ks": list(ks), "metrics": summary,
        "by_history_size": ({p: by_size(res["per_group"][p], res["sizes"]["history_size"])
                             for p in protocols} if "history_size" in res["sizes"] else {}),
        "by_profile_size": {p: by_size(res["per_group"][p], res["sizes"]["profile_size"],
                                       edges=tuple(range(1, 11))) for p in protocols},
    }
    names = [n for n in REPORTED if all(n in summary[p] for p in protocols)]
    extra = [n for n in metric_names(ks) if n not in names]
    report["table"] = format_table({f"ACF ({p})": summary[p] for p in protocols}, names)
    if extra:
        report["table_extra"] = format_table({f"ACF ({p})": summary[p] for p in protocols}, extra)
    report["protocols_note"] = PROTOCOLS_NOTE
    if print_table and distributed.is_main():
        print(report["table"])
        if extra:
            print(report["table_extra"])
        print(PROTOCOLS_NOTE)
    if out_dir is not None and distributed.is_main():
        write_report(report, Path(out_dir), plot)
    distributed.barrier()        # the report exists before any rank returns
    return report
