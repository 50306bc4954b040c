"""CLI behaviours: --resume keeps the run's own epochs target, prepare scales its default
validation count with --n-train, --threads works on either side of the subcommand, help
texts without noise, and no "early stop" notice when the last epoch ended the run."""

import json
import math
import re

import pytest

from acf_fast.data.sampling import prepare
from acf_fast.data.synth import synth
from acf_fast.model.checkpoint import read_checkpoint
from acf_fast.pipeline.cli import build_parser, main as cli_main
from acf_fast.training import LAST, Trainer

from conftest import tiny_prepared_dataset, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return tiny_prepared_dataset(tmp_path_factory.mktemp("cli_behaviour"))


def _train_args(root, out, *extra):
    return ["--threads", "1", "train", str(root / "prep"), str(out), "--model-dim", "16",
            "--lr", "1e-2", "--patience", "0", "--backend", "reference",
            "--val-rank-samples", "32", *extra]


# ---------------------------------------------------------------------------- 1: --resume
def test_resume_without_epochs_continues_to_the_runs_own_target(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(_train_args(prepared, out, "--epochs", "3", "--max-steps", "7")) == 0
    st = read_checkpoint(out / LAST)["train_state"]
    assert (st["epoch"], st["step"], st["global_step"]) == (1, 2, 7)   # 5 steps per epoch
    capsys.readouterr()

    assert cli_main(_train_args(prepared, out, "--resume")) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("resuming")]
    assert len(lines) == 1
    assert f"resuming {out / LAST} at epoch 2, step 2 of 5 (global step 7)" in lines[0]
    assert "up to epoch 3" in lines[0]
    ckpt = read_checkpoint(out / LAST)
    assert ckpt["train_state"]["epoch"] == 3 and ckpt["train_config"]["epochs"] == 3

    # an explicit, larger --epochs still trains on
    assert cli_main(_train_args(prepared, out, "--resume", "--epochs", "4")) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("resuming")]
    assert line == [f"resuming {out / LAST} at the start of epoch 4 (global step 15); "
                    "training up to epoch 4"]
    ckpt = read_checkpoint(out / LAST)
    assert ckpt["train_state"]["epoch"] == 4 and ckpt["train_config"]["epochs"] == 4

    # and without --epochs the finished run is complete at its (new) target
    assert cli_main(_train_args(prepared, out, "--resume")) == 0
    assert "already complete: 4 of 4 epochs done" in capsys.readouterr().out


def test_fresh_run_without_epochs_uses_the_default(prepared, tmp_path):
    out = tmp_path / "fresh"
    assert cli_main(_train_args(prepared, out, "--max-steps", "1")) == 0
    assert read_checkpoint(out / LAST)["train_config"]["epochs"] == 10


# ---------------------------------------------------------------------------- 2: prepare
@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_prepare")
    return synth(root / "data", n_users=40, n_items=60, n_concepts=4, feature_dim=8, images=False,
                 heavy_users=1, median_interactions=30, progress=False)


def test_prepare_scales_the_default_validation_count_with_n_train(raw, tmp_path, capsys):
    out = tmp_path / "prep"
    assert cli_main(["prepare", str(raw["interactions"]), str(raw["features_h5"]), str(out),
                     "--n-train", "2000"]) == 0
    m = json.loads((out / "dataset.json").read_text())
    per_user = math.ceil(math.ceil(2000 / 20) / m["n_users"])          # 100 over 40 users: 3
    assert m["n_validation_triplets"] <= per_user * m["n_users"]
    assert m["n_validation_triplets"] >= per_user * m["n_users_with_training_items"] - m["n_users"]
    help_text = build_parser()._subparsers._group_actions[0].choices["prepare"].format_help()
    assert "ceil(N_TRAIN / 20)" in " ".join(help_text.split())


def test_prepare_api_default_validation_follows_n_train(raw, tmp_path):
    m = prepare(raw["interactions"], raw["features_h5"], tmp_path / "p", n_train=400, progress=False)
    assert m["n_validation_triplets"] <= m["n_users"]                 # ceil(20 / 40) = 1 each


def test_short_user_warning_names_the_quota(raw, tmp_path, capsys):
    prepare(raw["interactions"], raw["features_h5"], tmp_path / "p", n_train=400_000,
            n_validation=20_000, progress=False)
    err = capsys.readouterr().err
    assert "allow fewer than 10500 distinct triplets" in err
    assert "10000 training + 500 validation triplets" in err


# ---------------------------------------------------------------------------- 3: --threads, help
@pytest.mark.parametrize("argv, threads", [
    (["--threads", "2", "train", "d", "o"], 2),
    (["train", "d", "o", "--threads", "3"], 3),
    (["evaluate", "c", "d", "--threads", "4"], 4),
    (["demo", "--threads", "5"], 5),
    (["--threads", "2", "demo"], 2),
    (["demo"], None),
])
def test_threads_before_or_after_the_subcommand(argv, threads):
    assert build_parser().parse_args(argv).threads == threads


