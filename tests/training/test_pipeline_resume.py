"""Checkpoints: tutorial format, atomic, and a resumed run continues exactly (issues 5 and 6)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from acf_fast.model.checkpoint import read_checkpoint
from acf_fast.model.acf import ACF
from acf_fast.training import BEST, LAST, Trainer
from acf_fast.training.sampler import epoch_permutation

from conftest import tiny_prepared_dataset, tiny_train_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return tiny_prepared_dataset(tmp_path_factory.mktemp("resume"))


def config(root, out, **kw):
    return tiny_train_config(root, out, **{"checkpoint_every": 3, **kw})


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert torch.equal(epoch_permutation(100, 0, 3), epoch_permutation(100, 0, 3))
    assert not torch.equal(epoch_permutation(100, 0, 3), epoch_permutation(100, 0, 4))
    assert not torch.equal(epoch_permutation(100, 0, 3), epoch_permutation(100, 1, 3))


def test_resume_mid_epoch_gives_identical_losses(prepared, tmp_path):
    full = Trainer(config(prepared, tmp_path / "full"))
    full.fit()
    losses = full.step_losses
    assert len(losses) == 10                                  # 2 epochs x 5 batches of 128

    cut = Trainer(config(prepared, tmp_path / "cut", max_steps=7))
    cut.fit()                                                 # stops mid-epoch after 7 steps
    ckpt = read_checkpoint(tmp_path / "cut" / LAST)           # and saves them (not only step 6's)
    assert ckpt["train_state"]["global_step"] == 7 and ckpt["train_state"]["step"] == 2
    assert not ckpt["train_state"]["finished"]
    assert cut.step_losses == losses[:7]

    resumed = Trainer(config(prepared, tmp_path / "cut"))
    assert resumed.resume()
    resumed.fit()
    assert resumed.step_losses == losses[7:]                  # bit-identical, not approximately
    assert resumed.state.history == full.state.history
    a = read_checkpoint(tmp_path / "full" / LAST)["state_dict"]
    b = read_checkpoint(tmp_path / "cut" / LAST)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_are_tutorial_format_and_load(prepared, tmp_path):
    t = Trainer(config(prepared, tmp_path, epochs=1, checkpoint_every=0))
    t.fit()
    for name in (BEST, LAST):
        ckpt = read_checkpoint(tmp_path / name)
        for key in ("epoch", "loss", "model_args", "state_dict", "optimizer"):
            assert key in ckpt
        assert "user_model.feats.dim_reductor.weight" in ckpt["state_dict"]
        assert "train_state" in ckpt and "train_config" in ckpt
    model = ACF.from_checkpoint(tmp_path / BEST, backend="reference")
    u = torch.tensor([0, 1])
    p = torch.tensor([[1, 2, 0], [3, 0, 0]])
    ref = t.model.user_vectors(u, p)[0]
    assert torch.equal(model.user_vectors(u, p)[0], ref)
    assert (tmp_path / "history.json").exists()
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]   # no temporary files left behind


def test_resume_refuses_a_different_setup(prepared, tmp_path):
    Trainer(config(prepared, tmp_path, epochs=1)).fit()
    other = Trainer(config(prepared, tmp_path, epochs=1, batch_size=64))
    with pytest.raises(ValueError, match="batch_size=128"):
        other.resume()


def _train_cmd(root, out, epochs):
    return [sys.executable, "-m", "acf_fast", "--threads", "1", "train", str(root / "prep"), str(out), "--epochs",
            str(epochs), "--model-dim", "16", "--lr", "1e-2", "--checkpoint-every", "2", "--patience", "0",
            "--backend", "reference", "--val-rank-samples", "32", "--batch-size", "32"]


def _train(cmd, env, what):
    """Run a training command to the end; a failure shows its stderr."""
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{what} exited with {res.returncode}:\n{res.stderr[-4000:]}"


def test_sigkill_then_resume_matches_uninterrupted_run(prepared, tmp_path):
    """A real process killed with SIGKILL mid-epoch, resumed from last.pt, ends bit-identical."""
    env = dict(os.environ, ACF_FAST_BACKEND="reference", OMP_NUM_THREADS="1")
    epochs = 2
    _train(_train_cmd(prepared, tmp_path / "full", epochs), env, "the uninterrupted run")

    out = tmp_path / "killed"
    log = tmp_path / "killed.stderr"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(_train_cmd(prepared, out, epochs), env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    killed_at = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if (out / LAST).exists():
                try:
                    st = read_checkpoint(out / LAST)["train_state"]
                except ValueError:
                    st = None                   # cannot happen with atomic writes; retry anyway
                if st and st["global_step"] >= 6 and st["step"] > 0 and not st["finished"]:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    killed_at = st["global_step"]
                    break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if killed_at is None:
        stderr = log.read_text(errors="replace")[-4000:]
        if proc.returncode == 0:
            pytest.skip("training finished before it could be killed (machine too fast for this check)")
        if proc.returncode == -signal.SIGKILL and time.time() >= deadline:
            pytest.fail(f"training reached no mid-epoch checkpoint past step 6 in 240 s:\n{stderr}")
        pytest.fail(f"training exited with {proc.returncode} before it could be killed:\n{stderr}")
    _train(_train_cmd(prepared, out, epochs) + ["--resume"], env, "the resumed run")
    a = read_checkpoint(tmp_path / "full" / LAST)
    b = read_checkpoint(out / LAST)
    assert b["train_state"]["global_step"] == a["train_state"]["global_step"]
    assert b["train_state"]["history"] == a["train_state"]["history"]
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
