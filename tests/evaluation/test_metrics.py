"""The tutorial's metric definitions (docs/metrics.md) on cases computed by hand, and both protocols."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from acf_fast.model.scoring import rank_targets
from acf_fast.evaluation.metrics import (IDEAL_HITS, IDEAL_MIN_N_K, format_table, group_metrics, mean_metrics,
                              ranking_metrics)

L2 = math.log2


def test_two_targets_by_hand():
    # N = 10 candidates, targets at ranks 0 and 3: the first beats all 8 non-targets,
    # the second beats 6 of them -> AUC = (8 + 6) / (8 * 2)
    m = group_metrics([3, 0], n_candidates=10, ks=(2, 5))
    assert m["AUC"] == pytest.approx(14 / 16)
    assert m["RR"] == pytest.approx(1.0)
    assert m["P@2"] == pytest.approx(0.5) and m["R@2"] == pytest.approx(0.5)
    assert m["nDCG@2"] == pytest.approx(1.0)                      # tutorial: ideal DCG of 1 hit
    assert m["P@5"] == pytest.approx(0.4) and m["R@5"] == pytest.approx(1.0)
    assert m["nDCG@5"] == pytest.approx((1 + 1 / L2(5)) / (1 + 1 / L2(3)))


def test_auc_formula_literal():
    ranks, N = [1, 4, 7], 20
    r = sorted(ranks)
    n = len(r)
    expected = sum((N - r[i] - 1) - (n - (i + 1)) for i in range(n)) / (N - n) / n
    assert group_metrics(ranks, N)["AUC"] == pytest.approx(expected)
    # and it is the fraction of (target, non-target) pairs ordered correctly
    non_targets_below = [sum(1 for q in range(N) if q > ri and q not in r) for ri in r]
    assert expected == pytest.approx(sum(non_targets_below) / ((N - n) * n))


def test_single_target_miss_and_hit():
    m = group_metrics([2], n_candidates=5, ks=(1, 3))
    assert m["AUC"] == pytest.approx(0.5)
    assert m["RR"] == pytest.approx(1 / 3)
    assert m["P@1"] == 0 and m["R@1"] == 0 and m["nDCG@1"] == 0
    assert m["P@3"] == pytest.approx(1 / 3) and m["R@3"] == 1
    assert m["nDCG@3"] == pytest.approx(1 / L2(4))


def test_ndcg_tutorial_quirk_vs_standard():
    # one hit of three targets within k: the tutorial divides by the ideal DCG of one hit
    tut = group_metrics([5, 50, 60], n_candidates=100, ks=(20,), ideal=IDEAL_HITS)
    std = group_metrics([5, 50, 60], n_candidates=100, ks=(20,), ideal=IDEAL_MIN_N_K)
    assert tut["nDCG@20"] == pytest.approx(1 / L2(7))
    assert std["nDCG@20"] == pytest.approx((1 / L2(7)) / (1 + 1 / L2(3) + 1 / L2(4)))
    for key in ("AUC", "RR", "P@20", "R@20"):
        assert tut[key] == std[key]
    # standard ideal uses min(n, k): with k = 2 < n = 3 only two ideal gains count
    std2 = group_metrics([0, 1, 60], n_candidates=100, ks=(2,), ideal=IDEAL_MIN_N_K)
    assert std2["nDCG@2"] == pytest.approx(1.0)


def test_batched_equals_per_group_and_padding():
    rng = np.random.default_rng(0)
    groups = [rng.choice(200, size=rng.integers(1, 6), replace=False) for _ in range(30)]
    width = max(len(g) for g in groups)
    padded = np.full((30, width), -1)
    for i, g in enumerate(groups):
        padded[i, :len(g)] = g
    n_cand = rng.integers(150, 250, size=30)
    for ideal in (IDEAL_HITS, IDEAL_MIN_N_K):
        batch = ranking_metrics(padded, [len(g) for g in groups], n_cand, ks=(5, 20), ideal=ideal)
        for i, g in enumerate(groups):
            one = group_metrics(g, int(n_cand[i]), ks=(5, 20), ideal=ideal)
            for k, v in one.items():
                assert batch[k][i] == pytest.approx(v)
    assert set(mean_metrics(batch)) == set(batch)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="at least one"):
        ranking_metrics(np.full((1, 2), -1), [0], 10)
    with pytest.raises(ValueError, match="n_candidates"):
        group_metrics([0, 1], n_candidates=2)
    with pytest.raises(ValueError, match="ideal"):
        group_metrics([0], 10, ideal="paper")


def test_table_format_like_tutorial_readme():
    row = {n: 0.5 for n in ("AUC", "RR", "R@20", "P@20", "nDCG@20", "R@100", "P@100", "nDCG@100")}
    text = format_table({"ACF": row})
    head, line = text.splitlines()
    assert head.split() == ["AUC", "RR", "R@20", "P@20", "nDCG@20", "R@100", "P@100", "nDCG@100"]
    assert line.split() == ["ACF"] + ["0.50000"] * 8


def _stub(n_items):
    return SimpleNamespace(all_items=torch.arange(1, n_items + 1))


def test_tutorial_protocol_discounts_only_profile_items_ranked_above():
    # 6 items, scores descending by id: item 1 best
    scores = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    targets = torch.tensor([[4, 6]])            # raw ranks 3 and 5
    profile = torch.tensor([[2, 5, 0]])         # item 2 above both targets, item 5 above target 6 only
    r = rank_targets(scores, _stub(6).all_items, targets, exclude=profile)
    assert r.tolist() == [[2, 3]]
    # an older consumed item (1) that is not in the profile still counts in the tutorial protocol
    # but is removed in the standard protocol, where every training item is excluded
    train = torch.tensor([[1, 2, 5]])
    r_std = rank_targets(scores, _stub(6).all_items, targets, exclude=train)
    assert r_std.tolist() == [[1, 2]]
    # AUC of the standard protocol is over the remaining 6 - 3 candidates
    m = ranking_metrics(r_std.numpy(), [2], 6 - 3, ks=(1,), ideal=IDEAL_MIN_N_K)
    assert m["AUC"][0] == pytest.approx(((3 - 1 - 1) - 1 + (3 - 2 - 1) - 0) / (3 - 2) / 2)


def test_rank_padding_and_unknown_target():
    scores = torch.tensor([[3.0, 2.0, 1.0]])
    r = rank_targets(scores, _stub(3).all_items, torch.tensor([[3, 0]]))
    assert r.tolist() == [[2, -1]]
    with pytest.raises(ValueError, match="9"):
        rank_targets(scores, _stub(3).all_items, torch.tensor([[9]]))
