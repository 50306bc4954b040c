"""Nothing that reads a file the user was sent runs code from it (Reliability II, item 1).

Each payload below is real: the test first shows that an ordinary load (torch.load with
weights_only=False, np.load with allow_pickle=True) runs it and creates the marker file,
then that acf_fast's loaders refuse the file by the name of what it asks for, with the
marker never created.
"""

import io
import os
import pickle
import shutil
import zipfile

import h5py
import numpy as np
import pytest
import torch

from acf_fast import ACF
from acf_fast.model.checkpoint import read_checkpoint
from acf_fast.model.features import cache_path, feature_names, load_feature_table
from acf_fast.testing import random_batch, random_model
from acf_fast.utils.safe_pickle import Refused, load_npy


class Exec:
    """Unpickling this runs `open(marker, "w")`: the issue's __reduce__ payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


class System:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def proves_real(load, path, marker):
    """The payload in `path` runs under an ordinary, unsafe load (on a copy)."""
    copy = path.with_name("unsafe-copy-" + path.name)
    shutil.copy(path, copy)
    try:
        load(copy)
    except Exception:
        pass
    assert marker.exists(), "the test payload did not run under the unsafe load"
    marker.unlink()
    copy.unlink()


def tutorial_checkpoint(model, **model_args):
    """What the tutorial's trainer saves: model_args hold the numpy id arrays its dataset
    hands over."""
    args = {"users": np.arange(model.num_users), "items": np.arange(model.num_items),
            "model_dim": np.int64(8), "feature_path": None, "tied_item_embedding": True}
    args.update(model_args)
    return {"epoch": 0, "loss": 1.0, "model_args": args, "state_dict": model.state_dict(),
            "optimizer": None}


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("payload, name", [(Exec, "builtins.exec"), (System, "posix.system")])
def test_a_checkpoint_payload_is_refused_and_never_runs(tmp_path, payload, name):
    marker = tmp_path / "marker"
    model = random_model(d=8, f=6, m=4)
    path = tmp_path / "evil.pt"
    torch.save(tutorial_checkpoint(model, users=payload(marker)), path)
    proves_real(lambda p: torch.load(p, weights_only=False), path, marker)

    with pytest.raises(ValueError, match=rf"evil.pt: refused to load this checkpoint: it names "
                                         rf"{name}\b") as err:
        read_checkpoint(path)
    assert "nothing in it was run" in str(err.value)
    with pytest.raises(ValueError, match=name):
        ACF.from_checkpoint(path, features=model.feature_table[1:])
    assert not marker.exists()


def test_the_tutorials_checkpoint_with_numpy_id_arrays_loads(tmp_path):
    model = random_model(n_users=4, n_items=7, d=8, f=6, m=4)
    path = tmp_path / "ACF_e0.pt"
    torch.save(tutorial_checkpoint(model, scale=np.float32(0.5), weights=np.ones(3)), path)
    ckpt = read_checkpoint(path)
    assert isinstance(ckpt["model_args"]["users"], np.ndarray)
    np.testing.assert_array_equal(ckpt["model_args"]["items"], np.arange(7))
    again = ACF.from_checkpoint(path, features=model.feature_table[1:])
    batch = random_batch(model)
    torch.testing.assert_close(again(*batch), model(*batch))


def _renamed_globals(path, out, old: bytes, new: bytes):
    """The checkpoint at `path` with `old` replaced by `new` in its pickle (GLOBAL names are
    newline-terminated text in torch's protocol 2)."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                assert old in data
                data = data.replace(old, new)
            dst.writestr(info, data)
    return out


def test_a_checkpoint_written_with_numpy_1_names_loads(tmp_path):
    """numpy 1.x pickles name numpy.core.multiarray, numpy 2.x numpy._core.multiarray."""
    model = random_model(n_users=4, n_items=7, d=8, f=6, m=4)
    torch.save(tutorial_checkpoint(model), tmp_path / "new.pt")
    old = _renamed_globals(tmp_path / "new.pt", tmp_path / "old.pt",
                           b"numpy._core.multiarray", b"numpy.core.multiarray")
    np.testing.assert_array_equal(read_checkpoint(old)["model_args"]["users"], np.arange(4))


@pytest.mark.parametrize("value, refused", [
    (np.array(["a", None], dtype=object), r"numpy.dtype\('O8'\)"),
    (np.array(["ab", "c"]), r"numpy.dtype\('<?U2'\)"),
    (np.zeros(2, dtype=[("a", "f4")]), r"numpy.dtype\("),
])
def test_a_checkpoint_with_non_numeric_numpy_values_is_refused(tmp_path, value, refused):
    model = random_model(d=8, f=6, m=4)
    torch.save(tutorial_checkpoint(model, extra=value), tmp_path / "c.pt")
    with pytest.raises(ValueError, match=rf"c.pt: refused to load this checkpoint: it names {refused}"):
        read_checkpoint(tmp_path / "c.pt")


# ---------------------------------------------------------------------------- .npy features
def tutorial_npy(path, n=5, f=4, name_of=str):
    arr = np.empty((n, 2), dtype=object)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr[i] = [name_of(f"{i}.jpg"), rng.standard_normal((f, 7, 7)).astype(np.float32)]
    np.save(path, arr, allow_pickle=True)
    return arr


@pytest.mark.parametrize("column", [0, 1])
def test_a_feature_npy_payload_is_refused_and_never_runs(tmp_path, column):
    marker = tmp_path / "marker"
    arr = tutorial_npy(tmp_path / "good.npy")
    arr[2, column] = Exec(marker)
    path = tmp_path / "features.npy"
    np.save(path, arr, allow_pickle=True)
    proves_real(lambda p: np.load(p, allow_pickle=True), path, marker)

    match = r"features.npy: refused to load this feature file: it names builtins.exec\b"
    with pytest.raises(ValueError, match=match):
        load_feature_table(path)
    with pytest.raises(ValueError, match=match):
        feature_names(path)                      # reads the source when there is no cache
    with pytest.raises(Refused):
        load_npy(path)
    assert not marker.exists()
    assert not cache_path(path, torch.float32).exists()


def test_the_npy_loader_reads_what_the_tutorial_format_holds(tmp_path):
    """Names as str, numpy str or bytes; grids of any numeric dtype; protocol 2 and 3."""
    for name_of in (str, np.str_, lambda s: s.encode()):
        arr = tutorial_npy(tmp_path / "f.npy", name_of=name_of)
        arr[1, 1] = arr[1, 1].astype(np.float64)
        arr[3, 1] = np.arange(4 * 49, dtype=np.int16).reshape(4, 7, 7)
        np.save(tmp_path / "f.npy", arr, allow_pickle=True)
        got = load_npy(tmp_path / "f.npy")
        want = np.load(tmp_path / "f.npy", allow_pickle=True)
        assert [type(x) for x in got[:, 0]] == [type(x) for x in want[:, 0]]
        for a, b in zip(got.ravel(), want.ravel()):
            np.testing.assert_array_equal(a, b)
    # the same array pickled with protocol 2 (bytes through _codecs.encode)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False,
                                               "shape": arr.shape})
    (tmp_path / "p2.npy").write_bytes(buf.getvalue() + pickle.dumps(arr, protocol=2))
    np.testing.assert_array_equal(load_npy(tmp_path / "p2.npy")[2, 1], arr[2, 1])
    np.save(tmp_path / "plain.npy", np.eye(3))   # no pickle at all
    np.testing.assert_array_equal(load_npy(tmp_path / "plain.npy"), np.eye(3))


