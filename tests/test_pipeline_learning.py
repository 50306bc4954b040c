"""End to end on the default synthetic data (smaller features): ACF learns the planted structure.

Done-when of issue 5: AUC >= 0.75 under the tutorial protocol and component attention
on the planted cells at least twice the uniform share. One trained model (about
30 s on 2 CPU cores) also feeds the evaluate / recommend / explain checks.
"""

import csv
import json

import numpy as np
import pytest
import torch

from acf_fast.cli import main as cli_main
from acf_fast.data.formats import read_evaluation
from acf_fast.data.history import UserHistory
from acf_fast.data.sampling import prepare
from acf_fast.data.synth import load_planted, synth
from acf_fast.evaluate import evaluate, load_model
from acf_fast.explain import explain
from acf_fast.pipeline import planted_attention_ratio
from acf_fast.recommend import recommend
from acf_fast.train import TrainConfig, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # small model: one thread is faster and steadier on 2 busy cores
    root = tmp_path_factory.mktemp("learn")
    s = synth(root / "data", feature_dim=32, progress=False)     # defaults otherwise (400 x 400)
    prepare(s["interactions"], s["features_h5"], root / "prep", n_train=40_000, n_validation=1_000,
            progress=False)
    summary = train(TrainConfig(data_dir=str(root / "prep"), out_dir=str(root / "run"), epochs=4,
                                model_dim=32, lr=3e-2, patience=0, progress=False))
    yield root, s, summary
    torch.set_num_threads(threads)


def test_auc_and_planted_attention(trained):
    root, s, _ = trained
    report = evaluate(root / "run" / "last.pt", root / "prep", root / "eval", progress=False,
                      print_table=False)
    auc = report["metrics"]["tutorial"]["AUC"]
    assert auc >= 0.75, report["table"]
    print(f"tutorial AUC {auc:.4f}")

    model = load_model(root / "run" / "last.pt", s["features_h5"], "auto", "cpu")
    groups = read_evaluation(root / "prep" / "naive-user-evaluation.csv")
    ratio = planted_attention_ratio(model, groups, load_planted(s["planted"])["planted_cells"])
    print(f"planted-cell attention {ratio:.2f}x uniform")
    assert ratio >= 2.0, f"planted cells get {ratio:.2f}x the uniform share"


def test_evaluation_files(trained):
    root, _, _ = trained
    report = json.loads((root / "eval" / "metrics.json").read_text())
    for protocol in ("tutorial", "standard"):
        for name in ("AUC", "RR", "R@20", "P@20", "nDCG@20", "R@100", "P@100", "nDCG@100", "R@200"):
            assert 0.0 <= report["metrics"][protocol][name] <= 1.0
    rows = list(csv.DictReader(open(root / "eval" / "metrics.csv")))
    assert [r["protocol"] for r in rows] == ["tutorial", "standard"]
    assert (root / "eval" / "metrics_by_history_size.png").stat().st_size > 1000
    assert report["table"].splitlines()[0].split() == ["AUC", "RR", "R@20", "P@20", "nDCG@20",
                                                       "R@100", "P@100", "nDCG@100"]


def test_evaluation_memory_block_does_not_change_results(trained):
    root, _, _ = trained
    a = evaluate(root / "run" / "last.pt", root / "prep", progress=False, print_table=False)
    b = evaluate(root / "run" / "last.pt", root / "prep", progress=False, print_table=False,
                 memory_mb=0.05)                       # a few users per block
    for p in a["metrics"]:
        for k, v in a["metrics"][p].items():
            assert b["metrics"][p][k] == pytest.approx(v, abs=1e-12)


def test_recommend_excludes_consumed(trained, tmp_path):
    root, _, _ = trained
    hist = UserHistory.load(root / "prep" / "history.npz")
    recs = recommend(root / "run" / "last.pt", root / "prep", users="0,5,7", k=15, out=tmp_path / "r.json")
    for u, items in recs.items():
        ids = [i for i, _ in items]
        assert len(ids) == 15 and len(set(ids)) == 15
        assert not set(np.asarray(ids) + 1) & set(hist.consumed_of(u).tolist())
        scores = [s for _, s in items]
        assert scores == sorted(scores, reverse=True)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [r["user_id"] for r in saved["recommendations"]] == [0, 5, 7]
    recommend(root / "run" / "last.pt", root / "prep", users=None, k=5, out=tmp_path / "all.csv")
    rows = list(csv.DictReader(open(tmp_path / "all.csv")))
    assert len(rows) == 5 * hist.n_users
    with_consumed = recommend(root / "run" / "last.pt", root / "prep", users=[0], k=400,
                              exclude_consumed=False)
    assert len(with_consumed[0]) == 400


def test_explain_with_images_and_grid(trained, tmp_path):
    root, s, _ = trained
    hist = UserHistory.load(root / "prep" / "history.npz")
    user = next(u for u in range(hist.n_users) if len(hist.train_of(u)) >= 9)
    e = explain(root / "run" / "last.pt", root / "prep", user, tmp_path / "img.png",
                images_dir=s["images"], planted=s["planted"])
    assert (tmp_path / "img.png").stat().st_size > 5000
    assert len(e["alpha"]) == 9 and abs(sum(e["alpha"]) - 1) < 1e-5
    assert all(abs(sum(b) - 1) < 1e-5 and len(b) == 49 for b in e["beta"])
    assert len(e["top_k"]) == 10
    g = explain(root / "run" / "last.pt", root / "prep", user, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 5000 and g["top_k"] == e["top_k"]
    assert json.loads((tmp_path / "grid.json").read_text())["user"] == user


def test_cli_round_trip(trained, tmp_path, capsys):
    root, _, _ = trained
    ckpt = str(root / "run" / "best.pt")
    assert cli_main(["evaluate", ckpt, str(root / "prep"), "--protocol", "tutorial", "--no-plot",
                     "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "ACF (tutorial)" in out and (tmp_path / "ev" / "metrics.json").exists()
    assert cli_main(["recommend", ckpt, str(root / "prep"), "--users", "1,2", "-k", "3"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert set(recs) == {"1", "2"} and all(len(v) == 3 for v in recs.values())
    assert cli_main(["explain", ckpt, str(root / "prep"), "--user", "3", "--out",
                     str(tmp_path / "e.png")]) == 0
    assert (tmp_path / "e.png").exists()