def _subparsers():
    parser = build_parser()
    return parser, parser._subparsers._group_actions[0].choices


def test_help_texts_have_no_noise_and_cover_every_argument():
    parser, subs = _subparsers()
    for name, p in [("acf-fast", parser), *subs.items()]:
        text = " ".join(p.format_help().split())
        assert "(default: None)" not in text, name
        assert not re.search(r"default[^()]*\) \(default:", text), name   # said twice
        for action in p._actions:
            if action.help == "==SUPPRESS==" or action.dest in ("help", "command"):
                continue
            assert action.help, f"{name} {action.dest} has no help"
            if action.required:
                assert "(default" not in p._get_formatter()._get_help_string(action), (name, action.dest)
    for name in ("train", "evaluate", "recommend", "explain", "demo"):
        backend = next(a for a in subs[name]._actions if a.dest == "backend")
        assert backend.help


# ---------------------------------------------------------------------------- 4: early stop
@pytest.mark.parametrize("epochs, says_early_stop", [(2, False), (3, True)])
def test_early_stop_notice_only_when_epochs_were_left(prepared, tmp_path, capsys, epochs,
                                                      says_early_stop):
    t = Trainer(tiny_train_config(prepared, tmp_path, epochs=epochs, patience=1, progress=True))
    t.validate = lambda: {"val_loss": 1.0}   # epoch 1 improves, epoch 2 does not: patience spent
    t.fit()
    assert t.state.epoch == 2 and t.state.finished
    out = capsys.readouterr().out
    assert ("early stop after 1 epochs without improvement" in out) == says_early_stop


# ---------------------------------------------------------------------------- 5: ids, ranks, val_auc
@pytest.fixture(scope="module")
def trained_run(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_ids") / "run"
    assert cli_main(_train_args(prepared, out, "--epochs", "1")) == 0
    return prepared, out


def test_explain_writes_0_based_item_ids_like_recommend(trained_run, tmp_path):
    from acf_fast.data.history import UserHistory
    from acf_fast.pipeline.explain import explain
    from acf_fast.pipeline.recommend import recommend

    root, run = trained_run
    hist = UserHistory.load(root / "prep" / "history.npz")
    user = next(u for u in range(hist.n_users) if len(hist.train_of(u)) >= 3)
    e = explain(run / LAST, root / "prep", user, tmp_path / "u.png", k=10, exclude="train")
    saved = json.loads((tmp_path / "u.json").read_text())
    recs = recommend(run / LAST, root / "prep", users=[user], k=10, exclude_consumed=True)
    assert saved["top_k"] == e["top_k"] == [i for i, _ in recs[user]]
    train = (hist.train_of(user) - 1).tolist()
    held = sorted(set((hist.consumed_of(user) - 1).tolist()) - set(train))
    assert saved["held_out"] == held
    assert saved["profile"] == train[-len(saved["profile"]):] and len(saved["profile"]) >= 3
    assert set(saved["hits"]) <= set(held) and set(saved["hits"]) <= set(saved["top_k"])
    assert saved["item_ids"].startswith("0-based")


def test_recommend_csv_ranks_count_from_1(trained_run, tmp_path):
    import csv

    from acf_fast.pipeline.recommend import recommend

    root, run = trained_run
    recs = recommend(run / LAST, root / "prep", users=[0, 1], k=4, out=tmp_path / "r.csv")
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    for u in (0, 1):
        mine = [r for r in rows if int(r["user_id"]) == u]
        assert [int(r["rank"]) for r in mine] == list(range(1, len(recs[u]) + 1))
        assert int(mine[0]["item_id"]) == recs[u][0][0]      # rank 1 = the best item


def test_training_log_and_evaluation_table_name_their_protocols(prepared, tmp_path, capsys):
    from acf_fast.evaluation.evaluate import evaluate

    out = tmp_path / "run"
    assert cli_main(_train_args(prepared, out, "--epochs", "2")) == 0
    log = capsys.readouterr().out
    legend = [ln for ln in log.splitlines() if ln.startswith("val_auc_triplets / val_rr_triplets")]
    assert len(legend) == 1 and "validation triplets" in legend[0]
    assert "whole catalogue" in legend[0] and "profile excluded" in legend[0]
    epochs = [ln for ln in log.splitlines() if ln.startswith("epoch ")]
    assert len(epochs) == 2 and all("val_auc_triplets=" in ln for ln in epochs)
    assert log.index(legend[0]) < log.index(epochs[0])
    history = json.loads((out / "history.json").read_text())
    assert all("val_auc" in r and "val_rr" in r for r in history)      # keys kept

    report = evaluate(out / LAST, prepared / "prep", tmp_path / "eval", plot=False, progress=False)
    printed = capsys.readouterr().out
    note = printed.splitlines()[-1]
    assert "held-out baskets" in note and "tutorial" in note and "standard" in note
    assert "profile items" in note and "every training item" in note and "val_auc" in note
    assert note == report["protocols_note"]
    assert note in (tmp_path / "eval" / "metrics.txt").read_text()
