"""The prepared folder is written whole or not at all, is replaced only on request, and a
file in it that is not the one `prepare` recorded is refused when it is read (issue
"Reliability II", item 2)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from acf_fast.data import prepared as prepared_mod
from acf_fast.data.history import UserHistory
from acf_fast.data.prepared import FILES, MANIFEST_FILE, PreparedDataset
from acf_fast.data.sampling import prepare
from acf_fast.data.synth import synth
from acf_fast.utils import atomic_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    s = synth(tmp_path_factory.mktemp("raw"), n_users=20, n_items=30, feature_dim=4, images=False,
              progress=False, formats=("npy",))
    return s["interactions"], s["features_npy"]


def run_prepare(raw, out, seed=0, **kwargs):
    return prepare(raw[0], raw[1], out, n_train=200, n_validation=20, seed=seed, holdout_baskets=2,
                   progress=False,
                   **kwargs)


def prepared(raw, out, seed=0, **kwargs) -> PreparedDataset:
    run_prepare(raw, out, seed, **kwargs)
    return PreparedDataset(out)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def read_all(folder):
    """Every file of a prepared folder through PreparedDataset (so every check runs)."""
    data = PreparedDataset(folder)
    return (data.triplets("train", 9), data.triplets("validation", 9), data.evaluation(),
            data.history(), data.fingerprint)


def siblings(folder):
    return sorted(p.name for p in Path(folder).parent.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------- replacing
def test_a_prepared_folder_is_replaced_only_with_overwrite(raw, tmp_path):
    out = tmp_path / "prep"
    run_prepare(raw, out)
    before, fp = snapshot(out), PreparedDataset(out).fingerprint
    with pytest.raises(ValueError, match=r"already holds a prepared dataset; pass --overwrite"):
        run_prepare(raw, out, seed=1)
    assert snapshot(out) == before                        # untouched
    run_prepare(raw, out, seed=1, overwrite=True)
    assert snapshot(out) != before and PreparedDataset(out).fingerprint != fp
    read_all(out)
    assert siblings(out) == []                             # no temporary or old folder left


def test_cli_prepare_refuses_in_one_line_and_replaces_with_overwrite(raw, tmp_path, capsys):
    from acf_fast.pipeline.cli import main

    args = ["prepare", str(raw[0]), str(raw[1]), str(tmp_path / "p"), "--n-train", "100",
            "--n-validation", "10"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a prepared dataset" in err and "--overwrite" in err
    assert main(args + ["--seed", "3", "--overwrite"]) == 0
    assert json.loads((tmp_path / "p" / MANIFEST_FILE).read_text())["seed"] == 3


def test_overwrite_never_deletes_a_folder_of_other_files(raw, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and is not a prepared dataset"):
        run_prepare(raw, notes, overwrite=True)
    assert (notes / "todo.txt").read_text() == "mine"
    run_prepare(raw, tmp_path / "prep")
    (tmp_path / "prep" / "run").mkdir()                    # a run put inside the prepared folder
    with pytest.raises(ValueError, match="is not empty and is not a prepared dataset"):
        run_prepare(raw, tmp_path / "prep", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        run_prepare(raw, tmp_path / "file")
    (tmp_path / "empty").mkdir()
    run_prepare(raw, tmp_path / "empty")                   # an empty folder needs no --overwrite
    read_all(tmp_path / "empty")


def test_replacing_without_an_atomic_exchange_also_works(raw, tmp_path, monkeypatch):
    """Where renameat2 is missing the old folder is renamed away, the new one in, the old deleted."""
    monkeypatch.setattr(atomic_folder, "_exchange", lambda a, b: False)
    out = tmp_path / "prep"
    run_prepare(raw, out)
    run_prepare(raw, out, seed=1, overwrite=True)
    assert PreparedDataset(out).manifest["seed"] == 1 and siblings(out) == []


@pytest.mark.parametrize("step, exchange", [("written", True), ("swapped", True),
                                            ("moved-old", False)])
def test_an_exception_while_replacing_keeps_one_whole_dataset(raw, tmp_path, monkeypatch, step,
                                                              exchange):
    out = tmp_path / "prep"
    run_prepare(raw, out)
    old = snapshot(out)
    if not exchange:
        monkeypatch.setattr(atomic_folder, "_exchange", lambda a, b: False)

    def fail(at):
        if at == step:
            raise RuntimeError(f"fault at {at}")

    monkeypatch.setattr(atomic_folder, "FAULT_HOOK", fail)
    with pytest.raises(RuntimeError, match="fault at"):
        run_prepare(raw, out, seed=1, overwrite=True)
    read_all(out)
    # before the swap the old dataset stays; after it the new one is complete
    assert (snapshot(out) == old) == (step != "swapped")
    assert siblings(out) == []


def test_a_failed_first_prepare_leaves_no_folder(raw, tmp_path, monkeypatch):
    def full_disk(at):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_folder, "FAULT_HOOK", full_disk)
    with pytest.raises(OSError, match="No space"):
        run_prepare(raw, tmp_path / "prep")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- SIGKILL
KILLER = r"""
import os, signal, sys
from acf_fast.data import sampling
from acf_fast.utils import atomic_folder

