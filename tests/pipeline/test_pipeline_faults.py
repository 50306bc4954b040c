"""evaluate / recommend / explain / extract under faults (Reliability II): a checkpoint of
another dataset, a damaged checkpoint or feature file, output paths of the wrong kind, a
read-only or full disk, and every library error the CLI's boundary turns into one line."""

import errno
import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest

import acf_fast.pipeline.recommend as recommend_module
from acf_fast.data.prepared import PreparedDataset
from acf_fast.data.sampling import prepare
from acf_fast.data.synth import synth
from acf_fast.evaluation.evaluate import evaluate
from acf_fast.model.checkpoint import read_checkpoint
from acf_fast.pipeline.cli import main as cli_main
from acf_fast.pipeline.explain import explain
from acf_fast.pipeline.recommend import recommend
from acf_fast.training import TrainConfig, train
from acf_fast.utils.outputs import atomic_write

from conftest import cli_error, resave
from disks import fill, make_read_only, needs_root, tmpfs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """30 users, 50 items, trained one short epoch on prep; prep2 is the same files prepared
    with another seed (same sizes, another dataset)."""
    root = tmp_path_factory.mktemp("faulty")
    s = synth(root / "data", n_users=30, n_items=50, n_concepts=4, feature_dim=8, images=False,
              heavy_users=1, median_interactions=30, progress=False)
    for name, seed in (("prep", 0), ("prep2", 1)):
        prepare(s["interactions"], s["features_h5"], root / name, n_train=300, n_validation=30,
                seed=seed, progress=False)
    train(TrainConfig(data_dir=str(root / "prep"), out_dir=str(root / "run"), epochs=1, model_dim=8,
                      progress=False, backend="reference"))
    return root, s


def command(name, ckpt, data, tmp_path):
    return {"evaluate": ["evaluate", str(ckpt), str(data), "--no-plot"],
            "recommend": ["recommend", str(ckpt), str(data), "--users", "0,1"],
            "explain": ["explain", str(ckpt), str(data), "--user", "0", "--out",
                        str(tmp_path / "e.png")]}[name] + ["--backend", "reference"]


# ---------------------------------------------------------------------------- item 2: the dataset
@pytest.mark.parametrize("name", ["evaluate", "recommend", "explain"])
def test_a_checkpoint_of_another_dataset_is_refused_unless_asked(tiny, tmp_path, capsys, name):
    root, _ = tiny
    ckpt = root / "run" / "best.pt"
    mine, other = (PreparedDataset(root / p).fingerprint for p in ("prep", "prep2"))
    line = cli_error(capsys, command(name, ckpt, root / "prep2", tmp_path))
    assert f"{ckpt} was trained on another dataset: fingerprint {mine} (recorded in {ckpt} when " \
           f"it was trained on {root / 'prep'}) is not {other} (of {root / 'prep2'}, from its " \
           "dataset.json)" in line
    assert "pass --any-dataset" in line
    assert not (tmp_path / "e.png").exists()
    assert cli_main(command(name, ckpt, root / "prep2", tmp_path) + ["--any-dataset"]) == 0
    capsys.readouterr()


def test_the_library_calls_check_the_dataset_too(tiny, tmp_path):
    root, _ = tiny
    ckpt = root / "run" / "best.pt"
    calls = [lambda **kw: evaluate(ckpt, root / "prep2", progress=False, print_table=False, **kw),
             lambda **kw: recommend(ckpt, root / "prep2", users=[0], **kw),
             lambda **kw: explain(ckpt, root / "prep2", 0, tmp_path / "x.png", **kw)]
    for call in calls:
        with pytest.raises(ValueError, match="trained on another dataset.*check_dataset=False"):
            call()
        call(check_dataset=False)


def test_a_checkpoint_without_a_fingerprint_is_used_unchecked(tiny, tmp_path):
    """Older files and the tutorial's own record no dataset: accepted as before."""
    root, _ = tiny
    old = resave(root / "run" / "best.pt", tmp_path / "old.pt", dataset_fingerprint=None)
    assert len(recommend(old, root / "prep2", users=[0, 1], k=3)) == 2


# ---------------------------------------------------------------------------- item 6: damaged inputs
def test_a_state_dict_missing_a_key_is_one_line_naming_the_file(tiny, tmp_path, capsys):
    root, _ = tiny
    state = read_checkpoint(root / "run" / "best.pt")["state_dict"]
    for key, message in [("item_model.weight", "its state_dict lacks item_model.weight: the file is "
                                                "damaged or not an ACF checkpoint"),
                         ("user_model.w_u.weight", "its state_dict does not fit the model it describes")]:
        bad = resave(root / "run" / "best.pt", tmp_path / "bad.pt",
                     state_dict={k: v for k, v in state.items() if k != key})
        for name in ("evaluate", "recommend", "explain"):
            line = cli_error(capsys, command(name, bad, root / "prep", tmp_path))
            assert f"{bad}: {message}" in line and key in line, line


