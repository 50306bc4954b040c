"""Feature store: the tutorial's .npy and .h5 layouts, the cache, dtypes and bad files."""

import os

import h5py
import numpy as np
import pytest
import torch

from acf_fast import ACF
from acf_fast.model.features import cache_path, feature_names, load_feature_table, table_from_tensor


def grids(n=5, f=6, seed=0):
    return np.random.default_rng(seed).standard_normal((n, f, 7, 7)).astype(np.float32)


def write_npy(path, g):
    arr = np.empty((g.shape[0], 2), dtype=object)
    for i in range(g.shape[0]):
        arr[i, 0] = f"img_{i}.jpg"
        arr[i, 1] = g[i]
    np.save(path, arr, allow_pickle=True)
    return path


def write_h5(path, g):
    with h5py.File(path, "w") as fh:
        fh["image_filenames"] = np.array([f"img_{i}.jpg".encode() for i in range(g.shape[0])])
        fh["resnet50/layer4"] = g
    return path


def expected_table(g):
    comps = torch.from_numpy(g).flatten(2).transpose(1, 2)  # component m = h * 7 + w
    return torch.cat([torch.zeros(1, 49, g.shape[1]), comps])


@pytest.mark.parametrize("writer", [write_npy, write_h5])
def test_both_formats_give_the_same_table(tmp_path, writer):
    g = grids()
    path = writer(tmp_path / ("f.npy" if writer is write_npy else "f.h5"), g)
    table = load_feature_table(path)
    assert table.shape == (6, 49, 6) and table.dtype == torch.float32
    torch.testing.assert_close(table, expected_table(g))
    assert table[3, 7 * 2 + 5, 4] == float(g[2, 4, 2, 5])  # item id 3 = row 2, cell (2, 5), channel 4
    assert feature_names(path) == [f"img_{i}.jpg" for i in range(5)]


