"""`demo` (what `make demo` runs) end to end, at toy sizes so it takes seconds."""

import json

import torch

from acf_fast.pipeline.cli import main as cli_main
from acf_fast.pipeline.demo import DemoConfig, run_demo


def test_demo_runs_end_to_end(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        result = run_demo(DemoConfig(out=str(tmp_path / "demo"), n_train=1_000, n_validation=100,
                                     epochs=1, model_dim=8, progress=False, threads=1,
                                     synth={"n_users": 60, "n_items": 80, "feature_dim": 8}))
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "ACF (tutorial)" in out and "figures:" in out
    assert set(result["metrics"]) == {"tutorial", "standard"}
    assert all(p.endswith(".png") for p in result["figures"]) and len(result["figures"]) == 4
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert saved["total_s"] > 0 and "planted_attention_ratio" in saved


def test_cli_synth_and_prepare(tmp_path, capsys):
    assert cli_main(["synth", str(tmp_path / "d"), "--users", "20", "--items", "30", "--feature-dim", "4",
                     "--no-images", "--formats", "h5,npy"]) == 0
    assert cli_main(["prepare", str(tmp_path / "d" / "interactions.csv"), str(tmp_path / "d" / "features.npy"),
                     str(tmp_path / "p"), "--n-train", "100", "--n-validation", "10"]) == 0
    manifest = json.loads((tmp_path / "p" / "dataset.json").read_text())
    assert manifest["n_items"] == 30 and manifest["n_train_triplets"] >= 100
