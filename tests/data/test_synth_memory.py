"""`synth` at scale (issue 18, item 5): the feature files are generated and written a block
of items at a time, so memory stays near one block however large the table is; only the
formats asked for are written; nothing is left half-written under a final name."""

import json
import subprocess
import sys
import tracemalloc

import h5py
import numpy as np
import pytest

from acf_fast.data import feature_files as FF
from acf_fast.data import synth as S

# a 205 MB float32 table, 32 blocks of 512 items (one block's float64 noise: 12.8 MB)
N_ITEMS, DIM = 16384, 64
TABLE = N_ITEMS * DIM * 49 * 4
BLOCK = S.BLOCK_ITEMS * DIM * 49 * 8
KW = dict(n_users=30, n_items=N_ITEMS, feature_dim=DIM, images=False, heavy_users=1, progress=False)


def test_numpy_memory_stays_near_a_block_not_the_table(tmp_path):
    """tracemalloc sees every numpy allocation: the same count on any CPU."""
    tracemalloc.start()
    try:
        s = S.synth(tmp_path / "d", formats=("h5", "npy"), **KW)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 4 * BLOCK < TABLE / 3                       # the bound below tells the two apart
    assert peak < 4 * BLOCK, f"peak {peak / 2**20:.0f} MiB for a {TABLE / 2**20:.0f} MiB table"
    assert np.load(s["features_npy"], mmap_mode="r").shape == (N_ITEMS, DIM, 7, 7)
    with h5py.File(s["features_h5"]) as fh:
        assert fh["resnet50/layer4"].shape == (N_ITEMS, DIM, 7, 7)


RSS_SCRIPT = """
import json, resource, sys
from acf_fast.data.synth import synth
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
synth(sys.argv[1], formats=("h5",), **json.loads(sys.argv[2]))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux only")
def test_peak_rss_grows_by_far_less_than_the_table(tmp_path):
    """What the process really holds, HDF5's own buffers included, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "d"), json.dumps(KW)],
                         capture_output=True, text=True, check=True)
    growth = int(out.stdout.split()[-1])
    assert growth < TABLE / 3, f"peak RSS grew {growth / 2**20:.0f} MiB for a {TABLE / 2**20:.0f} MiB table"


def test_only_the_formats_asked_for_are_written(tmp_path):
    kw = dict(n_users=10, n_items=20, feature_dim=4, images=False, progress=False)
    s = S.synth(tmp_path, formats=("h5", "npy"), **kw)
    assert (tmp_path / "features.npy").is_file() and (tmp_path / FF.NAMES_FILE).is_file()
    s = S.synth(tmp_path, **kw)                         # the default: the .h5 alone
    assert s["formats"] == ["h5"] and s["features_npy"] is None
    # the earlier run's .npy described other data: it is gone, not left to be read as this one's
    assert sorted(p.name for p in tmp_path.glob("features*")) == ["features.h5"]
    with pytest.raises(ValueError, match="feature formats must be one or more of h5, npy"):
        S.synth(tmp_path / "x", formats=("csv",), **kw)


def test_a_folder_not_written_by_synth_keeps_its_other_files(tmp_path):
    """Only an earlier synth's feature files are removed: someone's own features.h5 stays."""
    theirs = tmp_path / "features.h5"
    theirs.write_bytes(b"not ours")
    S.synth(tmp_path, n_users=10, n_items=20, feature_dim=4, images=False, progress=False,
            formats=("npy",))
    assert theirs.read_bytes() == b"not ours"


def test_same_data_in_both_formats_and_as_before_in_blocks(tmp_path):
    """Blocks of the stream (512 items) and of the writes (rows_per_write) do not change it:
    the features equal those of the whole-array generator the stream was defined by."""
    kw = dict(n_users=10, n_items=1100, feature_dim=40, images=False, progress=False)
    s = S.synth(tmp_path, formats=("h5", "npy"), **kw)
    cfg = S.SynthConfig(**{k: v for k, v in kw.items() if k != "progress"})
    rng = np.random.default_rng(cfg.seed)
    vecs = S._concept_vectors(rng, cfg.n_concepts, cfg.feature_dim)
    _, cells = S._place_concepts(rng, cfg.n_items, cfg.n_concepts)
    textures = np.abs(rng.normal(0.0, 1.0, size=(cfg.n_textures, cfg.feature_dim))).astype(np.float32)
    textures /= np.linalg.norm(textures, axis=1, keepdims=True)
    texture_of = rng.integers(0, cfg.n_textures, size=cfg.n_items)
    want = np.empty((cfg.n_items, 49, cfg.feature_dim), dtype=np.float32)
    for a in range(0, cfg.n_items, 512):                # the former generator, verbatim
        e = min(cfg.n_items, a + 512)
        base = textures[texture_of[a:e]][:, None, :] * rng.uniform(0.5, 1.0, size=(e - a, 49, 1))
        noise = np.abs(rng.normal(0.0, 0.15, size=(e - a, 49, cfg.feature_dim)))
        planted = cells[a:e] >= 0
        strength = cfg.concept_strength * rng.uniform(0.8, 1.2, size=(e - a, 49, 1))
        obj = np.where(planted[..., None], vecs[np.maximum(cells[a:e], 0)] * strength, 0.0)
        want[a:e] = np.where(planted[..., None], obj, base) + noise
    want = want.transpose(0, 2, 1).reshape(cfg.n_items, cfg.feature_dim, 7, 7)
    with h5py.File(s["features_h5"]) as fh:
        assert np.array_equal(fh["resnet50/layer4"][:], want)
    assert np.array_equal(np.load(s["features_npy"]), want)


def test_a_failure_mid_write_leaves_no_file_under_a_final_name(tmp_path, monkeypatch):
    calls = []

    def fail_on_second(self, first, block, write=FF.FeatureFiles.write):
        calls.append(first)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        write(self, first, block)

    monkeypatch.setattr(FF.FeatureFiles, "write", fail_on_second)
    monkeypatch.setattr(FF, "WRITE_BYTES", 49 * 4 * 4 * 8)    # 8 items a write: several writes
    with pytest.raises(OSError, match="No space"):
        S.synth(tmp_path, n_users=10, n_items=40, feature_dim=4, images=False, progress=False,
                formats=("h5", "npy"))
    assert list(tmp_path.iterdir()) == []                # neither a final name nor a temporary


def test_a_disk_without_room_is_refused_before_any_work(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match=r"no space for the feature files \(features.h5\)"):
        S.synth(tmp_path, n_users=10, n_items=40, feature_dim=4, images=False, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_temporaries_of_a_dead_synth_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f".features.h5.tmp-{dead}"
    stale.write_bytes(b"half")
    S.synth(tmp_path, n_users=10, n_items=20, feature_dim=4, images=False, progress=False)
    assert not stale.exists()
