"""Every step refuses bad input with an error that names the bad value (issue 5)."""

import shutil

import numpy as np
import pytest

from acf_fast.pipeline.cli import main as cli_main
from acf_fast.data.formats import read_evaluation, read_interactions, read_triplets
from acf_fast.data.sampling import prepare
from acf_fast.data.synth import synth, write_features
from acf_fast.evaluation.evaluate import evaluate
from acf_fast.pipeline.explain import explain
from acf_fast.pipeline.recommend import recommend
from acf_fast.training import TrainConfig, Trainer, train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 30-user, 50-item dataset, prepared and trained for one short epoch."""
    root = tmp_path_factory.mktemp("tiny")
    s = synth(root / "data", n_users=30, n_items=50, n_concepts=4, feature_dim=8, images=False,
              heavy_users=1, median_interactions=30, progress=False)
    prepare(s["interactions"], s["features_h5"], root / "prep", n_train=300, n_validation=30,
            progress=False)
    train(TrainConfig(data_dir=str(root / "prep"), out_dir=str(root / "run"), epochs=1, model_dim=8,
                      progress=False, backend="reference"))
    return root, s


def write(path, text):
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- synth / prepare
def test_synth_unknown_option(tmp_path):
    with pytest.raises(ValueError, match="n_itemz"):
        synth(tmp_path, n_itemz=3)


def test_prepare_missing_files(tmp_path, tiny):
    root, s = tiny
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        prepare(tmp_path / "nope.csv", s["features_h5"], tmp_path / "o", progress=False)
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        prepare(s["interactions"], tmp_path / "nope.h5", tmp_path / "o", progress=False)


def test_missing_column(tmp_path, tiny):
    _, s = tiny
    bad = write(tmp_path / "i.csv", "user_id,item_id,time\n0,1,5\n")
    with pytest.raises(ValueError, match="timestamp"):
        prepare(bad, s["features_h5"], tmp_path / "o", progress=False)


def test_non_integer_ids(tmp_path):
    bad = write(tmp_path / "i.csv", "user_id,item_id,timestamp\n0,1,5\n0,x7,6\n")
    with pytest.raises(ValueError, match=r"line 3.*item_id.*'x7'"):
        read_interactions(bad)
    bad = write(tmp_path / "u.csv", "user_id,item_id,timestamp\n0.5,1,5\n")
    with pytest.raises(ValueError, match=r"user_id.*'0.5'"):
        read_interactions(bad)
    bad = write(tmp_path / "t.csv", "profile,pi,ni,ui\n1 z 3,3,4,0\n")
    with pytest.raises(ValueError, match=r"profile.*'z'"):
        read_triplets(bad)


def test_unknown_item_and_feature_count_mismatch(tmp_path, tiny):
    _, s = tiny
    feats = np.ones((10, 8, 7, 7), dtype=np.float32)
    _, small_h5 = write_features(tmp_path, [f"{i}" for i in range(10)], feats)
    with pytest.raises(ValueError, match=r"unknown item id \d+.*\[0, 9\].*has 10 items.*do not match"):
        prepare(s["interactions"], small_h5, tmp_path / "o", progress=False)


def test_triplet_and_evaluation_files(tmp_path):
    with pytest.raises(ValueError, match="ni"):
        read_triplets(write(tmp_path / "a.csv", "profile,pi,ui\n1,1,0\n"))
    with pytest.raises(ValueError, match="must end with pi=2"):
        read_triplets(write(tmp_path / "b.csv", "profile,pi,ni,ui\n1 3,2,4,0\n"))
    with pytest.raises(ValueError, match=r"unknown user id 7"):
        read_triplets(write(tmp_path / "c.csv", "profile,pi,ni,ui\n1,1,4,7\n"), n_users=5)
    with pytest.raises(ValueError, match=r"unknown item id 99"):
        read_evaluation(write(tmp_path / "d.csv", "timestamp,user_id,predict,profile\n1,0,99,1\n"), n_items=50)
    with pytest.raises(ValueError, match="predict"):
        read_evaluation(write(tmp_path / "e.csv", "timestamp,user_id,profile\n1,0,1\n"))
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read_evaluation(tmp_path / "missing.csv")


# ---------------------------------------------------------------------------- train / evaluate
def test_train_errors(tmp_path, tiny):
    root, s = tiny
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        Trainer(TrainConfig(data_dir=str(tmp_path), out_dir=str(tmp_path / "r")))
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        Trainer(TrainConfig(data_dir=str(root / "prep"), out_dir=str(tmp_path / "r"), loss="hinge"))
    feats = np.ones((60, 8, 7, 7), dtype=np.float32)
    _, big = write_features(tmp_path, [f"{i}" for i in range(60)], feats)
    with pytest.raises(ValueError, match="has 60 items but the prepared data has 50"):
        Trainer(TrainConfig(data_dir=str(root / "prep"), out_dir=str(tmp_path / "r"), features=str(big),
                            model_dim=8))


def test_evaluate_errors(tmp_path, tiny):
    root, _ = tiny
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        evaluate(tmp_path / "missing.pt", root / "prep", progress=False, print_table=False)
    prep = tmp_path / "prep"
    shutil.copytree(root / "prep", prep)
    (prep / "naive-user-evaluation.csv").write_text("timestamp,user_id,predict,profile\n1,31,2,1\n")
    with pytest.raises(ValueError, match="unknown user id 31"):
        evaluate(root / "run" / "best.pt", prep, progress=False, print_table=False)


def test_recommend_and_explain_errors(tmp_path, tiny):
    root, _ = tiny
    ckpt = root / "run" / "best.pt"
    with pytest.raises(ValueError, match="unknown user id 30"):
        recommend(ckpt, root / "prep", users=[1, 30])
    with pytest.raises(ValueError, match="'bob' is not an integer"):
        recommend(ckpt, root / "prep", users="1,bob")
    with pytest.raises(ValueError, match="unknown user id -1"):
        explain(ckpt, root / "prep", -1, tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        explain(ckpt, root / "prep", 0, tmp_path / "x.png", images_dir=tmp_path / "no_such_dir")


def test_extract_errors(tmp_path):
    from acf_fast.pipeline.extract import extract

    with pytest.raises((FileNotFoundError, RuntimeError)):
        extract(tmp_path / "no_images", tmp_path / "f.h5", random_weights=True)


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    rc = cli_main(["prepare", str(tmp_path / "gone.csv"), str(tmp_path / "f.h5"), str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("acf-fast: error:") and "f.h5" in err


def test_cli_refuses_bad_numbers_with_the_option_and_value(tmp_path, capsys):
    for argv, message in [
            (["--threads", "-3", "train", "d", "o"], "argument --threads: must be an integer >= 1, got -3"),
            (["train", "d", "o", "--max-steps", "0"], "argument --max-steps: must be an integer >= 1, got 0"),
            (["train", "d", "o", "--val-rank-samples", "-1"], "argument --val-rank-samples: must be an integer >= 0"),
            (["train", "d", "o", "--lr", "inf"], "argument --lr: must be a positive finite number, got inf"),
            (["evaluate", "c", "d", "--memory-mb", "0"], "argument --memory-mb: must be a positive finite"),
            (["prepare", "i", "f", "o", "--holdout-baskets", "0"], "argument --holdout-baskets: must be an integer >= 1"),
            (["recommend", "c", "d", "-k", "x"], "argument -k: expected an integer, got 'x'")]:
        with pytest.raises(SystemExit) as exit_:
            cli_main(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_empty_user_list_and_foreign_checkpoint(tmp_path, tiny):
    root, _ = tiny
    ckpt = root / "run" / "best.pt"
    with pytest.raises(ValueError, match="names no user id"):
        recommend(ckpt, root / "prep", users="")
    other = tmp_path / "other"
    s = synth(other / "data", n_users=20, n_items=40, n_concepts=4, feature_dim=8, images=False,
              heavy_users=1, median_interactions=30, progress=False)
    prepare(s["interactions"], s["features_h5"], other / "prep", n_train=100, n_validation=20,
            progress=False)
    with pytest.raises(ValueError, match="trained with 30 users but the dataset has 20: it belongs "
                                         "to another dataset"):
        recommend(ckpt, other / "prep", users=[1])


def test_feature_rows_that_are_not_numbers_name_the_file_and_row(tmp_path):
    from acf_fast.model.features import load_feature_table

    arr = np.empty((3, 2), dtype=object)
    for i in range(3):
        arr[i] = [f"{i}.jpg", np.zeros((4, 7, 7), dtype=np.float32)]
    arr[1, 1] = np.array([["hello"]], dtype=object)
    np.save(tmp_path / "f.npy", arr, allow_pickle=True)
    with pytest.raises(ValueError, match=r"f.npy: feature row 1 \(item id 2\) is not numeric"):
        load_feature_table(tmp_path / "f.npy")
    arr[1, 1] = np.zeros((5, 7, 7), dtype=np.float32)
    np.save(tmp_path / "g.npy", arr, allow_pickle=True)
    with pytest.raises(ValueError, match=r"g.npy: feature row 1 \(item id 2\): expected an array of "
                                         r"shape \(4, 7, 7\) like row 0, got \(5, 7, 7\)"):
        load_feature_table(tmp_path / "g.npy")


def test_max_steps_mid_epoch_keeps_a_resumable_last_checkpoint(tmp_path, tiny, capsys):
    root, _ = tiny
    out = tmp_path / "run"
    rc = cli_main(["train", str(root / "prep"), str(out), "--model-dim", "8", "--max-steps", "2",
                   "--backend", "reference"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "no epoch finished yet, so no best.pt; checkpoints: " + str(out / "last.pt") in printed
    assert (out / "last.pt").exists() and not (out / "best.pt").exists()


# ---------------------------------------------------------------------------- devices
def _unusable_cuda():
    import torch

    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


@pytest.mark.parametrize("command", ["evaluate", "recommend", "explain", "train", "demo"])
def test_unusable_device_is_one_line_for_every_subcommand(tiny, tmp_path, capsys, command):
    root, _ = tiny
    args = {"evaluate": ["evaluate", str(root / "run" / "last.pt"), str(root / "prep")],
            "recommend": ["recommend", str(root / "run" / "last.pt"), str(root / "prep")],
            "explain": ["explain", str(root / "run" / "last.pt"), str(root / "prep"), "--user", "0",
                        "--out", str(tmp_path / "e.png")],
            "train": ["train", str(root / "prep"), str(tmp_path / "run")],
            "demo": ["demo", "--out", str(tmp_path / "demo")]}[command]
    device = _unusable_cuda()
    assert cli_main(args + ["--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("acf-fast: error:") and repr(device) in err[0], err
    assert not (tmp_path / "e.png").exists() and not (tmp_path / "run").exists()


def test_library_loader_checks_the_device(tiny):
    from acf_fast.model.acf import load_model

    root, s = tiny
    with pytest.raises(ValueError, match="use --device cpu|GPU\\(s\\) are visible"):
        load_model(root / "run" / "last.pt", s["features_h5"], "auto", _unusable_cuda())


def test_evaluate_without_matplotlib_writes_metrics_and_skips_figures(tiny, tmp_path, capsys,
                                                                      monkeypatch):
    import acf_fast.evaluation.plots as plots

    def missing():
        raise plots.MissingPlotting("figures need matplotlib: pip install matplotlib pillow")

    monkeypatch.setattr(plots, "pyplot", missing)
    root, _ = tiny
    assert cli_main(["evaluate", str(root / "run" / "last.pt"), str(root / "prep"),
                     "--out", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / "metrics.json").exists()
    assert not list((tmp_path / "ev").glob("*.png"))
    assert "figures skipped" in capsys.readouterr().err
