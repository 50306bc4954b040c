"""The run folder under faults (Reliability II): two runs into one folder, a full or
read-only disk, an output path of the wrong kind, resuming a checkpoint of another
dataset or of an older format, a state dict that lacks a key. Each ends with one clear
error, the files on disk intact and nothing half-written."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from acf_fast.data.prepared import PreparedDataset
from acf_fast.data.sampling import prepare
from acf_fast.model.checkpoint import read_checkpoint
from acf_fast.pipeline.cli import main as cli_main
from acf_fast.training import (BEST, HISTORY, LAST, CheckpointWriteError, RunFolderInUse, Trainer,
                               train)
from acf_fast.training import trainer as trainer_module
from acf_fast.training.run_lock import LOCK_NAME

from conftest import cli_error, resave, tiny_prepared_dataset, tiny_train_config, wait_for_marker
from disks import fill, make_read_only, needs_root, tmpfs

pytestmark = pytest.mark.usefixtures("one_thread")

config = tiny_train_config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The tiny dataset, and a second preparation of the same files with another seed: the
    same users and items (sizes), another dataset (fingerprint)."""
    root = tiny_prepared_dataset(tmp_path_factory.mktemp("faults"))
    m = PreparedDataset(root / "prep").manifest
    prepare(m["interactions"], m["features"], root / "prep2", n_train=640, n_validation=64, seed=1,
            progress=False)
    return root


def leftovers(folder):
    """Temporary or lock files left in a folder."""
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or p.name == LOCK_NAME)


def cli_train(root, out, *extra):
    return ["--threads", "1", "train", str(root / "prep"), str(out), "--epochs", "2", "--model-dim",
            "16", "--lr", "1e-2", "--patience", "0", "--backend", "reference", "--val-rank-samples",
            "32", *extra]


# ---------------------------------------------------------------------------- item 3: one run per folder
# the CLI in a real process that stops at step 2 until the test lets it go (or kills it)
HOLDER = """
import sys, time
from pathlib import Path
from acf_fast.training import steps as S
marker, release, argv = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
step = S.EagerStep.__call__
def held(self, idx):
    if self.trainer.state.global_step == 2:
        marker.touch()
        deadline = time.time() + 120
        while not release.exists() and time.time() < deadline:
            time.sleep(0.02)
    return step(self, idx)
S.EagerStep.__call__ = held
from acf_fast.pipeline.cli import main
sys.exit(main(argv))
"""


