"""Sampling where users have few distinct triplets, and the data functions' argument checks."""

import csv
import time

import numpy as np
import pytest

from acf_fast.data.formats import read_interactions
from acf_fast.data.sampling import prepare, sample_triplets, split_baskets
from acf_fast.data.synth import synth, write_features

N_ITEMS = 300


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Seven users on 300 items, from 3 to 298 interactions (baskets of two): from a few
    dozen distinct (pi, ni) pairs to about 20,000 (user 5); user 6 left two items unconsumed."""
    root = tmp_path_factory.mktemp("limits")
    feats = np.random.default_rng(0).random((N_ITEMS, 4, 7, 7), dtype=np.float32)
    _, h5 = write_features(root, [f"i{i}.png" for i in range(N_ITEMS)], feats)
    rng = np.random.default_rng(3)
    rows = []
    for u, k in enumerate([3, 5, 8, 14, 40, 120, N_ITEMS - 2]):
        items = rng.choice(N_ITEMS, size=k, replace=False)
        rows += [(u, int(i), 100 + 10 * (j // 2)) for j, i in enumerate(items)]  # baskets of 2
    inter = root / "inter.csv"
    with open(inter, "w", newline="") as fh:
        csv.writer(fh).writerows([("user_id", "item_id", "timestamp")] + rows)
    return inter, h5


def _capacity(split):
    n_train = np.diff(split.train_ptr)
    return n_train * np.maximum(split.n_items - np.diff(split.consumed_ptr), 0)


def _check(split, u, pos, neg, want):
    assert np.bincount(u, minlength=split.n_users).tolist() == want.tolist()
    assert (np.diff(u) >= 0).all()                                    # grouped by user
    assert (np.searchsorted(split.train_ptr, pos, side="right") - 1 == u).all()   # pi: own training item
    consumed = {(a, b) for a, b in zip(np.repeat(np.arange(split.n_users), np.diff(split.consumed_ptr)).tolist(),
                                       split.consumed_items.tolist())}
    assert not any((a, b) in consumed for a, b in zip(u.tolist(), neg.tolist()))  # ni never consumed
    assert ((neg >= 0) & (neg < split.n_items)).all()
    keys = set(zip(u.tolist(), split.train_items[pos].tolist(), neg.tolist()))
    assert len(keys) == u.size                                         # all distinct


@pytest.mark.parametrize("per_user", [1, 4, 40, 500, 5_000, 15_000, 100_000])
def test_quota_small_large_and_exhausted(raw, per_user):
    """Quotas well below, near and above a user's distinct triplets: each user gets
    min(quota, distinct triplets), all distinct and valid, quickly. Before, users whose quota
    was at or above their distinct triplets made the rejection sampler spin for MAX_ROUNDS
    rounds and fail, and quotas near them took thousands of rounds."""
    inter, _ = raw
    split = split_baskets(read_interactions(inter, n_items=N_ITEMS), N_ITEMS, holdout=3)
    cap = _capacity(split)
    assert cap.min() > 0 and 20_000 < cap.max() < 100_000
    t = time.perf_counter()
    u, pos, neg = sample_triplets(split, per_user, seed=0, progress=False)
    assert time.perf_counter() - t < 2.0
    _check(split, u, pos, neg, np.minimum(per_user, cap))
    again = sample_triplets(split, per_user, seed=0, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip((u, pos, neg), again))   # seeded
    other = sample_triplets(split, per_user, seed=1, progress=False)
    if per_user < cap.max():
        assert not all(np.array_equal(a, b) for a, b in zip((u, pos, neg), other))


def test_exhausted_users_get_every_triplet_in_random_order(raw):
    inter, _ = raw
    split = split_baskets(read_interactions(inter, n_items=N_ITEMS), N_ITEMS, holdout=3)
    u, pos, neg = sample_triplets(split, 10**6, seed=0, progress=False)
    n_train = np.diff(split.train_ptr)
    free = [np.setdiff1d(np.arange(N_ITEMS), split.consumed_items[split.consumed_ptr[v]:split.consumed_ptr[v + 1]])
            for v in range(split.n_users)]
    for v in range(split.n_users):
        got = set(zip(split.train_items[pos[u == v]].tolist(), neg[u == v].tolist()))
        train = split.train_items[split.train_ptr[v]:split.train_ptr[v + 1]].tolist()
        assert got == {(p, n) for p in train for n in free[v].tolist()}
        assert len(got) == n_train[v] * free[v].size
    first = pos[u == 5][:20]
    assert not (np.diff(first) >= 0).all()                            # shuffled, not enumerated in order


def test_prepare_default_counts_finish_on_small_data(raw, tmp_path, capsys):
    """The README's defaults (10M train / 500k validation) on tiny data: every user is
    exhausted; prepare writes every distinct triplet (training first) instead of hanging."""
    inter, h5 = raw
    t = time.perf_counter()
    m = prepare(inter, h5, tmp_path / "prep", holdout_baskets=3, progress=False)
    assert time.perf_counter() - t < 5.0
    assert "they get what exists" in capsys.readouterr().err
    split = split_baskets(read_interactions(inter, n_items=N_ITEMS), N_ITEMS, holdout=3)
    assert m["n_train_triplets"] + m["n_validation_triplets"] == int(_capacity(split).sum())
    with open(tmp_path / "prep" / "naive-user-train.csv") as fh:
        assert sum(1 for _ in fh) - 1 == m["n_train_triplets"]


def test_synth_defaults_shape_prepares_quickly(tmp_path):
    """Wikimedia-shaped synth data (a small catalogue, a few heavy users) with the default
    counts: most users are exhausted, heavy users need most of their pairs."""
    s = synth(tmp_path / "raw", n_users=30, n_items=120, feature_dim=4, images=False, progress=False)
    t = time.perf_counter()
    m = prepare(s["interactions"], s["features_h5"], tmp_path / "prep", progress=False)
    assert time.perf_counter() - t < 5.0
    assert m["n_train_triplets"] > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(holdout_baskets=0), "holdout_baskets must be an integer >= 1, got 0"),
    (dict(holdout_baskets=-1), "holdout_baskets must be an integer >= 1, got -1"),
    (dict(n_train=0), "n_train must be an integer >= 1, got 0"),
    (dict(n_validation=-1), "n_validation must be an integer >= 0, got -1"),
    (dict(seed=-2), "seed must be an integer >= 0, got -2"),
])
def test_prepare_refuses_bad_arguments(raw, tmp_path, kwargs, message):
    inter, h5 = raw
    with pytest.raises(ValueError, match=message):
        prepare(inter, h5, tmp_path / "o", progress=False, **kwargs)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(median_interactions=-3), r"median_interactions must be a finite number > 0, got -3"),
    (dict(median_interactions=0.0), r"median_interactions must be a finite number > 0, got 0.0"),
    (dict(noise_rate=2), r"noise_rate must be in \[0, 1\], got 2"),
    (dict(noise_rate=-0.1), r"noise_rate must be in \[0, 1\], got -0.1"),
    (dict(heavy_fraction=1.5), r"heavy_fraction must be in \[0, 1\], got 1.5"),
    (dict(activity_sigma=-1.0), r"activity_sigma must be a finite number >= 0, got -1.0"),
    (dict(heavy_users=-1), r"heavy_users must be an integer >= 0, got -1"),
    (dict(n_users=0), r"n_users must be an integer >= 1, got 0"),
    (dict(seed=-1), r"seed must be an integer >= 0, got -1"),
])
def test_synth_refuses_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        synth(tmp_path / "o", images=False, progress=False,
              **{**dict(n_users=5, n_items=10, feature_dim=2), **kwargs})
    assert not (tmp_path / "o").exists()
