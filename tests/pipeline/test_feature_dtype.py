"""The feature table's dtype follows the run (issue 18, item 5): `prepare` builds no cache of
its own accord, `train --feature-dtype bfloat16` records its dtype in the checkpoint, and
`evaluate`, `recommend` and `explain` read the table in it; a bf16 workflow never builds or
reads a float32 table. --feature-dtype overrides, with a notice; older checkpoints, which
record none, read float32."""

import json

import pytest
import torch

from acf_fast.model import acf as acf_module
from acf_fast.model import features as F
from acf_fast.model.checkpoint import read_checkpoint, recorded_feature_dtype
from acf_fast.pipeline.cli import main as cli_main
from acf_fast.pipeline.recommend import recommend
from tests.conftest import cli_error, resave


class DtypeLog:
    """Every dtype the feature store was asked for: tables loaded, caches looked up."""

    def __init__(self, mp):
        self.seen = []
        for module, name in ((F, "load_feature_table"), (acf_module, "load_feature_table"),
                             (F, "existing_cache")):
            mp.setattr(module, name, self.wrap(getattr(module, name)))

    def wrap(self, fn):
        def logged(path, dtype=torch.float32, *args, **kwargs):
            self.seen.append(dtype)
            return fn(path, dtype, *args, **kwargs)
        return logged


def caches(*folders):
    return sorted(p.name for folder in folders for p in folder.rglob("*.acf-cache-*"))


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """synth -> prepare -> train (bf16) -> evaluate, recommend, explain, all through the CLI,
    with every dtype asked of the feature store logged."""
    from acf_fast.data.synth import synth

    root = tmp_path_factory.mktemp("bf16")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACF_FAST_CACHE_DIR", str(root / "user-cache"))
        log = DtypeLog(mp)
        s = synth(root / "raw", n_users=40, n_items=60, n_concepts=4, feature_dim=16, heavy_users=1,
                  median_interactions=30, progress=False)
        assert cli_main(["prepare", s["interactions"], s["features_h5"], str(root / "prep"),
                         "--n-train", "200", "--n-validation", "20"]) == 0
        after_prepare = caches(root)
        run = str(root / "run")
        assert cli_main(["train", str(root / "prep"), run, "--epochs", "1", "--batch-size", "64",
                         "--model-dim", "8", "--feature-dtype", "bfloat16"]) == 0
        ckpt = root / "run" / "best.pt"
        assert cli_main(["evaluate", str(ckpt), str(root / "prep"), "--out", str(root / "eval"),
                         "--no-plot"]) == 0
        assert cli_main(["recommend", str(ckpt), str(root / "prep"), "--users", "0,1",
                         "--out", str(root / "recs.json")]) == 0
        assert cli_main(["explain", str(ckpt), str(root / "prep"), "--user", "0",
                         "--out", str(root / "u0.png"), "--images", s["images"]]) == 0
    return root, after_prepare, log.seen


def test_prepare_builds_no_cache(bf16_run):
    _, after_prepare, _ = bf16_run
    assert after_prepare == []


def test_a_bf16_run_never_builds_or_reads_a_float32_table(bf16_run):
    root, _, seen = bf16_run
    assert seen and set(seen) == {torch.bfloat16}, seen
    assert caches(root) == ["features.h5.acf-cache-bfloat16.npy"]
    assert json.loads((root / "u0.json").read_text())["top_k"]      # explain drew from it


def test_the_checkpoint_records_the_dtype(bf16_run):
    root, _, _ = bf16_run
    for name in ("best.pt", "last.pt"):
        assert read_checkpoint(root / "run" / name)["feature_dtype"] == "bfloat16"


def test_an_override_is_used_with_a_notice(bf16_run, monkeypatch, capsys):
    root, _, _ = bf16_run
    monkeypatch.setenv("ACF_FAST_CACHE_DIR", str(root / "user-cache"))
    log = DtypeLog(monkeypatch)
    assert cli_main(["recommend", str(root / "run" / "best.pt"), str(root / "prep"), "--users", "0",
                     "--feature-dtype", "float16"]) == 0
    assert set(log.seen) == {torch.float16}
    assert "reading float16 features for a model trained on bfloat16 ones" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli_main(["recommend", str(root / "run" / "best.pt"), str(root / "prep"),
                  "--feature-dtype", "float64"])
    assert exit_.value.code == 2
    assert "argument --feature-dtype: invalid choice: 'float64'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="feature dtype must be one of float32, float16, bfloat16, "
                                         "got 'float64'"):
        recommend(root / "run" / "best.pt", root / "prep", users=[0], feature_dtype="float64")


def test_a_checkpoint_without_a_recorded_dtype_reads_float32(bf16_run, tmp_path, monkeypatch):
    root, _, _ = bf16_run
    old = tmp_path / "old.pt"
    ckpt = read_checkpoint(root / "run" / "best.pt")
    resave(root / "run" / "best.pt", old, feature_dtype=None,
           train_config={k: v for k, v in ckpt["train_config"].items() if k != "feature_dtype"})
    assert recorded_feature_dtype(read_checkpoint(old)) == "float32"
    monkeypatch.setenv("ACF_FAST_CACHE_DIR", str(root / "user-cache"))
    log = DtypeLog(monkeypatch)
    assert cli_main(["recommend", str(old), str(root / "prep"), "--users", "0"]) == 0
    assert set(log.seen) == {torch.float32}


def test_resume_goes_on_in_the_runs_dtype(bf16_run, tmp_path, capsys, monkeypatch):
    """`train --resume` without --feature-dtype continues a bf16 run in bf16; asking for
    another dtype than the run's is refused, like any setting a resume must keep."""
    root, _, _ = bf16_run
    run = tmp_path / "run"
    common = [str(root / "prep"), str(run), "--batch-size", "64", "--model-dim", "8"]
    assert cli_main(["train", *common, "--epochs", "1", "--feature-dtype", "bfloat16"]) == 0
    assert cli_main(["train", *common, "--epochs", "2", "--resume"]) == 0
    assert read_checkpoint(run / "last.pt")["feature_dtype"] == "bfloat16"
    capsys.readouterr()
    log = DtypeLog(monkeypatch)
    line = cli_error(capsys, ["train", *common, "--epochs", "3", "--resume",
                              "--feature-dtype", "float32"])
    assert "feature_dtype='bfloat16'" in line and "feature_dtype='float32'" in line
    assert log.seen == []            # refused before the table was read (or cached) in float32
