"""The feature cache serves neither stale nor half-written data (Reliability II, item 4).

One entry is one file, keyed on the source's content, written under a per-process
temporary name with its space reserved, and published by one rename. Crashes are
injected through `feature_cache.FAULT` in a subprocess that SIGKILLs itself at the chosen
point; a full disk is a small tmpfs (root only, skipped otherwise).
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from acf_fast.model import feature_cache as fc
from acf_fast.model import features as F
from acf_fast.model.features import cache_path, load_feature_table

REPO = Path(__file__).resolve().parents[2]


def grids(n=5, f=6, seed=0):
    return np.random.default_rng(seed).standard_normal((n, f, 7, 7)).astype(np.float32)


def write_npy(path, g):
    arr = np.empty((g.shape[0], 2), dtype=object)
    for i in range(g.shape[0]):
        arr[i] = [f"img_{i}.jpg", g[i]]
    np.save(path, arr, allow_pickle=True)
    return path


def write_h5(path, g):
    import h5py

    with h5py.File(path, "w") as fh:
        fh["resnet50/layer4"] = g
    return path


def expected_table(g):
    return torch.cat([torch.zeros(1, 49, g.shape[1]), torch.from_numpy(g).flatten(2).transpose(1, 2)])


def rewrite_keeping_size_and_mtime(path, g):
    """Another table in the same file: same size, mtime set back to the old one."""
    st = path.stat()
    write_npy(path, g)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def leftovers(folder, source):
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.name not in (source.name, cache_path(source, torch.float32).name))


@pytest.fixture
def no_hash_check(monkeypatch):
    """What tables over 1 GiB get: no sha256 check of the cache on load."""
    monkeypatch.setattr(fc, "VERIFY_LIMIT_BYTES", 0)


def child(script: str, *args, env=None) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **(env or {})))


# ---------------------------------------------------------------------------- the key
@pytest.mark.parametrize("sampled", [False, True], ids=["full-hash", "sampled-hash"])
def test_a_rewrite_with_the_same_size_and_mtime_is_not_served_from_the_old_cache(
        tmp_path, monkeypatch, no_hash_check, sampled):
    if sampled:  # the key of sources too large to hash whole (the tutorial's 13 GB .npy)
        monkeypatch.setattr(fc, "FULL_HASH_BYTES", 0)
        monkeypatch.setattr(fc, "SAMPLES", 8)
        monkeypatch.setattr(fc, "SAMPLE_BYTES", 64)
    path = write_npy(tmp_path / "f.npy", grids(seed=0))
    torch.testing.assert_close(load_feature_table(path), expected_table(grids(seed=0)))
    assert fc.source_key(path).startswith("sampled-sha256:" if sampled else "sha256:")
    rewrite_keeping_size_and_mtime(path, grids(seed=1))
    torch.testing.assert_close(load_feature_table(path), expected_table(grids(seed=1)))
    assert F.feature_names(path) == [f"img_{i}.jpg" for i in range(5)]


def test_a_touched_source_keeps_its_cache(tmp_path):
    """The key is the content: a new mtime alone (a copy, a touch) does not rebuild."""
    path = write_npy(tmp_path / "f.npy", grids())
    load_feature_table(path)
    stamp = cache_path(path, torch.float32).stat().st_mtime_ns
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    load_feature_table(path)
    assert cache_path(path, torch.float32).stat().st_mtime_ns == stamp


def test_a_source_changed_during_the_conversion_is_not_published(tmp_path, monkeypatch):
    path = write_npy(tmp_path / "f.npy", grids(seed=0))

    def rewrite(point, _):
        if point == "row":
            rewrite_keeping_size_and_mtime(path, grids(seed=1))

    monkeypatch.setattr(fc, "FAULT", rewrite)
    with pytest.raises(ValueError, match="f.npy changed while it was being converted"):
        load_feature_table(path)
    assert leftovers(tmp_path, path) == [] and not cache_path(path, torch.float32).exists()


# ---------------------------------------------------------------------------- crashes
_KILL_AT = """
import os, signal, sys
from acf_fast.model import feature_cache as fc
from acf_fast.model.features import load_feature_table

