"""The by-history / by-profile-size breakdowns and their figures (issue 18, item 2): every
size bin is listed and drawn with its number of groups, and bins too small for a trend are
not joined into one. Checked on the data the figure is drawn from, not on pixels."""

import math

import numpy as np
import pytest

from acf_fast.evaluation.evaluate import by_size
from acf_fast.evaluation.plots import MIN_TREND_GROUPS, plot_metrics_by_size, size_series

PROFILE_EDGES = tuple(range(1, 11))      # the edges evaluate() uses for profile sizes


def profile_rows():
    # sizes 1..10 except 8 (as in the demo's data), size 9 held by only 2 groups
    sizes = np.array([1] * 12 + [2] * 11 + [3] * 3 + [4] * 15 + [5] * 10 + [6] * 10 + [7] * 1
                     + [9] * 2 + [10] * 40)
    auc = np.linspace(0.5, 1.0, sizes.size)
    return sizes, auc, by_size({"AUC": auc}, sizes, edges=PROFILE_EDGES)


def test_every_profile_size_has_a_bin_with_its_count():
    sizes, auc, rows = profile_rows()
    assert [r["bin"] for r in rows] == [str(i) for i in range(1, 10)] + ["10+"]
    assert [r["groups"] for r in rows] == [int((sizes == i).sum()) for i in range(1, 10)] + [40]
    empty = rows[7]
    assert empty["bin"] == "8" and empty["groups"] == 0 and empty["AUC"] is None
    assert rows[0]["AUC"] == pytest.approx(auc[sizes == 1].mean())


def test_series_labels_counts_and_breaks_the_trend_at_small_bins():
    _, _, rows = profile_rows()
    s = size_series(rows, "AUC")
    assert s["labels"][7] == "8\nn=0" and s["labels"][8] == "9\nn=2" and s["labels"][-1] == "10+\nn=40"
    for n, trend, sparse, row in zip(s["counts"], s["trend"], s["sparse"], rows):
        if n >= MIN_TREND_GROUPS:          # on the line, not a lone marker
            assert trend == pytest.approx(row["AUC"]) and math.isnan(sparse)
        elif n > 0:                        # a lone hollow marker, never on the line
            assert math.isnan(trend) and sparse == pytest.approx(row["AUC"])
        else:                              # nothing drawn, the tick still says n=0
            assert math.isnan(trend) and math.isnan(sparse)
    # sizes 3, 7 and 9 hold 3, 1 and 2 groups: none of them may join a line
    assert [i for i, v in enumerate(s["trend"]) if math.isnan(v)] == [2, 6, 7, 8]


def test_history_bins_keep_their_place_when_empty():
    sizes = np.array([1, 2, 15, 15, 400])
    rows = by_size({"RR": np.ones(5)}, sizes)
    assert [r["bin"] for r in rows] == ["1-2", "3-5", "6-10", "11-20", "21-50", "51-100", "101+"]
    assert [r["groups"] for r in rows] == [2, 0, 0, 2, 0, 0, 1]


def test_figure_draws_empty_and_small_bins(tmp_path):
    pytest.importorskip("matplotlib")
    _, _, rows = profile_rows()
    path = plot_metrics_by_size({"tutorial": rows, "standard": rows}, tmp_path / "p.png", "profile size")
    assert path.stat().st_size > 1000
