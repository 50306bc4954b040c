"""Training fails safely: divergence, signals, resuming a finished run, occupied output
folders and bad settings each end with one clear message and intact checkpoints."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from acf_fast.model.checkpoint import read_checkpoint
from acf_fast.training import (BEST, HISTORY, LAST, TrainConfig, Trainer, TrainingDiverged,
                               TrainingInterrupted, train)

from conftest import tiny_prepared_dataset, tiny_train_config, wait_for_marker

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return tiny_prepared_dataset(tmp_path_factory.mktemp("robust"))


config = tiny_train_config


def same_parameters(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def file_bytes(folder):
    return {n: (folder / n).read_bytes() for n in (BEST, LAST, HISTORY) if (folder / n).exists()}


# ---------------------------------------------------------------------------- settings
@pytest.mark.parametrize("kw, match", [
    (dict(max_steps=0), "max_steps must be >= 1"),
    (dict(max_steps=-5), "max_steps must be >= 1"),
    (dict(val_rank_samples=-1), "val_rank_samples must be >= 0"),
    (dict(select_by="auc", val_rank_samples=0), "needs val_rank_samples >= 1"),
    (dict(num_threads=-3), "threads must be >= 1"),
    (dict(lr=float("inf")), "lr must be a finite number > 0"),
    (dict(lr=float("nan")), "lr must be a finite number > 0"),
    (dict(weight_decay=float("nan")), "weight_decay must be a finite number"),
    (dict(patience=-1), "patience must be >= 0"),
    (dict(device="banana"), "invalid device 'banana'"),
])
def test_config_refuses_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(data_dir="d", out_dir="o", **kw).validate()


def test_config_accepts_the_documented_defaults():
    TrainConfig(data_dir="d", out_dir="o", max_steps=None, num_threads=0, val_rank_samples=0).validate()
    TrainConfig(data_dir="d", out_dir="o", max_steps=1, num_threads=1).validate()


def test_unusable_cuda_device_is_a_value_error():
    if torch.cuda.is_available():
        device, match = f"cuda:{torch.cuda.device_count()}", "GPU\\(s\\) are visible"
    else:
        device, match = "cuda", "no CUDA support|no GPU is visible"
    with pytest.raises(ValueError, match=match):
        TrainConfig(data_dir="d", out_dir="o", device=device).validate()


# ---------------------------------------------------------------------------- divergence
def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
    t = Trainer(config(prepared, tmp_path, checkpoint_every=2))
    real = t.loss_fn

    def loss_fn(ps, ns):                      # the 8th batch (epoch 2, step 3) gives NaN
        loss = real(ps, ns)
        return loss * float("nan") if t.model.training and t.state.global_step == 7 else loss

    t.loss_fn = loss_fn
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 2, step 3 of 5 \(global step 8\).*"
                                               r"lower the learning rate"):
        t.fit()
    last = read_checkpoint(tmp_path / LAST)
    assert last["train_state"]["global_step"] == 6          # the checkpoint_every write before it
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert read_checkpoint(tmp_path / BEST)["epoch"] == 1
    assert len(json.loads((tmp_path / HISTORY).read_text())) == 1


def test_a_huge_learning_rate_diverges_with_a_clear_error_and_saves_nothing(prepared, tmp_path):
    with pytest.raises(TrainingDiverged, match="training diverged.*lower the learning rate"):
        train(config(prepared, tmp_path, lr=1e30, epochs=1))
    assert not file_bytes(tmp_path)


def test_nan_validation_never_counts_as_best(prepared, tmp_path):
    t = Trainer(config(prepared, tmp_path, epochs=2, select_by="auc"))
    real, calls = t.validate, [0]

    def validate():
        calls[0] += 1
        out = real()
        return {k: float("nan") for k in out} if calls[0] == 2 else out

    t.validate = validate
    with pytest.raises(TrainingDiverged, match="after epoch 2 val_loss=nan"):
        t.fit()
    assert read_checkpoint(tmp_path / BEST)["epoch"] == 1
    assert read_checkpoint(tmp_path / LAST)["epoch"] == 1


def test_nan_scores_give_nan_ranking_metrics_not_a_perfect_auc(prepared, tmp_path):
    t = Trainer(config(prepared, tmp_path))
    with torch.no_grad():
        t.model.item_model.weight.fill_(float("nan"))
    out = t.validate()
    assert math.isnan(out["val_auc"]) and math.isnan(out["val_rr"])


# ---------------------------------------------------------------------------- resume
def test_resume_with_more_epochs_continues_bit_identically(prepared, tmp_path, capsys):
    full = Trainer(config(prepared, tmp_path / "full", epochs=3))
    full.fit()

    train(config(prepared, tmp_path / "run", epochs=2))
    before = file_bytes(tmp_path / "run")
    again = train(config(prepared, tmp_path / "run", epochs=2, progress=True), resume=True)
    assert "already complete: 2 of 2 epochs done" in capsys.readouterr().out
    assert again["already_complete"] and again["epochs_done"] == 2
    assert file_bytes(tmp_path / "run") == before            # nothing rewritten

    more = Trainer(config(prepared, tmp_path / "run", epochs=3))
    assert more.resume()
    more.fit()
    assert more.step_losses == full.step_losses[10:]         # epoch 3, bit for bit
    assert more.state.history == full.state.history
    assert same_parameters(read_checkpoint(tmp_path / "full" / LAST)["state_dict"],
                           read_checkpoint(tmp_path / "run" / LAST)["state_dict"])
    assert read_checkpoint(tmp_path / "run" / LAST)["train_config"]["epochs"] == 3


def test_early_stopped_run_stays_stopped_until_patience_allows_more(prepared, tmp_path, capsys):
    t = Trainer(config(prepared, tmp_path, epochs=5, patience=1))
    t.validate = lambda: {"val_loss": 1.0}   # epoch 1 improves, epoch 2 does not: stop
    t.fit()
    assert t.state.epoch == 2 and t.state.finished
    before = file_bytes(tmp_path)

    s = train(config(prepared, tmp_path, epochs=9, patience=1, progress=True), resume=True)
    out = capsys.readouterr().out
    assert "early-stopped after epoch 2" in out and "--patience" in out
    assert s["epochs_done"] == 2 and file_bytes(tmp_path) == before

    s = train(config(prepared, tmp_path, epochs=3, patience=0), resume=True)
    assert s["epochs_done"] == 3 and s["already_complete"] is None


# ---------------------------------------------------------------------------- output folder
def test_existing_run_is_not_overwritten_without_resume(prepared, tmp_path):
    (tmp_path / HISTORY).write_text("[]")
    with pytest.raises(ValueError, match=f"{tmp_path} already holds a training run.*history.json"):
        train(config(prepared, tmp_path, epochs=1))
    with pytest.raises(ValueError, match="already holds a training run.*no last.pt to resume from"):
        train(config(prepared, tmp_path, epochs=1), resume=True)
    (tmp_path / LAST).write_bytes(b"an old run")
    with pytest.raises(ValueError, match="pass --resume to continue it.*--overwrite"):
        train(config(prepared, tmp_path, epochs=1))
    assert (tmp_path / LAST).read_bytes() == b"an old run"

    s = train(config(prepared, tmp_path, epochs=1, overwrite=True))
    assert s["epochs_done"] == 1
    assert len(json.loads((tmp_path / HISTORY).read_text())) == 1
    assert read_checkpoint(tmp_path / LAST)["train_state"]["finished"]


# ---------------------------------------------------------------------------- signals
@pytest.fixture
def default_sigint():
    """SIGINT handled as in a terminal, even when the test runner was started with it ignored."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_at_the_step_boundary_and_resume_is_exact(prepared, tmp_path, signum,
                                                                 default_sigint):
    full = Trainer(config(prepared, tmp_path / "full"))
    full.fit()

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    t = Trainer(config(prepared, tmp_path / "cut"))
    real = t.loss_fn

    def loss_fn(ps, ns):
        if t.model.training and t.state.global_step == 6:   # during step 7: acted on after it
            os.kill(os.getpid(), signum)
        return real(ps, ns)

    t.loss_fn = loss_fn
    with pytest.raises(TrainingInterrupted) as info:
        t.fit()
    assert info.value.code == 128 + signum
    assert f"at epoch 2, step 2 of 5 (global step 7); saved {tmp_path / 'cut' / LAST}" in str(info.value)
    assert {s: signal.getsignal(s) for s in handlers} == handlers   # handlers restored
    st = read_checkpoint(tmp_path / "cut" / LAST)["train_state"]
    assert (st["global_step"], st["step"], st["finished"]) == (7, 2, False)

    resumed = Trainer(config(prepared, tmp_path / "cut"))
    assert resumed.resume()
    resumed.fit()
    assert resumed.step_losses == full.step_losses[7:]
    assert resumed.state.history == full.state.history
    assert same_parameters(read_checkpoint(tmp_path / "full" / LAST)["state_dict"],
                           read_checkpoint(tmp_path / "cut" / LAST)["state_dict"])
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_second_signal_stops_at_once_and_keeps_the_previous_checkpoint(prepared, tmp_path,
                                                                       default_sigint):
    t = Trainer(config(prepared, tmp_path, checkpoint_every=2))
    real = t.loss_fn

    def loss_fn(ps, ns):
        if t.model.training and t.state.global_step == 4:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(ps, ns)

    t.loss_fn = loss_fn
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert read_checkpoint(tmp_path / LAST)["train_state"]["global_step"] == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# the CLI in a real process, slowed down after step 5 so that the signal lands mid-epoch
DRIVER = """
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal
from acf_fast.training import steps as S
marker, argv = Path(sys.argv[1]), sys.argv[2:]
step = S.EagerStep.__call__
def slow(self, idx):
    if self.trainer.state.global_step == 5:
        marker.touch()
    if self.trainer.state.global_step >= 5:
        time.sleep(0.05)
    return step(self, idx)
S.EagerStep.__call__ = slow
from acf_fast.pipeline.cli import main
sys.exit(main(argv))
"""


