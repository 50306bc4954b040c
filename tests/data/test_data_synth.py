"""The synthetic dataset: tutorial formats, Wikimedia-like shape, planted structure saved."""

import csv
import json

import numpy as np
import pytest
import torch

from acf_fast.data.formats import read_interactions
from acf_fast.data.synth import SynthConfig, load_planted, synth
from acf_fast.model.features import feature_names, load_feature_table


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, synth(out, n_users=300, n_items=300, feature_dim=16, progress=False,
                      formats=("h5", "npy"))


def test_files_in_tutorial_formats(data):
    out, s = data
    with open(s["interactions"]) as fh:
        assert next(csv.reader(fh)) == ["user_id", "item_id", "timestamp"]
    npy = np.load(s["features_npy"])                  # a plain array: no pickle
    assert npy.dtype == np.float32 and npy.shape == (300, 16, 7, 7)
    a, b = load_feature_table(s["features_npy"]), load_feature_table(s["features_h5"])
    assert torch.equal(a, b) and tuple(a.shape) == (301, 49, 16)
    for path in (s["features_h5"], s["features_npy"]):
        assert feature_names(path)[:2] == ["item_000000.png", "item_000001.png"]
    assert len(list((out / "images").glob("*.png"))) == 300
    assert json.loads((out / "synth.json").read_text())["config"]["feature_dim"] == 16


def test_activity_is_heavy_tailed_with_baskets(data):
    _, s = data
    inter = read_interactions(s["interactions"])
    per_user = np.bincount(inter.user)
    assert 10 <= np.median(per_user) <= 22                    # median near 16
    assert per_user.max() >= 8 * np.median(per_user)          # a few heavy users
    # baskets: several items of a user share one timestamp
    pairs = np.stack([inter.user, inter.timestamp], 1)
    _, counts = np.unique(pairs, axis=0, return_counts=True)
    assert counts.max() > 1 and (counts > 1).mean() > 0.2


def test_planted_structure(data):
    _, s = data
    p = load_planted(s["planted"])
    cells = p["planted_cells"]
    assert cells.shape == (300, 49) and cells.dtype == bool
    per_item = cells.sum(1)
    assert per_item.min() >= 2 and per_item.max() <= 9        # 1-3 concepts x 2-3 cells
    n_concepts = (p["item_concepts"] >= 0).sum(1)
    assert set(np.unique(n_concepts)) <= {1, 2, 3}
    feats = load_feature_table(s["features_h5"])[1:]          # [N, 49, F]
    norms = feats.norm(dim=-1).numpy()
    assert norms[cells].mean() > 2 * norms[~cells].mean()     # concept cells stand out


def test_users_follow_their_taste(data):
    _, s = data
    p = load_planted(s["planted"])
    inter = read_interactions(s["interactions"])
    liked = np.array([np.isin(p["item_concepts"][i], p["user_concepts"][u]).any()
                      for u, i in zip(inter.user, inter.item)])
    assert liked.mean() > 0.6                                 # most picks show a liked concept


def test_same_seed_same_data(tmp_path):
    a = synth(tmp_path / "a", n_users=20, n_items=30, feature_dim=4, images=False, progress=False)
    b = synth(tmp_path / "b", n_users=20, n_items=30, feature_dim=4, images=False, progress=False)
    assert open(a["interactions"]).read() == open(b["interactions"]).read()
    assert SynthConfig().feature_dim == 64
