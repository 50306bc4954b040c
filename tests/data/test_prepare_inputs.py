"""`prepare` refuses interactions it would silently turn into wrong data (issue "Reliability
II", item 5): non-finite timestamps, and user ids that are not dense."""

import csv
import time
import tracemalloc

import numpy as np
import pytest

from acf_fast.data.formats import read_interactions
from acf_fast.data.sampling import prepare
from acf_fast.data.synth import write_features

N_ITEMS = 40


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    root = tmp_path_factory.mktemp("feats")
    feats = np.random.default_rng(0).random((N_ITEMS, 4, 7, 7), dtype=np.float32)
    return write_features(root, [f"i{i}.png" for i in range(N_ITEMS)], feats)[0]


def interactions(path, users=range(80), times=None):
    """Each user 12 interactions at times 1..12 (so the last 10 baskets are held out)."""
    rows = []
    for u in users:
        for j in range(12):
            rows.append((u, (u + 3 * j) % N_ITEMS, (times or {}).get((u, j), j + 1)))
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([("user_id", "item_id", "timestamp")] + rows)
    return path


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400", "NaN"])
def test_non_finite_timestamps_are_refused_naming_the_line(tmp_path, features, value):
    """nan timestamps used to be accepted: a user's two oldest interactions became the
    held-out newest."""
    path = interactions(tmp_path / "i.csv", users=range(3), times={(1, 0): value, (1, 4): 2.5})
    with pytest.raises(ValueError) as info:
        prepare(path, features, tmp_path / "out", progress=False)
    msg = str(info.value)
    assert f"{path}, line 14: column 'timestamp' has {value!r}, expected a finite number" in msg
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="expected a finite number"):
        read_interactions(path)


def test_finite_float_timestamps_are_fine(tmp_path, features):
    path = interactions(tmp_path / "i.csv", users=range(3), times={(1, 0): "0.5"})
    inter = read_interactions(path)
    assert inter.timestamp.dtype == np.float64 and np.isfinite(inter.timestamp).all()
    prepare(path, features, tmp_path / "out", n_train=30, n_validation=3, progress=False)


def test_an_outlier_user_id_is_refused_with_how_to_remap(tmp_path, features):
    """One user id 100000 among 0..79 used to inflate the user table to 100,001 rows and shrink
    the training set over a thousand-fold, without a word."""
    path = interactions(tmp_path / "i.csv", users=[*range(80), 100_000])
    with pytest.raises(ValueError) as info:
        prepare(path, features, tmp_path / "out", progress=False)
    msg = str(info.value)
    assert "user ids are sparse: 81 distinct users, but the largest id is 100,000" in msg
    assert "dense 0-based user ids" in msg and "pd.factorize" in msg and str(path) in msg
    assert not (tmp_path / "out").exists()


def test_a_raw_database_id_is_refused_before_any_large_allocation(tmp_path, features):
    """A user id of 10**12 used to try to allocate a 7 TiB table."""
    path = interactions(tmp_path / "i.csv", users=[0, 1, 10**12])
    tracemalloc.start()
    t = time.perf_counter()
    try:
        with pytest.raises(ValueError, match="user ids are sparse: 3 distinct users, but the largest "
                                             "id is 1,000,000,000,000"):
            prepare(path, features, tmp_path / "out", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t < 10 and peak < 64 << 20


def test_a_few_unused_user_ids_are_a_warning(tmp_path, features, capsys):
    path = interactions(tmp_path / "i.csv", users=[0, 1, 3, 4])
    m = prepare(path, features, tmp_path / "out", n_train=50, n_validation=5, progress=False)
    assert m["n_users"] == 5
    assert "1 of the user ids 0..4 never occur" in capsys.readouterr().err


def test_cli_reports_bad_interactions_in_one_line(tmp_path, features, capsys):
    from acf_fast.pipeline.cli import main

    sparse = interactions(tmp_path / "s.csv", users=[0, 5000])
    nan = interactions(tmp_path / "n.csv", users=[0], times={(0, 3): "nan"})
    for path, text in ((sparse, "user ids are sparse"), (nan, "expected a finite number")):
        assert main(["prepare", str(path), str(features), str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("acf-fast: error: ") and err.count("\n") == 1 and text in err
    assert not (tmp_path / "o").exists()