def test_explain_with_a_short_image_name_list_is_one_line_naming_the_file(tiny, tmp_path, capsys):
    import h5py

    root, s = tiny
    short = tmp_path / "short.h5"
    shutil.copy(s["features_h5"], short)
    with h5py.File(short, "r+") as fh:
        names = fh["image_filenames"][:]
        del fh["image_filenames"]
        fh["image_filenames"] = names[:-5]                    # 45 names for 50 items
    (tmp_path / "images").mkdir()
    line = cli_error(capsys, ["explain", str(root / "run" / "best.pt"), str(root / "prep"), "--user",
                              "0", "--out", str(tmp_path / "e.png"), "--images", str(tmp_path / "images"),
                              "--features", str(short), "--backend", "reference"])
    assert str(short) in line and "names" in line
    assert not (tmp_path / "e.png").exists()


def test_a_truncated_history_is_one_line(tiny, tmp_path, capsys):
    root, _ = tiny
    prep = tmp_path / "prep"
    shutil.copytree(root / "prep", prep)
    data = (prep / "history.npz").read_bytes()
    (prep / "history.npz").write_bytes(data[:len(data) // 2])
    line = cli_error(capsys, command("recommend", root / "run" / "best.pt", prep, tmp_path))
    assert "history.npz" in line


# ---------------------------------------------------------------------------- item 6: output paths
@pytest.mark.parametrize("case", ["evaluate_out_is_a_file", "recommend_out_is_a_folder",
                                  "recommend_out_under_a_file", "recommend_out_suffix",
                                  "explain_out_is_a_folder", "extract_out_is_a_folder"])
def test_an_output_path_of_the_wrong_kind_is_refused_before_any_work(tiny, tmp_path, capsys,
                                                                     monkeypatch, case):
    root, _ = tiny
    ckpt, prep = root / "run" / "best.pt", root / "prep"
    a_file, a_folder = tmp_path / "a_file", tmp_path / "a_folder"
    a_file.write_text("keep me")
    a_folder.mkdir()

    def no_work(*a, **k):
        raise AssertionError("nothing may be loaded before the output path is checked")

    for module in ("acf_fast.evaluation.evaluate", "acf_fast.pipeline.recommend",
                   "acf_fast.pipeline.explain"):
        monkeypatch.setattr(f"{module}.load_model", no_work)
    monkeypatch.setattr("acf_fast.pipeline.extract.list_images", no_work)
    argv, message = {
        "evaluate_out_is_a_file": (["evaluate", str(ckpt), str(prep), "--out", str(a_file)],
                                   f"--out folder {a_file} is a file, not a folder"),
        "recommend_out_is_a_folder": (["recommend", str(ckpt), str(prep), "--out", str(a_folder)],
                                      f"output file {a_folder} must end in .json or .csv"),
        "recommend_out_under_a_file": (["recommend", str(ckpt), str(prep), "--out",
                                        str(a_file / "r.json")],
                                       f"cannot write output file {a_file / 'r.json'}: folder {a_file} "
                                       "is a file, not a folder"),
        "recommend_out_suffix": (["recommend", str(ckpt), str(prep), "--out", str(tmp_path / "r.txt")],
                                 "must end in .json or .csv"),
        "explain_out_is_a_folder": (["explain", str(ckpt), str(prep), "--user", "0", "--out",
                                     str(a_folder)], f"--out {a_folder} is a folder, not a file"),
        "extract_out_is_a_folder": (["extract", str(tmp_path), str(a_folder), "--random-weights"],
                                    f"output file {a_folder} is a folder, not a file"),
    }[case]
    line = cli_error(capsys, argv)
    assert message in line, line
    assert a_file.read_text() == "keep me" and os.listdir(a_folder) == []


def test_recommend_out_as_a_json_named_folder_is_refused(tiny, tmp_path, capsys):
    root, _ = tiny
    (tmp_path / "r.json").mkdir()
    line = cli_error(capsys, ["recommend", str(root / "run" / "best.pt"), str(root / "prep"),
                              "--out", str(tmp_path / "r.json")])
    assert f"output file {tmp_path / 'r.json'} is a folder, not a file" in line


@needs_root
@pytest.mark.parametrize("name", ["evaluate", "recommend", "explain"])
def test_a_read_only_output_location_is_one_line(tiny, tmp_path, capsys, name):
    root, _ = tiny
    with tmpfs(tmp_path / "disk", "1m") as disk:
        make_read_only(disk)
        out = {"evaluate": ["--out", str(disk / "ev")], "recommend": ["--out", str(disk / "r.json")],
               "explain": []}[name]
        argv = command(name, root / "run" / "best.pt", root / "prep", disk) + out
        line = cli_error(capsys, argv)
        assert "Read-only file system" in line and str(disk) in line
        assert os.listdir(disk) == []


@needs_root
def test_a_disk_that_fills_up_while_writing_the_report_leaves_no_half_file(tiny, tmp_path, capsys,
                                                                            monkeypatch):
    import acf_fast.evaluation.evaluate as E

    root, _ = tiny
    real = E.evaluate_groups

    def then_fill(*a, **k):
        out = real(*a, **k)
        fill(tmp_path / "disk")                    # full after the check, before the report
        return out

    monkeypatch.setattr(E, "evaluate_groups", then_fill)
    with tmpfs(tmp_path / "disk", "256k") as disk:
        line = cli_error(capsys, ["evaluate", str(root / "run" / "best.pt"), str(root / "prep"),
                                  "--out", str(disk / "ev"), "--backend", "reference"])
        assert f"No space left on device: {disk / 'ev' / 'metrics.json'}; free some space" in line
        assert [p for p in os.listdir(disk / "ev")] == []          # no metrics.json, no temp file


# ---------------------------------------------------------------------------- the CLI boundary
@pytest.mark.parametrize("error, expected", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/recs.json"),
     "No space left on device: /data/out/recs.json; free some space on that disk"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/out"),
     "Permission denied: /data/out; choose a folder you can write to"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/out"),
     "Is a directory: /data/out; give a file path, not a folder"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x"),
     "Read-only file system: /mnt/ro/x; choose a folder on a writable file system"),
    (KeyError("resnet50/layer4"), "lacks the entry 'resnet50/layer4'"),
    (IndexError("list index out of range"), "is damaged or truncated (IndexError: list index"),
    (zipfile.BadZipFile("File is not a zip file"), "is damaged or truncated (BadZipFile: File is"),
    (pickle.UnpicklingError("pickle data was truncated"), "(UnpicklingError: pickle data was truncated)"),
    (EOFError("Ran out of input"), "(EOFError: Ran out of input)"),
    (MemoryError(), "out of memory (MemoryError); lower train's --batch-size"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough "
                  "memory: you tried to allocate 11289600000 bytes.\nError in ..."),
     "out of memory (RuntimeError: [enforce fail"),
    (ValueError("two\nlines"), "acf-fast: error: two lines"),
])
def test_every_user_caused_error_is_one_line(tiny, tmp_path, capsys, monkeypatch, error, expected):
    root, _ = tiny

    def fails(*a, **k):
        raise error

    monkeypatch.setattr(recommend_module, "recommend", fails)
    line = cli_error(capsys, ["recommend", str(root / "run" / "best.pt"), str(root / "prep")])
    assert expected in line, line