def _cli_args(root, out):
    return ["--threads", "1", "train", str(root / "prep"), str(out), "--epochs", "2", "--model-dim", "16",
            "--lr", "1e-2", "--patience", "0", "--backend", "reference", "--val-rank-samples", "32",
            "--batch-size", "32"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_cli_signal_exits_with_one_line_and_resumes_bit_identically(prepared, tmp_path, signum):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    marker = tmp_path / "step5"
    proc = subprocess.Popen([sys.executable, str(driver), str(marker), *_cli_args(prepared, out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_marker(proc, marker, "training never reached step 5")
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if "interrupted" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"training interrupted by {name} at epoch 1, ")
    assert f"saved {out / LAST}" in lines[0] and "--resume" in lines[0]
    st = read_checkpoint(out / LAST)["train_state"]
    assert 0 < st["step"] < 20 and st["epoch"] == 0 and not st["finished"]   # mid-epoch, not per epoch
    if signum != signal.SIGINT:
        return                 # resuming after SIGTERM: test_signal_saves_at_the_step_boundary_...

    res = subprocess.run([sys.executable, "-m", "acf_fast", *_cli_args(prepared, out), "--resume"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    full = Trainer(config(prepared, tmp_path / "full", batch_size=32))   # same settings, in process
    full.fit()
    a, b = read_checkpoint(tmp_path / "full" / LAST), read_checkpoint(out / LAST)
    assert b["train_state"]["global_step"] == a["train_state"]["global_step"] == 40
    assert b["train_state"]["history"] == a["train_state"]["history"]
    assert same_parameters(a["state_dict"], b["state_dict"])