def fault(point, path):
    if point == sys.argv[2]:
        print(path, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

fc.FAULT = fault
load_feature_table(sys.argv[1])
"""


@pytest.mark.parametrize("point", ["create", "row", "before_rename", "published"])
def test_sigkill_anywhere_in_a_rebuild_never_serves_the_old_table(tmp_path, no_hash_check, point):
    """The old layout's two renames (table, metadata) let a SIGKILL pair new metadata with
    the old table; now one rename publishes the entry, and a killed conversion's
    full-size temporary file is removed by the next conversion."""
    path = write_npy(tmp_path / "f.npy", grids(seed=0))
    load_feature_table(path)
    rewrite_keeping_size_and_mtime(path, grids(seed=1))
    out = child(_KILL_AT, path, point)
    assert out.returncode == -signal.SIGKILL, out.stderr
    left = leftovers(tmp_path, path)
    if point in ("row", "before_rename"):   # the killed writer's file, its space reserved
        assert left == [Path(out.stdout.split()[-1]).name]
        reserved = (tmp_path / left[0]).stat().st_size
    torch.testing.assert_close(load_feature_table(path), expected_table(grids(seed=1)))
    assert leftovers(tmp_path, path) == []
    if point in ("row", "before_rename"):
        assert reserved == cache_path(path, torch.float32).stat().st_size


def test_concurrent_conversions_of_one_file_all_succeed(tmp_path):
    """Six processes converting the same file at once (the old layout shared one
    .json.tmp name and failed 2 in 18): each writes its own temporary file."""
    path = write_npy(tmp_path / "f.npy", grids(n=40))
    go = tmp_path / "go"
    script = """
    import sys, time
    from pathlib import Path
    from acf_fast.model import feature_cache as fc
    from acf_fast.model.features import load_feature_table

    converted = []
    def fault(point, _):
        converted.append(point)
        if point in ("create", "before_rename"):
            time.sleep(0.2)                        # widen the windows the others run into
    fc.FAULT = fault
    Path(sys.argv[2] + sys.argv[3]).touch()        # imported: ready
    while not Path(sys.argv[2]).exists():
        time.sleep(0.01)
    total = float(load_feature_table(sys.argv[1]).double().sum())
    print(total, "create" in converted)
    """
    pyenv = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(path), str(go),
                               f"-ready{i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=pyenv) for i in range(6)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("go-ready*"))) < 6 and time.time() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert [rc for _, _, rc in results] == [0] * 6, [err for _, err, _ in results]
    want = float(expected_table(grids(n=40)).double().sum())
    assert [float(o.split()[0]) for o, _, _ in results] == pytest.approx([want] * 6)
    assert sum(o.split()[1] == "True" for o, _, _ in results) >= 2   # they did overlap
    for ready in tmp_path.glob("go-ready*"):
        ready.unlink()
    assert leftovers(tmp_path, path) == ["go"]


def test_stale_temporary_files_are_removed_and_live_ones_kept(tmp_path):
    path = write_npy(tmp_path / "f.npy", grids())
    dest = cache_path(path, torch.float32)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - fc.STALE_TEMP_S - 60
    names = {
        "dead writer here": f".{dest.name}.tmp-{fc._WHERE}-{dead.pid}-0123abcd",
        "live writer here": f".{dest.name}.tmp-{fc._WHERE}-{os.getpid()}-0123abcd",
        "other machine, fresh": f".{dest.name}.tmp-ffffffff-{dead.pid}-0123abcd",
        "other machine, stale": f".{dest.name}.tmp-eeeeeeee-{dead.pid}-0123abcd",
        "version 2, stale": f"{dest.name}.tmp{dead.pid}",
        "version 2 metadata, fresh": f"{dest.name[:-4]}.npy.json.tmp",
        "not a cache's": ".something-else.tmp-ffffffff-1-0123abcd",
    }
    for what, name in names.items():
        (tmp_path / name).write_bytes(b"x" * 1000)
        if "stale" in what:
            os.utime(tmp_path / name, (old, old))
    load_feature_table(path)
    kept = {what for what, name in names.items() if (tmp_path / name).exists()}
    assert kept == {"live writer here", "other machine, fresh", "version 2 metadata, fresh",
                    "not a cache's"}


def test_a_version_2_cache_is_rebuilt(tmp_path, no_hash_check):
    """Table and metadata in two files, keyed on size and mtime: rebuilt as one entry."""
    import json

    path = write_npy(tmp_path / "f.npy", grids(seed=1))
    dest = cache_path(path, torch.float32)
    np.save(dest, expected_table(grids(seed=0)).numpy())
    st = path.stat()
    dest.with_suffix(".json").write_text(json.dumps({
        "version": 2, "source": str(path), "source_size": st.st_size,
        "source_mtime_ns": st.st_mtime_ns, "dtype": "float32", "names": ["x"] * 5,
        "cache_bytes": dest.stat().st_size, "sha256": fc.file_sha256(dest)}))
    torch.testing.assert_close(load_feature_table(path), expected_table(grids(seed=1)))
    assert fc.read_entry(dest).meta["version"] == fc.VERSION
    assert leftovers(tmp_path, path) == []                       # the old .json is gone


# ---------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (mount needs root); skipped where it cannot be mounted."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


_LOAD = """
import sys
from acf_fast.model.features import load_feature_table
load_feature_table(sys.argv[1])
"""


@pytest.mark.parametrize("reserve", [True, False], ids=["fallocate", "no-fallocate"])
def test_a_full_disk_is_a_clear_enospc_error_not_sigbus(small_disk, reserve):
    """The source fits the disk, its cache does not; the user folder is on the same disk."""
    path = write_h5(small_disk / "f.h5", grids(n=48, f=64))    # 600 KB; its cache 615 KB
    script = _LOAD if reserve else "import os\ndel os.posix_fallocate\n" + _LOAD
    out = child(script, path, env={"ACF_FAST_CACHE_DIR": str(small_disk / "user")})
    assert out.returncode == 1, (out.returncode, out.stderr)   # SIGBUS would be -7
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("OSError: [Errno 28] no space for the feature cache in "
                           f"{small_disk}: it needs 0.6 MiB"), last
    assert f"no space for the feature cache in {small_disk / 'user'}" in last
    assert "ACF_FAST_CACHE_DIR" in last
    assert sorted(p.name for p in small_disk.rglob("*")) == ["f.h5", "user"]   # no temp left


def test_a_full_disk_next_to_the_source_falls_back_to_the_user_folder(small_disk, tmp_path,
                                                                        monkeypatch, capsys):
    path = write_h5(small_disk / "f.h5", grids(n=48, f=64))
    monkeypatch.setenv("ACF_FAST_CACHE_DIR", str(tmp_path / "user"))
    torch.testing.assert_close(load_feature_table(path), expected_table(grids(n=48, f=64)))
    assert "no space for the feature cache in" in capsys.readouterr().err
    assert F.existing_cache(path, torch.float32) == F.user_cache_path(path, torch.float32)
    assert sorted(p.name for p in small_disk.iterdir()) == ["f.h5"]