def test_a_damaged_file_is_named_from_where_acf_fast_read_it(tiny, tmp_path, capsys, monkeypatch):
    """A library error without a file name: the boundary names the file acf_fast was reading."""
    root, _ = tiny

    def history(self):
        path = self.path("history")
        with open(path, "rb"):                    # a reader that fails on what it read
            raise IndexError("index 7 is out of bounds for axis 0 with size 3")

    monkeypatch.setattr(PreparedDataset, "history", history)
    line = cli_error(capsys, ["recommend", str(root / "run" / "best.pt"), str(root / "prep")])
    assert f"{root / 'prep' / 'history.npz'} is damaged or truncated (IndexError: index 7" in line


def test_a_bug_keeps_its_traceback(tiny, monkeypatch):
    """The boundary is for what a user can fix: a programming error is not swallowed."""
    root, _ = tiny

    def bug(*a, **k):
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    monkeypatch.setattr(recommend_module, "recommend", bug)
    with pytest.raises(AttributeError):
        cli_main(["recommend", str(root / "run" / "best.pt"), str(root / "prep")])


def test_atomic_write_leaves_the_old_file_or_none(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as fh:
            fh.write("half of the new")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]
    with atomic_write(tmp_path / "new.bin", "wb") as fh:
        fh.write(np.arange(3, dtype=np.int8).tobytes())
    assert (tmp_path / "new.bin").read_bytes() == b"\0\1\2"
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "new.bin"]