inter, feats, out, point = sys.argv[1:5]
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "mid-train-csv":            # killed while the new train CSV is half written
    def half_written(path, split, windows, user, *args, **kwargs):
        with open(path, "w") as fh:
            fh.write("profile,pi,ni,ui\n" + "1 2,2,5,0\n" * (user.size // 2) + "3 4")
            fh.flush()
            kill()
    sampling.write_triplets = half_written
else:
    atomic_folder.FAULT_HOOK = lambda at: kill() if at == point else None
    if point == "moved-old":
        atomic_folder._exchange = lambda a, b: False
sampling.prepare(inter, feats, out, n_train=200, n_validation=20, seed=1, holdout_baskets=2,
                 progress=False,
                 overwrite=True)
"""


def kill_prepare_at(raw, out, point):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(raw[0]), str(raw[1]), str(out), point],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.parametrize("point", ["mid-train-csv", "written", "swapped", "moved-old"])
def test_sigkill_during_prepare_over_an_old_dataset_never_leaves_a_mix(raw, tmp_path, point):
    """The issue's case: a prepare killed while replacing an older dataset used to leave the
    old dataset.json with a new, half-written train CSV, and train trained on the mix."""
    out = tmp_path / "prep"
    run_prepare(raw, out)
    old, old_fp = snapshot(out), PreparedDataset(out).fingerprint
    new_fp = prepared(raw, tmp_path / "new", seed=1).fingerprint
    kill_prepare_at(raw, out, point)
    if point == "moved-old":
        # killed between renaming the old folder away and the new one in: no folder, no mix
        with pytest.raises(FileNotFoundError, match="interrupted `prepare --overwrite`"):
            PreparedDataset(out)
        with pytest.raises(ValueError, match="already holds"):   # the next prepare restores it first
            run_prepare(raw, out, seed=2)
    fp = read_all(out)[-1]                                # every file matches the manifest
    if point == "swapped":
        assert fp == new_fp
    else:
        assert fp == old_fp and snapshot(out) == old
    assert all(s.startswith(".prep.tmp-") for s in siblings(out))   # at most an unused temp folder
    run_prepare(raw, out, seed=2, overwrite=True)         # a later prepare removes what is left
    assert siblings(out) == []


# ---------------------------------------------------------------------------- manifest
def test_manifest_records_rows_bytes_and_sha256_of_every_file(raw, tmp_path):
    m = run_prepare(raw, tmp_path / "prep")
    checks = m["checks"]
    assert set(checks) == set(FILES)
    for role, name in FILES.items():
        data = (tmp_path / "prep" / name).read_bytes()
        assert checks[role]["bytes"] == len(data)
        assert checks[role]["sha256"] == hashlib.sha256(data).hexdigest()
        if name.endswith(".csv"):
            assert checks[role]["rows"] == data.count(b"\n") - 1
    assert checks["train"]["rows"] == m["n_train_triplets"]
    assert checks["history"]["rows"] == m["n_users"]
    assert json.loads((tmp_path / "prep" / MANIFEST_FILE).read_text())["checks"] == checks


def test_fingerprint_covers_the_content(raw, tmp_path):
    a, b = prepared(raw, tmp_path / "a"), prepared(raw, tmp_path / "b")
    c = prepared(raw, tmp_path / "c", seed=1)
    assert a.fingerprint == b.fingerprint != c.fingerprint   # same inputs and settings: same data
    path = tmp_path / "a" / MANIFEST_FILE
    m = json.loads(path.read_text())
    m["checks"]["evaluation"]["sha256"] = "0" * 64
    path.write_text(json.dumps(m))
    assert PreparedDataset(tmp_path / "a").fingerprint != b.fingerprint


@pytest.mark.parametrize("text", ['{"n_users": 3, "n_it', "", "[1, 2]", '{"seed": 0}'])
def test_a_truncated_or_foreign_manifest_is_one_line_naming_it(raw, tmp_path, text):
    run_prepare(raw, tmp_path / "prep")
    (tmp_path / "prep" / MANIFEST_FILE).write_text(text)
    with pytest.raises(ValueError) as info:
        PreparedDataset(tmp_path / "prep")
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "prep" / MANIFEST_FILE) in msg and "prepare" in msg


# ---------------------------------------------------------------------------- reading checks
def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def flip_a_digit(path):
    data = bytearray(path.read_bytes())
    at = data.rindex(b"1")                                  # same size, another id
    data[at] = ord("2")
    path.write_bytes(bytes(data))


READ = {"train": lambda d: d.triplets("train", 9), "validation": lambda d: d.triplets("validation", 9),
        "evaluation": lambda d: d.evaluation(), "history": lambda d: d.history()}


@pytest.mark.parametrize("damage", [truncate, flip_a_digit])
@pytest.mark.parametrize("role", list(FILES))
def test_a_truncated_or_edited_file_is_refused_naming_it(raw, tmp_path, role, damage):
    """A train CSV truncated to half used to train on half; a truncated history.npz was a
    BadZipFile."""
    out = tmp_path / "prep"
    run_prepare(raw, out)
    path = out / FILES[role]
    damage(path)
    with pytest.raises(ValueError) as info:
        READ[role](PreparedDataset(out))
    msg = str(info.value)
    assert str(path) in msg and "truncated or changed" in msg and "acf-fast prepare" in msg
    assert "\n" not in msg


def test_swapped_files_are_refused(raw, tmp_path):
    run_prepare(raw, tmp_path / "a")
    run_prepare(raw, tmp_path / "b", seed=1)
    for name in FILES.values():                            # b's files under a's manifest
        (tmp_path / "a" / name).write_bytes((tmp_path / "b" / name).read_bytes())
    data = PreparedDataset(tmp_path / "a")
    for role in ("train", "validation"):                    # the seed changes the triplets only
        with pytest.raises(ValueError, match=f"{FILES[role]} was truncated or changed"):
            READ[role](data)


def test_a_truncated_history_alone_is_a_clear_value_error(raw, tmp_path):
    run_prepare(raw, tmp_path / "prep")
    path = tmp_path / "prep" / "history.npz"
    truncate(path)
    with pytest.raises(ValueError, match=r"history.npz is not a readable user history .*truncated"):
        UserHistory.load(path)
    np.savez(path, n_users=3, n_items=4, train_ptr=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"lacks \['train_items'"):
        UserHistory.load(path)


def test_each_file_is_hashed_once_per_dataset(raw, tmp_path, monkeypatch):
    run_prepare(raw, tmp_path / "prep")
    calls = []
    real = prepared_mod.sha256_file
    monkeypatch.setattr(prepared_mod, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    data = PreparedDataset(tmp_path / "prep")
    for _ in range(2):
        data.triplets("train", 9), data.evaluation(), data.history()
    assert calls == ["naive-user-train.csv", "naive-user-evaluation.csv"]   # history: hashed in memory


def test_a_manifest_without_checks_is_read_with_a_notice(raw, tmp_path, capsys):
    run_prepare(raw, tmp_path / "prep")
    path = tmp_path / "prep" / MANIFEST_FILE
    m = json.loads(path.read_text())
    del m["checks"]
    path.write_text(json.dumps(m))
    read_all(tmp_path / "prep")
    err = capsys.readouterr().err
    assert err.count("records no content hashes") == 1


def test_train_on_a_truncated_train_csv_is_one_line(raw, tmp_path, capsys):
    from acf_fast.pipeline.cli import main

    run_prepare(raw, tmp_path / "prep")
    truncate(tmp_path / "prep" / "naive-user-train.csv")
    rc = main(["train", str(tmp_path / "prep"), str(tmp_path / "run"), "--epochs", "1",
               "--backend", "reference", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "naive-user-train.csv was truncated or changed" in err
