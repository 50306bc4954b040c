"""Memory bounds: feature conversion holds one extra table copy at most; evaluation memory
does not grow with the number of users."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

N, F = 400, 2048           # 400 x 49 x 2048 float32 = 160 MB: far above interpreter noise
TABLE_BYTES = N * 49 * F * 4

_MEASURE = r"""
import gc, json, sys
import torch
from acf_fast.model.features import load_feature_table

def kb(field):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith(field + ":"))

gc.collect()
open("/proc/self/clear_refs", "w").write("5")   # reset the high-water mark
base = kb("VmRSS")
table = load_feature_table(sys.argv[1])
float(table[-1].sum())                           # the table really is readable
print(json.dumps({"added": (kb("VmHWM") - base) * 1024}))
"""


def write_sources(tmp_path):
    rng = np.random.default_rng(0)
    grids = rng.standard_normal((N, F, 7, 7), dtype=np.float32)
    arr = np.empty((N, 2), dtype=object)
    for i in range(N):
        arr[i, 0], arr[i, 1] = f"{i}.jpg", grids[i]
    np.save(tmp_path / "f.npy", arr, allow_pickle=True)
    import h5py
    with h5py.File(tmp_path / "f.h5", "w") as fh:
        fh["resnet50/layer4"] = grids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux /proc")
@pytest.mark.parametrize("name, budget", [
    # the tutorial's pickled .npy must be read whole (that is the one extra copy);
    # rows are released as they are copied into the cache
    ("f.npy", 2.3 * TABLE_BYTES),
    # .h5 is read in 8 MB chunks: the cache pages plus chunk-sized temporaries
    ("f.h5", 1.5 * TABLE_BYTES),
])
def test_feature_conversion_holds_one_extra_copy_at_most(tmp_path, name, budget):
    write_sources(tmp_path)
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / name)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    added = json.loads(out.stdout.strip().splitlines()[-1])["added"]
    assert added <= budget, f"peak added {added / 2**20:.0f} MB > {budget / 2**20:.0f} MB"


_EVAL = r"""
import gc, json, sys
import numpy as np, torch
from acf_fast import ACF
from acf_fast.data.formats import EvaluationGroups
from acf_fast.evaluation.evaluate import evaluate_groups

def kb(field):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith(field + ":"))

n_users, n_items = int(sys.argv[1]), 33000
torch.manual_seed(0)
model = ACF(n_users, n_items, features=torch.rand(n_items, 1, 4), model_dim=8)
rng = np.random.default_rng(0)
profile = rng.integers(1, n_items + 1, size=(n_users, 10))
targets = rng.integers(1, n_items + 1, size=n_users * 3)
groups = EvaluationGroups(user=np.arange(n_users), profile=profile, targets_flat=targets,
                          targets_ptr=np.arange(0, n_users * 3 + 1, 3))
gc.collect()
open("/proc/self/clear_refs", "w").write("5")
base = kb("VmRSS")
out = evaluate_groups(model, groups, protocols=("tutorial",), memory_mb=16, progress=False)
assert len(out["per_group"]["tutorial"]["AUC"]) == n_users
print(json.dumps({"added": (kb("VmHWM") - base) * 1024}))
"""


def _added_memory(script: str, user_counts) -> dict:
    """{n_users: bytes the script's measured call added} from a fresh process each. A fixed
    mmap threshold makes glibc return every large block at once, so the high-water mark
    shows live memory rather than heap fragmentation from repeated block allocations."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    added = {}
    for n_users in user_counts:
        out = subprocess.run([sys.executable, "-c", script, str(n_users)],
                             capture_output=True, text=True, timeout=600, env=env)
        assert out.returncode == 0, out.stderr
        added[n_users] = json.loads(out.stdout.strip().splitlines()[-1])["added"]
    return added


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux /proc")
def test_evaluation_memory_does_not_grow_with_the_number_of_users():
    """33,000-item catalogue: 40x more users must not need more memory (blocked scoring)."""
    added = _added_memory(_EVAL, (100, 4000))
    # a [4000, 33000] float32 score matrix alone would be 503 MB
    assert added[4000] < 64 * 2**20, added
    assert added[4000] < added[100] + 4 * 2**20, added


_RECOMMEND = r"""
import gc, json, sys
import torch
import acf_fast.model.scoring as S
from acf_fast import ACF

def kb(field):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith(field + ":"))

n_users, n_items = int(sys.argv[1]), 200
S.BLOCK_BYTES = 16 * 2**20        # the default budget (256 MiB), scaled down with the problem
torch.manual_seed(0)
model = ACF(n_users, n_items, features=torch.rand(n_items, 49, 32), model_dim=16,
            backend="reference").eval()
users, profiles = torch.arange(n_users), torch.randint(1, n_items + 1, (n_users, 9))
gc.collect()
open("/proc/self/clear_refs", "w").write("5")
base = kb("VmRSS")
scores = model.recommend_all(users, profiles)
assert scores.shape == (n_users, n_items)
print(json.dumps({"added": (kb("VmHWM") - base) * 1024}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux /proc")
def test_recommend_all_on_the_reference_backend_is_blocked_over_users():
    """The reference backend gathers [B, 9, 49, F] features for B users: 4,000 users at once
    would take 226 MB for the gather alone (100k users of the demo's F = 64: 10.5 GiB).
    Blocked over users, 10x more users add only their [B, N] result."""
    added = _added_memory(_RECOMMEND, (400, 4000))
    assert added[4000] < 64 * 2**20, added
    assert added[4000] < added[400] + 4000 * 200 * 4 + 8 * 2**20, added