def test_cache_is_reused_and_rebuilt_when_source_changes(tmp_path):
    path = write_npy(tmp_path / "f.npy", grids())
    load_feature_table(path)
    cache = cache_path(path, torch.float32)
    stamp = cache.stat().st_mtime_ns
    load_feature_table(path)
    assert cache.stat().st_mtime_ns == stamp
    g2 = grids(seed=1)
    write_npy(path, g2)
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    torch.testing.assert_close(load_feature_table(path), expected_table(g2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_tables(tmp_path, dtype):
    g = grids()
    path = write_h5(tmp_path / "f.h5", g)
    table = load_feature_table(path, dtype)
    assert table.dtype == dtype
    torch.testing.assert_close(table, expected_table(g).to(dtype))


def test_model_from_feature_file_matches_in_memory(tmp_path):
    g = grids(n=8)
    path = write_npy(tmp_path / "f.npy", g)
    a = ACF(list(range(3)), list(range(8)), str(path), model_dim=4)
    torch.manual_seed(0)
    b = ACF(3, 8, features=torch.from_numpy(g), model_dim=4)
    b.load_state_dict(a.state_dict())
    ids = torch.tensor([[1, 8, 0]])
    torch.testing.assert_close(a(torch.tensor([1]), ids, torch.tensor([2]), torch.tensor([3])),
                               b(torch.tensor([1]), ids, torch.tensor([2]), torch.tensor([3])))


@pytest.mark.parametrize("layout", ["channels_first", "channels_last", "components"])
def test_in_memory_layouts(layout):
    g = torch.from_numpy(grids())
    x = {"channels_first": g, "channels_last": g.permute(0, 2, 3, 1),
         "components": g.flatten(2).transpose(1, 2)}[layout]
    torch.testing.assert_close(table_from_tensor(x), expected_table(grids()))


def test_nan_features_are_refused_naming_the_item(tmp_path):
    g = grids()
    g[3, 0, 1, 1] = np.nan
    with pytest.raises(ValueError, match="item row 3 .item id 4"):
        load_feature_table(write_npy(tmp_path / "f.npy", g))
    with pytest.raises(ValueError, match="NaN or inf"):
        table_from_tensor(torch.from_numpy(g))
    g[3, 0, 1, 1] = np.inf
    with pytest.raises(ValueError, match="item row 3 .item id 4.*NaN or inf"):
        ACF(3, 5, features=torch.from_numpy(g))
    assert not cache_path(tmp_path / "f.npy", torch.float32).exists()


def test_values_beyond_float16_are_refused_not_made_inf(tmp_path):
    g = grids()
    g[2, 1, 3, 3] = 7e4  # finite in float32, inf in float16 (max 65504)
    with pytest.raises(ValueError, match=r"item row 2 .item id 3. exceed the float16 range"):
        table_from_tensor(torch.from_numpy(g), torch.float16)
    with pytest.raises(ValueError, match="exceed the float16 range"):
        load_feature_table(write_npy(tmp_path / "f.npy", g), torch.float16)
    assert not cache_path(tmp_path / "f.npy", torch.float16).exists()
    # bfloat16 has float32's range: the same features are fine there
    assert torch.isfinite(table_from_tensor(torch.from_numpy(g), torch.bfloat16).float()).all()


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_feature_table(tmp_path / "missing.npy")
    np.save(tmp_path / "plain.npy", np.zeros((3, 4)))
    with pytest.raises(ValueError, match="object array"):
        load_feature_table(tmp_path / "plain.npy")
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file")
    with pytest.raises(ValueError, match="not a readable"):
        load_feature_table(tmp_path / "junk.npy")
    with h5py.File(tmp_path / "bad.h5", "w") as fh:
        fh["resnet50/layer4"] = np.zeros((2, 4, 5, 5), np.float32)
    with pytest.raises(ValueError, match=r"\(N, F, 7, 7\)"):
        load_feature_table(tmp_path / "bad.h5")
    (tmp_path / "f.csv").write_text("x")
    with pytest.raises(ValueError, match="unknown feature format"):
        load_feature_table(tmp_path / "f.csv")
    with pytest.raises(ValueError, match=r"\[N, 7, 7, F\]"):
        table_from_tensor(torch.zeros(3, 5, 5, 2))


def test_truncated_or_corrupted_cache_is_refused(tmp_path):
    path = write_npy(tmp_path / "f.npy", grids())
    load_feature_table(path)
    cache = cache_path(path, torch.float32)
    good = cache.read_bytes()
    cache.write_bytes(good[:200])
    with pytest.raises(ValueError, match="corrupt feature cache .truncated"):
        load_feature_table(path)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x40  # one bit inside the data: same size, wrong values
    cache.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_feature_table(path)
    load_feature_table(path, verify=False)  # size-only check on request (huge caches)
    meta_at = bytes(flipped).rindex(b'{"source"')      # the entry's metadata: unreadable
    cache.write_bytes(bytes(flipped[:meta_at]) + b"{not json" + bytes(flipped[meta_at + 9:]))
    torch.testing.assert_close(load_feature_table(path), expected_table(grids()))  # rebuilt


def test_item_count_mismatch_is_refused():
    with pytest.raises(ValueError, match="feature table has 5 items but item ids go up to 9"):
        ACF(3, list(range(9)), features=torch.rand(5, 49, 4))


def test_table_follows_device_and_not_the_state_dict():
    m = ACF(3, 5, features=torch.rand(5, 49, 4), model_dim=4)
    assert "feature_table" not in m.state_dict()
    assert m.double().feature_table.dtype == torch.float64


def test_features_on_host_stay_on_host_when_the_module_moves():
    m = ACF(3, 5, features=torch.rand(5, 49, 4), model_dim=4, features_on_host=True)
    m.to("meta")
    assert m.item_model.weight.device.type == "meta"
    assert m.feature_table.device.type == "cpu"
    m2 = ACF(3, 5, features=torch.rand(5, 49, 4), model_dim=4).to("meta")
    assert m2.feature_table.device.type == "meta"


# ---------------------------------------------------------------- read-only feature folders
from acf_fast.model import features as F  # noqa: E402


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A dataset folder this process cannot write to, as on a read-only mount (os.access
    reports it unwritable; as root, chmod alone would not stop the writes)."""
    data = tmp_path / "shared"
    data.mkdir()
    real_access = os.access
    monkeypatch.setattr(F.os, "access", lambda p, mode, *a, **k: False if (
        mode & os.W_OK and os.path.abspath(p).startswith(str(data))) else real_access(p, mode, *a, **k))
    monkeypatch.setenv("ACF_FAST_CACHE_DIR", str(tmp_path / "user-cache"))
    return data


@pytest.mark.parametrize("writer", [write_npy, write_h5])
def test_a_read_only_folder_caches_in_the_user_folder(read_only, tmp_path, capsys, writer):
    g = grids()
    path = writer(read_only / ("f.npy" if writer is write_npy else "f.h5"), g)
    model = ACF(list(range(3)), list(range(5)), str(path), model_dim=4)
    torch.testing.assert_close(model.feature_table, expected_table(g))
    notice = [line for line in capsys.readouterr().err.splitlines() if "feature cache" in line]
    assert len(notice) == 1 and "not writable" in notice[0] and "ACF_FAST_CACHE_DIR" in notice[0]
    assert sorted(p.name for p in read_only.iterdir()) == [path.name]     # nothing written there
    cache = F.user_cache_path(path, torch.float32)
    assert cache.parent == tmp_path / "user-cache" and cache.exists()
    assert F.existing_cache(path, torch.float32) == cache
    stamp = cache.stat().st_mtime_ns
    torch.testing.assert_close(load_feature_table(path), expected_table(g))  # reused, not rebuilt
    assert cache.stat().st_mtime_ns == stamp
    assert feature_names(path) == [f"img_{i}.jpg" for i in range(5)]


def test_a_write_refused_by_the_file_system_falls_back_too(tmp_path, monkeypatch, capsys):
    """os.access may say yes where the write still fails (EROFS, EACCES, a full disk)."""
    import errno

    path = write_npy(tmp_path / "f.npy", grids())

    def refuse_next_to_source(point, filename):  # the cache's fault hook, as it creates its file
        if point == "create" and os.path.dirname(filename) == str(tmp_path):
            raise OSError(errno.EROFS, "Read-only file system", str(filename))

    monkeypatch.setattr(F.fc, "FAULT", refuse_next_to_source)
    monkeypatch.setenv("ACF_FAST_CACHE_DIR", str(tmp_path / "elsewhere"))
    torch.testing.assert_close(load_feature_table(path), expected_table(grids()))
    assert "Read-only file system" in capsys.readouterr().err
    assert F.user_cache_path(path, torch.float32).exists()
    assert not cache_path(path, torch.float32).exists()
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["f.npy"]  # no temporary left


def test_no_writable_folder_at_all_reads_the_features_into_memory(read_only, monkeypatch, capsys):
    monkeypatch.setenv("ACF_FAST_CACHE_DIR", str(read_only / "cache"))
    path = write_h5(read_only / "f.h5", grids())
    table = load_feature_table(path, torch.bfloat16)
    torch.testing.assert_close(table, expected_table(grids()).to(torch.bfloat16))
    assert "into memory" in capsys.readouterr().err
    assert sorted(p.name for p in read_only.iterdir()) == ["f.h5"]
    assert feature_names(path) == [f"img_{i}.jpg" for i in range(5)]      # from the source


def test_the_user_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("ACF_FAST_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert F.user_cache_dir() == tmp_path / "xdg" / "acf_fast" / "features"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert F.user_cache_dir() == tmp_path / "home" / ".cache" / "acf_fast" / "features"
    monkeypatch.setenv("ACF_FAST_CACHE_DIR", str(tmp_path / "mine"))
    assert F.user_cache_dir() == tmp_path / "mine"
    # two datasets' features.npy never share a cache
    a, b = tmp_path / "a" / "features.npy", tmp_path / "b" / "features.npy"
    assert F.user_cache_path(a, torch.float32) != F.user_cache_path(b, torch.float32)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_a_folder_without_write_permission(tmp_path, monkeypatch):
    data = tmp_path / "shared"
    data.mkdir()
    path = write_npy(data / "f.npy", grids())
    monkeypatch.setenv("ACF_FAST_CACHE_DIR", str(tmp_path / "user-cache"))
    data.chmod(0o555)
    try:
        torch.testing.assert_close(load_feature_table(path), expected_table(grids()))
    finally:
        data.chmod(0o755)
    assert F.user_cache_path(path, torch.float32).exists()