def test_a_second_run_into_a_busy_folder_is_refused_naming_the_holder(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    driver, marker, release = tmp_path / "holder.py", tmp_path / "at_step_2", tmp_path / "go"
    driver.write_text(HOLDER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(driver), str(marker), str(release),
                             *cli_train(prepared, out, "--batch-size", "32")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_marker(proc, marker, "the first run never reached step 2")
        holder = f"pid {proc.pid} on host {socket.gethostname()}"
        # the library: refused before any data is read
        with pytest.raises(RunFolderInUse, match=f"{out} is in use by another training run "
                                                 rf"\({holder}, started .*train .*\); wait for it"):
            train(config(prepared, out))
        with pytest.raises(RunFolderInUse, match=holder):
            train(config(prepared, out), resume=True)
        with pytest.raises(RunFolderInUse, match=holder):          # --overwrite does not bypass it
            train(config(prepared, out, overwrite=True))
        # the command line: one line naming the holder, exit 2
        line = cli_error(capsys, cli_train(prepared, out, "--batch-size", "32", "--resume"))
        assert holder in line and "train into another folder" in line
        assert not (out / LAST).exists()                          # the second run wrote nothing
        proc.send_signal(signal.SIGKILL)                          # the holder dies at the marker
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # a killed holder's lock goes with it: the next run takes the folder at once
    assert (out / LOCK_NAME).exists()
    s = train(config(prepared, out, batch_size=32), resume=True)
    assert s["epochs_done"] == 2
    assert leftovers(out) == []                                   # lock file removed at the end


def test_the_lock_is_held_for_the_whole_run_and_released_after_an_error(prepared, tmp_path):
    out = tmp_path / "run"
    seen = []
    t = Trainer(config(prepared, out, epochs=1, max_steps=2))
    real = t.loss_fn

    def loss_fn(ps, ns):
        seen.append((out / LOCK_NAME).exists())
        info = json.loads((out / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        return real(ps, ns)

    t.loss_fn = loss_fn
    t.fit()
    assert seen == [True, True] and leftovers(out) == []
    t = Trainer(config(prepared, tmp_path / "bad", epochs=1, lr=1e30))
    with pytest.raises(ValueError, match="training diverged"):
        t.fit()
    assert leftovers(tmp_path / "bad") == []


# ---------------------------------------------------------------------------- item 6: output paths
def test_output_path_of_the_wrong_kind_is_refused_before_any_work(prepared, tmp_path, capsys,
                                                                  monkeypatch):
    def no_trainer(*a, **k):
        raise AssertionError("the Trainer (data, model) must not be built for a bad output path")

    monkeypatch.setattr(trainer_module, "Trainer", no_trainer)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    with pytest.raises(ValueError, match=f"output folder {a_file} is a file, not a folder"):
        train(config(prepared, a_file))
    with pytest.raises(ValueError, match=f"cannot create output folder {a_file / 'run'}: Not a "
                                         "directory; a part of the path is a file"):
        train(config(prepared, a_file / "run"))
    line = cli_error(capsys, cli_train(prepared, a_file))
    assert str(a_file) in line and "is a file, not a folder" in line
    assert a_file.read_text() == "not a folder"


def test_a_run_that_fails_before_writing_leaves_no_folder_behind(prepared, tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        train(config(prepared, out, data_dir=str(tmp_path / "no_data")))
    assert not (tmp_path / "new").exists()


@needs_root
def test_read_only_output_folder_is_refused_before_training(prepared, tmp_path, capsys, monkeypatch):
    def no_trainer(*a, **k):
        raise AssertionError("the Trainer must not be built for a read-only output folder")

    monkeypatch.setattr(trainer_module, "Trainer", no_trainer)
    with tmpfs(tmp_path / "disk", "1m") as disk:
        (disk / "run").mkdir()
        make_read_only(disk)
        with pytest.raises(ValueError, match=f"output folder {disk / 'run'} is not writable: Read-only "
                                             "file system; choose a folder on a writable file system"):
            train(config(prepared, disk / "run"))
        with pytest.raises(ValueError, match=f"cannot create output folder {disk / 'new'}: "
                                             "Read-only file system"):
            train(config(prepared, disk / "new"))
        line = cli_error(capsys, cli_train(prepared, disk / "run"))
        assert f"{disk / 'run'} is not writable: Read-only file system" in line
        assert os.listdir(disk / "run") == []


# ---------------------------------------------------------------------------- item 6: a full disk
@needs_root
def test_disk_without_room_for_one_checkpoint_is_refused_before_the_first_step(prepared, tmp_path):
    with tmpfs(tmp_path / "disk", "16k") as disk:
        t = Trainer(config(prepared, disk / "run"))
        real, steps = t.loss_fn, []
        t.loss_fn = lambda ps, ns: steps.append(1) or real(ps, ns)
        with pytest.raises(ValueError, match=r"run has \d+ KiB free, but one checkpoint of this "
                                             r"model needs about \d+ KiB: free some space"):
            t.fit()
        assert steps == [] and os.listdir(disk / "run") == []


@needs_root
def test_full_disk_at_a_checkpoint_keeps_the_last_good_one(prepared, tmp_path, capsys, monkeypatch):
    """The disk fills up after epoch 1 (a fault hook after its history is written): epoch
    2's checkpoint fails with one line naming it; epoch 1's last.pt stays, no temp file."""
    from acf_fast.training.run_folder import RunFolder

    real = RunFolder.write_history

    def then_fill(self, history):
        real(self, history)
        fill(self.out.parent)

    monkeypatch.setattr(RunFolder, "write_history", then_fill)
    with tmpfs(tmp_path / "disk", "2m") as disk:
        out = disk / "run"
        line = cli_error(capsys, cli_train(prepared, out))
        assert f"cannot write {out}/" in line and "No space left on device" in line
        assert "free some space on that disk" in line and "--resume continues from last.pt" in line
        assert read_checkpoint(out / LAST)["train_state"]["global_step"] == 5   # epoch 1's
        assert len(json.loads((out / HISTORY).read_text())) == 1
        assert leftovers(out) == []
        (disk / "filler").unlink()                                 # room again: resume finishes
        monkeypatch.setattr(RunFolder, "write_history", real)
        assert cli_main(cli_train(prepared, out, "--resume")) == 0
        assert read_checkpoint(out / LAST)["train_state"]["global_step"] == 10


def test_a_failed_checkpoint_write_names_the_file_and_keeps_the_previous_one(prepared, tmp_path,
                                                                             monkeypatch):
    """The same on any machine: the writer fails with ENOSPC at the 3rd checkpoint."""
    import acf_fast.model.checkpoint as C

    real, calls = C.save_checkpoint, []

    def failing(ckpt, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(ckpt, path)

    monkeypatch.setattr(C, "save_checkpoint", failing)
    out = tmp_path / "run"
    with pytest.raises(CheckpointWriteError, match=f"cannot write {out}/(last|best).pt: No space "
                                                   "left on device; free some space on that disk.*"
                                                   f"keep the last good state"):
        train(config(prepared, out, checkpoint_every=2))
    assert read_checkpoint(out / LAST)["train_state"]["global_step"] in (2, 4)
    assert leftovers(out) == []


# ---------------------------------------------------------------------------- item 2: the dataset
def test_checkpoints_record_the_dataset_and_resume_refuses_another(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    train(config(prepared, out, epochs=1))
    fingerprint = PreparedDataset(prepared / "prep").fingerprint
    other = PreparedDataset(prepared / "prep2").fingerprint
    assert fingerprint != other
    for name in (LAST, BEST):
        assert read_checkpoint(out / name)["dataset_fingerprint"] == fingerprint
    with pytest.raises(ValueError) as info:
        train(config(prepared, out, epochs=2, data_dir=str(prepared / "prep2")), resume=True)
    message = str(info.value)
    assert f"{out / LAST} was trained on another dataset: fingerprint {fingerprint} " in message
    assert f"recorded in {out / LAST} when it was trained on {prepared / 'prep'}" in message
    assert f"is not {other} (of {prepared / 'prep2'}, from its dataset.json)" in message
    assert "--any-dataset (library: check_dataset=False)" in message
    line = cli_error(capsys, ["train", str(prepared / "prep2"), str(out), "--epochs", "2",
                              "--model-dim", "16", "--backend", "reference", "--resume"])
    assert fingerprint in line and other in line and "--any-dataset" in line
    assert read_checkpoint(out / LAST)["epoch"] == 1                  # nothing was trained
    # on purpose: resumed, and the new checkpoints record the dataset they continue on
    s = train(config(prepared, out, epochs=2, data_dir=str(prepared / "prep2"), check_dataset=False),
              resume=True)
    assert s["epochs_done"] == 2
    assert read_checkpoint(out / LAST)["dataset_fingerprint"] == other


def test_a_checkpoint_without_a_fingerprint_resumes_unchecked(prepared, tmp_path):
    out = tmp_path / "run"
    train(config(prepared, out, epochs=1, data_dir=str(prepared / "prep2")))
    resave(out / LAST, dataset_fingerprint=None)                      # an older file
    assert train(config(prepared, out, epochs=2), resume=True)["epochs_done"] == 2


# ---------------------------------------------------------------------------- item 7: older formats
def test_resume_refuses_an_older_format_instead_of_resetting_the_best_score(prepared, tmp_path,
                                                                          capsys):
    out = tmp_path / "run"
    train(config(prepared, out, epochs=1))
    st = read_checkpoint(out / LAST)["train_state"]
    resave(out / LAST, train_state={k: v for k, v in st.items() if k not in ("best", "history")})
    before = (out / LAST).read_bytes()
    with pytest.raises(ValueError, match=f"cannot resume {out / LAST}: its train_state \\(an older "
                                         "format\\) lacks best, history, and resuming would silently "
                                         "reset them"):
        train(config(prepared, out, epochs=2), resume=True)
    line = cli_error(capsys, cli_train(prepared, out, "--resume"))
    assert "lacks best, history" in line and "--overwrite" in line
    assert (out / LAST).read_bytes() == before           # refused, not rewritten
    resave(out / LAST, train_state={**st, "ema": 0.5})
    with pytest.raises(ValueError, match="has ema, which this acf_fast does not know"):
        train(config(prepared, out, epochs=2), resume=True)
    resave(out / LAST, train_state=st, optimizer=None)
    with pytest.raises(ValueError, match="it holds no optimizer state"):
        train(config(prepared, out, epochs=2), resume=True)
    assert (out / HISTORY).exists()


def test_resume_with_a_state_dict_missing_a_key_is_one_clear_error(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    train(config(prepared, out, epochs=1))
    state = read_checkpoint(out / LAST)["state_dict"]
    resave(out / LAST, state_dict={k: v for k, v in state.items() if k != "user_model.w_u.weight"})
    with pytest.raises(ValueError, match=f"cannot resume {out / LAST}: its state_dict does not fit "
                                         "this run's model .*user_model.w_u.weight"):
        train(config(prepared, out, epochs=2), resume=True)
    line = cli_error(capsys, cli_train(prepared, out, "--resume"))
    assert "user_model.w_u.weight" in line and str(out / LAST) in line
