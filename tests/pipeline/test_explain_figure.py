"""The explanation figure's plan (issue 18, item 1): what it shows is checked on data, not on
pixels. Every frame colour drawn has a legend entry, the ground truth's count is the true
one and a row that cannot show every item says so, the profile is ordered by alpha, and
beta's share on the planted cells is computed on the right grid cells."""

import numpy as np
import pytest

from acf_fast.pipeline.explain_figure import (GRID, HIT, MISSED, PLANTED, figure_plan,
                                              draw_explanation, summary)

M = GRID * GRID


def explanation(n_held=13, hits=(5, 40), consumed=(7,), n_profile=9):
    """An explanation as user_explanation returns it (1-based ids)."""
    rng = np.random.default_rng(0)
    profile = list(range(100, 100 + n_profile))
    alpha = rng.dirichlet(np.ones(n_profile)).tolist()
    beta = rng.dirichlet(np.ones(M), size=n_profile).tolist()
    held = sorted(set(hits) | set(range(50, 50 + n_held - len(hits))))
    top = list(hits) + list(consumed) + [200 + i for i in range(10 - len(hits) - len(consumed))]
    return {"user": 3, "profile": profile, "alpha": alpha, "beta": beta, "top_k": top,
            "scores": list(np.linspace(3, 2, 10)), "held_out": held,
            "hits": [i for i in top if i in held], "consumed_in_top_k": list(consumed)}


def drawn_colors(plan):
    return {cell["color"] for row in plan["rows"].values() for cell in row}


@pytest.mark.parametrize("hits,consumed", [((5, 40), (7,)), ((), ()), ((5,), ())])
def test_legend_names_every_frame_colour(hits, consumed):
    exp = explanation(hits=hits, consumed=consumed)
    for planted in (None, np.ones((300, M), bool)):
        plan = figure_plan(exp, planted)
        legend = {c for c, _ in plan["legend"]}
        assert drawn_colors(plan) <= legend
        assert (PLANTED in legend) == (planted is not None)
        # and no legend entry for a colour that is not drawn
        assert legend - drawn_colors(plan) <= {PLANTED}
    assert (HIT in drawn_colors(plan)) == bool(hits)


def test_ground_truth_count_is_the_true_one_and_a_cut_is_said():
    exp = explanation(n_held=13)
    n = len(exp["held_out"])
    plan = figure_plan(exp)
    shown = plan["rows"]["truth"]
    assert len(shown) == 10 and f"n={n}" in plan["titles"]["truth"]
    assert f"showing 10 of {n}" in plan["titles"]["truth"]
    # hits come first, so the ground truth row shows what the recommendation found
    assert [c["item"] for c in shown[:len(exp["hits"])]] == sorted(exp["hits"])
    assert [c["color"] for c in shown[:2]] == [HIT, HIT] and shown[2]["color"] == MISSED
    few = figure_plan(explanation(n_held=4, hits=()))
    assert len(few["rows"]["truth"]) == 4 and "showing" not in few["titles"]["truth"]
    assert "n=4" in few["titles"]["truth"]


def test_profile_is_ordered_by_alpha_and_beta_share_uses_the_planted_cells():
    exp = explanation()
    planted = np.zeros((300, M), bool)
    item = exp["profile"][2]
    planted[item - 1, [3, 10]] = True              # row 0 col 3 and row 1 col 3
    plan = figure_plan(exp, planted)
    alphas = [exp["alpha"][c["slot"]] for c in plan["rows"]["profile"]]
    assert alphas == sorted(alphas, reverse=True)
    beta = np.asarray(exp["beta"][2])
    assert plan["beta_on_planted"][2] == pytest.approx(beta[3] + beta[10])
    assert plan["beta_on_planted"][0] is None      # nothing planted there: no share claimed
    lo, hi = plan["beta_range"]
    assert lo == 0 and hi >= np.max(exp["beta"])


def test_figure_is_written_with_its_summary(tmp_path):
    pytest.importorskip("matplotlib")
    exp = explanation()
    planted = np.zeros((300, M), bool)
    planted[99, :3] = True
    path, facts = draw_explanation(exp, tmp_path / "e.png", planted=planted)
    assert path.stat().st_size > 5000
    assert facts == summary(figure_plan(exp, planted))
    assert set(facts["frame_colors"]) <= {e["color"] for e in facts["legend"]}
    assert facts["ground_truth_shown"] == 10