def test_the_npy_loader_refuses_other_objects_by_name(tmp_path):
    from collections import OrderedDict

    arr = tutorial_npy(tmp_path / "f.npy")
    arr[0, 0] = OrderedDict(a=1)
    np.save(tmp_path / "f.npy", arr, allow_pickle=True)
    with pytest.raises(Refused, match=r"f.npy: .* it names collections.OrderedDict\b"):
        load_npy(tmp_path / "f.npy")
    arr[0, 0] = np.zeros(2, dtype=[("a", "f4")])
    np.save(tmp_path / "g.npy", arr, allow_pickle=True)
    with pytest.raises(Refused, match=r"it names numpy.dtype\("):
        load_npy(tmp_path / "g.npy")


# ---------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from acf_fast.data.sampling import prepare
    from acf_fast.data.synth import synth

    root = tmp_path_factory.mktemp("safe")
    s = synth(root / "data", n_users=20, n_items=30, n_concepts=3, feature_dim=8, images=False,
              heavy_users=1, median_interactions=20, progress=False)
    prepare(s["interactions"], s["features_h5"], root / "prep", n_train=100, n_validation=10,
            progress=False)
    return root, s


def test_recommend_refuses_a_payload_checkpoint(dataset, tmp_path, capsys):
    """The issue's case: `recommend` ran the payload, then exited 0."""
    from acf_fast.pipeline.cli import main

    root, _ = dataset
    marker = tmp_path / "marker"
    model = random_model(n_users=20, n_items=30, d=8, f=8, m=49)
    torch.save(tutorial_checkpoint(model, users=Exec(marker)), tmp_path / "evil.pt")
    rc = main(["recommend", str(tmp_path / "evil.pt"), str(root / "prep"), "--users", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("acf-fast: error:")
    assert "evil.pt: refused to load this checkpoint: it names builtins.exec" in err
    assert not marker.exists()


def test_prepare_refuses_a_payload_feature_file(dataset, tmp_path, capsys):
    """The issue's case: `prepare` ran the payload of a feature .npy."""
    from acf_fast.pipeline.cli import main

    _, s = dataset
    marker = tmp_path / "marker"
    arr = np.empty((30, 2), dtype=object)          # the tutorial's layout, from synth's .h5
    with h5py.File(s["features_h5"]) as fh:
        for i, grid in enumerate(fh["resnet50/layer4"][:]):
            arr[i] = [f"item_{i:06d}.png", grid]
    arr[0, 0] = Exec(marker)
    np.save(tmp_path / "features.npy", arr, allow_pickle=True)
    rc = main(["prepare", s["interactions"], str(tmp_path / "features.npy"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "features.npy: refused to load this feature file: it names builtins.exec" in err
    assert not marker.exists()
