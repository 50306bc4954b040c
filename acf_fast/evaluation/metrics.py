"""Ranking metrics of the VisRec tutorial (docs/metrics.md#definitions), for one group or thousands at once.

A *group* is one user's evaluation case: n ground-truth items with 0-based ranks
r_1 < ... < r_n among N candidates. Definitions (tutorial protocol):

    AUC      = sum_i [(N - r_i - 1) - (n - i)] / (N - n) / n        (i = 1..n)
    RR       = 1 / (r_1 + 1)
    P@k      = hits@k / k,   R@k = hits@k / n
    nDCG@k   = sum_{r_i < k} 1 / log2(r_i + 2)  /  IDCG
    IDCG     = sum_{j < h} 1 / log2(j + 2) with h = hits@k            ("hits", the tutorial's quirk)
             or h = min(n, k)                                       ("standard")

With the tutorial's IDCG a group with one hit at rank r scores 1/log2(r+2)
whatever n is, so missing the other targets costs nothing; the standard IDCG
divides by the best DCG achievable with n targets, and both are reported.
"""

from __future__ import annotations

import numpy as np

KS = (20, 100, 200)
REPORTED = ("AUC", "RR", "R@20", "P@20", "nDCG@20", "R@100", "P@100", "nDCG@100")
IDEAL_HITS = "hits"          # tutorial
IDEAL_MIN_N_K = "min_n_k"    # standard


def metric_names(ks=KS) -> list[str]:
    names = ["AUC", "RR"]
    for k in ks:
        names += [f"R@{k}", f"P@{k}", f"nDCG@{k}"]
    return names


def _discount_cumsum(upto: int) -> np.ndarray:
    """c[h] = sum_{j < h} 1 / log2(j + 2), for h = 0..upto."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(upto) + 2.0))])


def ranking_metrics(ranks: np.ndarray, n_targets: np.ndarray, n_candidates, ks=KS,
                    ideal: str = IDEAL_HITS) -> dict[str, np.ndarray]:
    """Per-group metrics from padded ranks.

    ranks [G, L]: 0-based ranks, any order, padded with -1 where a group has fewer
    than L targets; n_targets [G] (the number of valid entries per row);
    n_candidates: N, a scalar or [G] (the number of items a target competes with,
    itself included). Returns {name: [G] float64}.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be [groups, targets], got shape {ranks.shape}")
    n = np.asarray(n_targets, dtype=np.float64)
    if n.shape != (ranks.shape[0],):
        raise ValueError(f"n_targets must have shape ({ranks.shape[0]},), got {n.shape}")
    if np.any(n < 1):
        raise ValueError("every group needs at least one ground-truth item")
    if ideal not in (IDEAL_HITS, IDEAL_MIN_N_K):
        raise ValueError(f"ideal must be {IDEAL_HITS!r} or {IDEAL_MIN_N_K!r}, got {ideal!r}")
    big = np.inf
    r = np.sort(np.where(ranks < 0, big, ranks), axis=1)          # valid ranks first, ascending
    valid = np.isfinite(r)
    if not np.array_equal(valid.sum(1), n.astype(np.int64)):
        raise ValueError("n_targets disagrees with the number of non-negative ranks per row")
    N = np.broadcast_to(np.asarray(n_candidates, dtype=np.float64), n.shape)
    if np.any(N <= n):
        raise ValueError("n_candidates must exceed the number of targets in every group")
    i = np.arange(1, r.shape[1] + 1, dtype=np.float64)[None, :]
    r0 = np.where(valid, r, 0.0)
    auc_terms = np.where(valid, (N[:, None] - r0 - 1) - (n[:, None] - i), 0.0)
    out = {"AUC": auc_terms.sum(1) / (N - n) / n, "RR": 1.0 / (r[:, 0] + 1.0)}
    gains = np.where(valid, 1.0 / np.log2(r0 + 2.0), 0.0)
    for k in ks:
        hit = valid & (r < k)
        hits = hit.sum(1)
        disc = _discount_cumsum(int(max(k, r.shape[1])))
        h = hits if ideal == IDEAL_HITS else np.minimum(n.astype(np.int64), k)
        idcg = disc[h]
        dcg = np.where(hit, gains, 0.0).sum(1)
        out[f"R@{k}"] = hits / n
        out[f"P@{k}"] = hits / float(k)
        out[f"nDCG@{k}"] = np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)
    return out


def group_metrics(ranks, n_candidates: int, ks=KS, ideal: str = IDEAL_HITS) -> dict[str, float]:
    """The metrics of one group from its targets' 0-based ranks (a list)."""
    ranks = np.asarray(ranks, dtype=np.float64).reshape(1, -1)
    res = ranking_metrics(ranks, np.array([ranks.shape[1]]), n_candidates, ks, ideal)
    return {k: float(v[0]) for k, v in res.items()}


def mean_metrics(per_group: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.mean(v)) if len(v) else float("nan") for k, v in per_group.items()}


PROTOCOLS_NOTE = ("protocols: the held-out baskets of naive-user-evaluation.csv ranked against the "
                  "catalogue; tutorial: the profile items shown to the model are excluded (ranked "
                  "above); standard: every training item is excluded. The training log's val_auc "
                  "(val_auc_triplets) is a different quantity: validation triplets, one positive "
                  "ranked against the whole catalogue, profile excluded.")


def format_table(rows: dict[str, dict[str, float]], names=REPORTED) -> str:
    """The tutorial README's table: a header of metric names, one line of 5-decimal values per row."""
    label_w = max([len(r) for r in rows] + [8])
    head = " " * label_w + "\t" + "\t".join(names)
    lines = [head]
    for label, values in rows.items():
        lines.append(label.ljust(label_w) + "\t" + "\t".join(f"{values[n]:.5f}" for n in names))
    return "\n".join(lines)
