"""The tutorial's sampling protocol (docs/sampling.md) and the readers of its files, on hand-made data."""

import csv
import math

import numpy as np
import pytest
import torch

from acf_fast.data.formats import read_evaluation, read_interactions, read_triplets
from acf_fast.data.history import UserHistory
from acf_fast.data.sampling import prepare
from acf_fast.data.synth import write_features

N_ITEMS = 40


def write_interactions(path, rows, header=("user_id", "item_id", "timestamp")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def features(tmp_path):
    feats = np.random.default_rng(0).random((N_ITEMS, 8, 7, 7), dtype=np.float32)
    npy, h5 = write_features(tmp_path, [f"img{i}.png" for i in range(N_ITEMS)], feats)
    return h5


def user0_rows():
    """User 0: 12 baskets at times 100..1200; baskets 3 and 7 have two items; one repeat."""
    rows, item = [], 0
    for b in range(12):
        t = 100 * (b + 1)
        size = 2 if b in (3, 7) else 1
        for _ in range(size):
            rows.append((0, item, t))
            item += 1
    rows.append((0, 0, 50))  # an older repeat of item 0: the latest (t=100) is kept
    return rows


@pytest.fixture
def dataset(tmp_path, features):
    rows = user0_rows()
    rows += [(1, 30 + i, 1000 + 10 * i) for i in range(5)]   # user 1: 5 baskets, nothing held out
    rows += [(2, 20 + i, 500 + 10 * (i // 3)) for i in range(12)]  # user 2: 4 baskets of 3
    inter = write_interactions(tmp_path / "inter.csv", rows)
    out = tmp_path / "prep"
    manifest = prepare(inter, features, out, n_train=30, n_validation=6, progress=False)
    return out, manifest


def read_rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_baskets_and_holdout(dataset):
    out, manifest = dataset
    ev = read_rows(out / "naive-user-evaluation.csv")
    assert {r["user_id"] for r in ev} == {"0"}          # only the user with > 10 baskets
    assert len(ev) == 10                                 # one row per held-out basket
    # user 0's first two baskets (items 0 and 1) train; baskets 3 and 7 keep their two items
    predicts = [r["predict"].split() for r in ev]
    assert predicts[0] == ["2"] and predicts[1] == ["3", "4"] and predicts[5] == ["8", "9"]
    assert all(r["profile"] == "0 1" for r in ev)
    hist = UserHistory.load(out / "history.npz")
    assert hist.train_of(0).tolist() == [1, 2]           # 1-based in memory
    assert sorted(hist.consumed_of(0).tolist()) == list(range(1, 15))
    assert manifest["n_users"] == 3 and manifest["n_items"] == N_ITEMS


def test_triplets_follow_the_protocol(dataset):
    out, manifest = dataset
    train = read_rows(out / "naive-user-train.csv")
    val = read_rows(out / "naive-user-validation.csv")
    per_user_train, per_user_val = math.ceil(30 / 3), math.ceil(6 / 3)
    hist = UserHistory.load(out / "history.npz")
    keys = set()
    for rows, per_user in ((train, per_user_train), (val, per_user_val)):
        counts = np.bincount([int(r["ui"]) for r in rows], minlength=3)
        assert counts.tolist() == [per_user] * 3
        for r in rows:
            u, pi, ni = int(r["ui"]), int(r["pi"]), int(r["ni"])
            prof = [int(x) for x in r["profile"].split()]
            chron = (hist.train_of(u) - 1).tolist()
            assert prof[-1] == pi and pi in chron
            end = chron.index(pi) + 1
            assert prof == chron[max(0, end - 10):end]   # the up-to-10 items ending at pi
            assert ni + 1 not in hist.consumed_of(u)     # never consumed, held-out included
            key = (u, pi, ni)
            assert key not in keys                       # no duplicates across train + validation
            keys.add(key)


def test_sampling_is_seeded(tmp_path, features):
    inter = write_interactions(tmp_path / "i.csv", user0_rows() + [(1, 30 + i, 10 * i) for i in range(5)])
    prepare(inter, features, tmp_path / "a", n_train=40, n_validation=4, progress=False)
    prepare(inter, features, tmp_path / "b", n_train=40, n_validation=4, progress=False)
    prepare(inter, features, tmp_path / "c", n_train=40, n_validation=4, seed=1, progress=False)
    a = (tmp_path / "a" / "naive-user-train.csv").read_text()
    assert a == (tmp_path / "b" / "naive-user-train.csv").read_text()
    assert a != (tmp_path / "c" / "naive-user-train.csv").read_text()


def test_readers_shift_ids_and_drop_pi(dataset):
    out, manifest = dataset
    rows = read_rows(out / "naive-user-train.csv")
    ts = read_triplets(out / "naive-user-train.csv", max_profile_size=9)
    assert len(ts) == len(rows)
    for i, r in enumerate(rows[:20]):
        prof = [int(x) + 1 for x in r["profile"].split()][:-1][-9:]
        assert ts.pos[i] == int(r["pi"]) + 1 and ts.neg[i] == int(r["ni"]) + 1
        assert ts.profile[i].tolist() == prof + [0] * (9 - len(prof))
        assert ts.user[i] == int(r["ui"])
    assert ts.profile.dtype == torch.int64
    groups = read_evaluation(out / "naive-user-evaluation.csv")
    assert len(groups) == 1                              # ten rows, one (profile, user) group
    assert sorted(groups.targets(0).tolist()) == list(range(3, 15))
    assert groups.profile[0].tolist() == [1, 2]


def test_long_profile_keeps_most_recent(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("profile,pi,ni,ui\n0 1 2 3 4 5 6 7 8 9,9,20,0\n5,5,7,1\n")
    ts = read_triplets(p, max_profile_size=4)
    assert ts.profile.tolist() == [[6, 7, 8, 9], [0, 0, 0, 0]]   # pi removed; an empty profile is fine


def test_evaluation_groups_join_rows(tmp_path):
    p = tmp_path / "e.csv"
    p.write_text("timestamp,user_id,predict,profile\n1,0,5,1 2\n2,0,6 7,1 2\n3,1,8,3\n4,0,9,2 3\n")
    g = read_evaluation(p)
    assert len(g) == 3
    assert g.user.tolist() == [0, 1, 0]
    assert [g.targets(i).tolist() for i in range(3)] == [[6, 7, 8], [9], [10]]


def test_interactions_keep_latest_repeat(tmp_path):
    p = write_interactions(tmp_path / "i.csv", [(0, 1, 5), (0, 1, 9), (0, 2, 7), (1, 1, 3)])
    inter = read_interactions(p)
    got = sorted(zip(inter.user.tolist(), inter.item.tolist(), inter.timestamp.tolist()))
    assert got == [(0, 1, 9), (0, 2, 7), (1, 1, 3)]


def test_fast_and_checked_triplet_readers_agree(dataset, tmp_path, monkeypatch):
    from acf_fast.data import formats

    out, _ = dataset
    crlf = tmp_path / "crlf.csv"
    crlf.write_bytes((out / "naive-user-train.csv").read_bytes().replace(b"\n", b"\r\n") + b"\r\n")
    fast = [read_triplets(p, max_profile_size=4) for p in (out / "naive-user-train.csv", crlf)]
    monkeypatch.setattr(formats, "_read_triplets_fast", lambda *a, **k: None)
    slow = read_triplets(out / "naive-user-train.csv", max_profile_size=4)
    for f in fast:
        for name in ("user", "profile", "pos", "neg"):
            assert torch.equal(getattr(f, name), getattr(slow, name))
