"""The demo's explanation shows what ACF attends to (issue 18, item 1), read from the
files the demo writes: the explained users' component attention lies on the planted cells
of the profile items that explain the recommendation, the figure's legend names every
frame colour it draws, and its ground-truth count is the true one.

The demo runs here with its own training settings (DemoConfig: the tutorial's lr 1e-3 and
weight decay 1e-5, the embeddings at 1e-2, batch 128, selection by AUC) on smaller
features and fewer triplets, so each seed takes seconds. Beta's end state varies from
seed to seed (tests/pipeline/test_pipeline_learning.py explains why), so the bar is on the
median over seeds and explained users, with a wide margin below what was measured.
"""

import json
import statistics
from pathlib import Path

import pytest

from acf_fast.pipeline.demo import DemoConfig, run_demo

SEEDS = (0, 1, 2)
# beta's alpha-weighted share on the planted cells over the share a uniform beta puts there
# (1 = no preference). Measured in this configuration (seeds 0-2, two users each, one
# Intel CPU): 2.04, 1.49, 1.08, 1.64, 1.09, 1.90, median 1.57. The demo's earlier settings
# (lr 3e-2 for every parameter) gave 5.71, 0.00, 0.02, 0.01, 15.6, 7.00: one-hot beta, half
# of it on a cell with nothing planted. So the floor catches attention that points away
# from the planted cells (below half the uniform share), and the median one a beta that
# is merely flat.
FLOOR = 0.5
MEDIAN_BAR = 1.25


@pytest.fixture(scope="module")
def demos(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("demo_explain")
    out = []
    for seed in SEEDS:
        result = run_demo(DemoConfig(out=str(root / f"demo{seed}"), n_train=20_000, epochs=3, model_dim=32,
                                     seed=seed, progress=False, threads=1, synth={"feature_dim": 32}))
        out.append(result)
    return out


def test_explained_beta_lies_on_the_planted_cells(demos):
    ratios = [e["ratio"] for d in demos for e in d["explained"]]
    print("\n  explained users' beta on planted / uniform:", [f"{r:.2f}" for r in ratios],
          "planted_attention_ratio:", [f"{d['planted_attention_ratio']:.2f}" for d in demos],
          "AUC:", [f"{d['metrics']['tutorial']['AUC']:.3f}" for d in demos])
    assert len(ratios) == 2 * len(SEEDS)
    assert min(ratios) >= FLOOR, ratios
    assert statistics.median(ratios) >= MEDIAN_BAR, ratios


def test_figure_legend_and_ground_truth_count(demos):
    for d in demos:
        for e in d["explained"]:
            exp = json.loads(Path(e["figure"]).with_suffix(".json").read_text())
            fig = exp["figure"]
            assert set(fig["frame_colors"]) <= {x["color"] for x in fig["legend"]}
            n, shown = len(exp["held_out"]), fig["ground_truth_shown"]
            assert f"n={n}" in fig["titles"]["truth"] and 1 <= shown <= n
            assert (shown < n) == (f"showing {shown} of {n}" in fig["titles"]["truth"])
